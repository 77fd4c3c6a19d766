"""`mutransfer sweep`: run every trial of a proxy study and record it in MLflow.

The study is one MLflow parent run; each trial is a child run tagged with its key, shape and grid point.
Running the same command again resumes: trials whose child run finished or diverged are skipped, and a trial
that was interrupted (or killed) continues its own child run, so that every trial key has one child run.
(Trials are seeded, so a trial that starts over repeats the steps its run already holds, which are not
recorded twice.) A trial that failed runs again in a new child run; the failed one goes to MLflow's trash.
Trials of one shape train `--stack K` at a time as one stacked model (`study.stacks`; by default as many as
fit in memory, `--stack 1` one at a time): in this process, or as `deepspeed` / `torchrun` launches,
`--parallel P` at a time, each on its own `--gpus-per-trial G` GPUs (a stack is one process on one GPU;
`study.launched`). `--trial-index I` runs only trial I, `--stack-index I` only stack I of the study's array
plan: one task of a SLURM job array (`mutransfer sweep --slurm`, `study.sweep_array`).

Any number of sweeps of one study may run at once (terminals, array tasks, a job array relaunched over a
running one): each trial is claimed before it runs (`claims.py`) and read back from MLflow once claimed, so
every trial is trained by one sweep and has one child run. The parent run is marked finished by whichever
sweep or task completes the study's last trial.

The first SIGINT (Ctrl-C) or SIGTERM stops the sweep: the running trial(s) stop at their next step and close
their child runs (KILLED, status preempted), no further trial starts, the parent run is marked `interrupted`,
and the command exits 128 + the signal number. A sweep in which a trial failed exits 1.
"""

from __future__ import annotations

import logging
import signal

from mutransfer.errors import UsageError
from mutransfer.launch.trials import LAUNCHERS
from mutransfer.tags import DONE, RunStatus
from mutransfer.train.tracking import resolve_tracking_uri

from .claims import TrialClaims
from .config import StudyConfig
from .launched import launched_sizer, run_launched
from .progress import SweepProgress
from .stacks import plan_stacks, stack_sizer, train_trials
from .store import client_for, latest_per_key, load_trials
from .sweep_array import select_trials
from .sweep_context import SweepContext, SweepStop, SweepSummary, ensure_study_run, mark_study
from .trial import TrialSpec

log = logging.getLogger(__name__)


def check_sweep_arguments(launcher: str, parallel: int, gpus_per_trial: int, stack: int | None) -> None:
    if launcher not in LAUNCHERS:
        raise UsageError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if parallel < 1 or gpus_per_trial < 1 or (stack is not None and stack < 1):
        raise UsageError("--parallel, --gpus-per-trial and --stack must be at least 1")
    if launcher == "inprocess" and parallel > 1:
        raise UsageError("--parallel needs --launcher deepspeed or torchrun (in-process trials run one by one)")
    if gpus_per_trial > 1 and stack != 1:
        raise UsageError(f"--gpus-per-trial {gpus_per_trial} trains each trial on {gpus_per_trial} GPUs, and a "
                         "stack trains on one GPU: add --stack 1 (one trial per launch)")


def run_sweep(cfg: StudyConfig, launcher: str = "inprocess", parallel: int = 1, gpus_per_trial: int = 1,
              tracking_uri: str | None = None, progress: bool = True, trial_index: int | None = None,
              stack: int | None = None, stack_index: int | None = None) -> SweepSummary:
    """Run the study's trials not yet done (or only trial `trial_index`, or stack `stack_index`). Trials of
    one shape train `stack` at a time as one stacked model (None: as many as fit in memory; 1: one trial at a
    time), in this process or one stack per launch slot."""
    check_sweep_arguments(launcher, parallel, gpus_per_trial, stack)
    selected = select_trials(cfg, trial_index, stack_index, stack)
    uri = resolve_tracking_uri(tracking_uri)
    client = client_for(uri)
    parent = ensure_study_run(client, cfg)
    done = _done_statuses(client, cfg)
    summary = SweepSummary(cfg.study.name, parent, uri)
    todo = []
    for trial in selected:
        if trial.key in done:
            summary.skipped.append(trial.key)
            summary.statuses[trial.key] = done[trial.key]
        else:
            todo.append(trial)
    if summary.skipped:
        log.info(f"study {cfg.study.name}: {len(summary.skipped)} trial(s) already done, {len(todo)} to run")
    progress_bar = SweepProgress(todo, f"study {cfg.study.name}", show=progress)
    ctx = SweepContext(cfg, client, parent, uri, summary, progress_bar)
    # planned before anything is marked running: a study that cannot stack at an explicit --stack K is refused
    sizer = stack_sizer(stack, ctx.config) if launcher == "inprocess" else \
        launched_sizer(stack, ctx, parallel, len(todo))
    stacks = plan_stacks(todo, sizer)
    summary.stack_sizes = [len(stack) for stack in stacks]
    whole_study = trial_index is None and stack_index is None  # an array task leaves the parent run to the others
    if whole_study:
        mark_study(client, parent, "running")
    with SweepStop() as stop, TrialClaims(cfg.output_dir / "claims") as claims:
        if launcher == "inprocess":
            _run_in_process(ctx, stacks, claims, stop)
        else:
            run_launched(ctx, stacks, claims, stop, launcher, parallel, gpus_per_trial)
        summary.interrupted = stop.signal
    progress_bar.close()
    _say_what_is_left(cfg, summary, todo)
    close_study(client, cfg, parent, summary, whole_study)
    return summary


def _done_statuses(client, cfg: StudyConfig) -> dict[str, str]:
    """Trial key -> status, for the trials of the study that finished or diverged."""
    runs = load_trials(client, cfg.study.name, cfg.study.experiment)
    return {t.key: t.status for t in latest_per_key(runs) if t.status in DONE}


def _say_what_is_left(cfg: StudyConfig, summary: SweepSummary, todo: list[TrialSpec]) -> None:
    if summary.elsewhere:
        log.info(f"study {cfg.study.name}: {len(summary.elsewhere)} trial(s) are being trained by another sweep "
                 f"(their claims are in {cfg.output_dir / 'claims'}); this one left them alone")
    if summary.interrupted is not None:
        left = len(todo) - sum(1 for key in summary.ran if summary.statuses[key] != RunStatus.INTERRUPTED)
        log.warning(f"study {cfg.study.name}: stopped by {signal.Signals(summary.interrupted).name}; {left} trial(s) "
                    f"left: run the same command again to continue")


def close_study(client, cfg: StudyConfig, parent: str, summary: SweepSummary, whole_study: bool) -> None:
    """Mark the parent run: interrupted or incomplete by what this sweep saw (a whole-study sweep), and
    finished by the store's truth, whichever sweep or array task completes the last trial."""
    if whole_study and summary.interrupted is not None:
        mark_study(client, parent, RunStatus.INTERRUPTED)
    elif whole_study and summary.failed:
        mark_study(client, parent, RunStatus.INCOMPLETE)
    elif summary.interrupted is None and len(_done_statuses(client, cfg)) == len({t.key for t in cfg.trials()}):
        mark_study(client, parent, RunStatus.FINISHED)


def _run_in_process(ctx: SweepContext, stacks: list[list[TrialSpec]], claims: TrialClaims, stop: SweepStop) -> None:
    """Stack after stack of trials in this process, until done or told to stop. Each trial of a stack is
    claimed first; the ones another sweep holds or has finished drop out of it."""
    for trials in stacks:
        if stop.signal is not None:
            break
        claimed = ctx.claim(claims, trials)
        if not claimed:
            continue
        try:
            statuses = _train_claimed(ctx, claimed)
        finally:
            for trial in claimed:
                claims.release(trial.key)
        if RunStatus.INTERRUPTED in statuses:  # the trainer's own handlers caught the signal
            stop.signal = stop.signal or signal.SIGINT
        ctx.record(list(claimed), statuses)


def _train_claimed(ctx: SweepContext, claimed: dict[TrialSpec, str | None]) -> list[str]:
    """Train the claimed trials (each continuing its child run, if any): alone when there is one, else as one
    stack. Their sweep statuses."""
    keys = [trial.key for trial in claimed]
    ctx.progress.started(keys[0] if len(keys) == 1 else f"{keys[0]} +{len(keys) - 1} stacked")
    return train_trials(lambda: [ctx.config(trial, continued)
                                 for trial, continued in claimed.items()], keys)
