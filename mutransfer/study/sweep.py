"""`mutransfer sweep`: run every trial of a proxy study and record it in MLflow.

The study is one MLflow parent run; each trial is a child run tagged with its key, shape and grid point.
Running the same command again resumes: trials whose child run finished or diverged are skipped, and a trial
that was interrupted (or killed) continues its own child run, so that every trial key has one child run.
(Trials are seeded, so a trial that starts over repeats the steps its run already holds, which are not
recorded twice.) A trial that failed runs again in a new child run; the failed one goes to MLflow's trash.
Trials run in this process, those of one shape `--stack K` at a time as one stacked model (`study.stacks`; by
default as many as fit in memory, `--stack 1` one at a time), or as `deepspeed` / `torchrun` launches,
`--parallel K` at a time, each on its own `--gpus-per-trial G` GPUs. `--trial-index I` runs only trial I (in
the order of `StudyConfig.trials()`): one task of a SLURM job array (`mutransfer sweep --slurm`).

Any number of sweeps of one study may run at once (terminals, array tasks, a job array relaunched over a
running one): each trial is claimed before it runs (`claims.py`) and read back from MLflow once claimed, so
every trial is trained by one sweep and has one child run. The parent run is marked finished by whichever
sweep or task completes the study's last trial.

The first SIGINT (Ctrl-C) or SIGTERM stops the sweep: the running trial stops at its next step and closes its
child run (KILLED, status preempted), no further trial starts, the parent run is marked `interrupted`, and the
command exits 128 + the signal number. A sweep in which a trial failed exits 1.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mutransfer import tags
from mutransfer.errors import UsageError
from mutransfer.launch.trials import LAUNCHERS, signal_group, trial_command
from mutransfer.tags import DONE, RunStatus
from mutransfer.train.config import RunConfig, save_config
from mutransfer.train.signals import StopRequest
from mutransfer.train.tracking import flatten, folder_lock, resolve_tracking_uri, training_experiment_id

from .claims import TrialClaims
from .config import StudyConfig
from .stacks import plan_stacks, stack_sizer, train_trials
from .store import client_for, find_study_run, latest_per_key, load_trials
from .trial import TrialSpec

log = logging.getLogger(__name__)


@dataclass
class SweepSummary:
    study: str
    parent_run_id: str
    tracking_uri: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)
    elsewhere: list[str] = field(default_factory=list)  # trials another running sweep holds
    interrupted: int | None = None  # the signal that stopped the sweep

    @property
    def failed(self) -> list[str]:
        return [key for key, status in self.statuses.items() if status == RunStatus.FAILED]

    @property
    def exit_code(self) -> int:
        """128 + signal when interrupted, 1 when a trial failed, else 0."""
        if self.interrupted is not None:
            return 128 + self.interrupted
        return 1 if self.failed else 0


class SweepStop(StopRequest):
    """SIGINT / SIGTERM while the sweep runs: remember the first, start no further trial. (In-process, the
    trainer's own handlers take over while a trial trains; it stops that trial at its next step.)"""

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is None:
            log.warning(f"mutransfer sweep: {signal.Signals(signum).name}: stopping after the running trial(s) close")
        self.signal = self.signal or signum


def ensure_study_run(client, cfg: StudyConfig) -> str:
    """The study's parent run id, created (with the study config as params) on first use: under a lock on the
    study's folder, so that sweeps started together on one machine make one. (Job arrays get theirs from
    `pending_trials` before any task starts.)"""
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(cfg.output_dir):
        experiment_id = training_experiment_id(client, cfg.study.experiment)  # marks stores made before, too
        found = find_study_run(client, cfg.study.name, cfg.study.experiment)
        return found.info.run_id if found is not None else _create_study_run(client, cfg, experiment_id)


def _create_study_run(client, cfg: StudyConfig, experiment_id: str) -> str:
    run = client.create_run(experiment_id, run_name=f"study {cfg.study.name}",
                            tags={tags.STUDY: cfg.study.name, tags.ROLE: tags.RunRole.STUDY.value})
    from mlflow.entities import Param

    params = {**flatten(cfg.to_dict()), "trials": str(len(cfg.trials()))}
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])  # MLflow batches, truncates
    return run.info.run_id


def trial_config(cfg: StudyConfig, trial: TrialSpec, parent_run_id: str, tracking_uri: str,
                 continue_run_id: str | None = None, ranks: int = 1) -> RunConfig:
    """The trial's RunConfig on `ranks` data-parallel ranks: the study's base config with the trial's values
    (shape, batch, length, grid point), folder and MLflow placement, built and checked as typed values."""
    base = cfg.base_run_config()
    run_tags = {**base.tracking.tags, tags.STUDY: cfg.study.name, tags.TRIAL_KEY: trial.key,
                tags.ROLE: tags.RunRole.PROXY.value}
    return trial.run_config(base, ranks=ranks, extra={
        "run.output_dir": str(cfg.output_dir / trial.key),
        "run.progress": False, "tracking.uri": tracking_uri, "tracking.experiment": cfg.study.experiment,
        "tracking.parent_run_id": parent_run_id, "tracking.run_name": trial.key,
        "tracking.continue_run_id": continue_run_id, "tracking.tags": run_tags,
    })


def runs_to_continue(client, trials, keys: set[str]) -> dict[str, str]:
    """For each trial key that runs again: the child run it continues (the newest one that was interrupted or
    left RUNNING by a killed sweep; call it while holding the trial's claim, so that no live sweep is
    writing that run). Failed child runs of those keys, and older leftovers, go to MLflow's trash
    (`mlflow runs restore` brings one back): each trial key keeps one child run."""
    keep: dict[str, str] = {}
    trashed = 0
    for trial in trials:  # newest first
        if trial.key not in keys or trial.status in DONE:
            continue
        if trial.status != RunStatus.FAILED and trial.key not in keep:
            keep[trial.key] = trial.run_id
            continue
        client.delete_run(trial.run_id)
        trashed += 1
    if trashed:
        log.info(f"moved {trashed} failed or superseded child run(s) of trials that run again to MLflow's trash")
    return keep


def claim_trial(client, cfg: StudyConfig, claims: TrialClaims, trial: TrialSpec, summary: SweepSummary
                ) -> str | None | bool:
    """Claim the trial, then read its runs again (another sweep may have finished it meanwhile). Returns
    False when it is not this sweep's to run (held elsewhere, or done: the summary says which), else the
    child run it continues (None: a new one). The caller releases the claim when the trial ends."""
    if not claims.take(trial.key):
        summary.elsewhere.append(trial.key)
        return False
    runs = load_trials(client, cfg.study.name, cfg.study.experiment, key=trial.key)
    done = [t for t in latest_per_key(runs) if t.status in DONE]
    if done:
        claims.release(trial.key)
        summary.skipped.append(trial.key)
        summary.statuses[trial.key] = done[0].status
        return False
    return runs_to_continue(client, runs, {trial.key}).get(trial.key)


def mark_study(client, parent_run_id: str, status: str) -> None:
    """The parent run's state: running while a sweep works on it, then finished (every trial done),
    incomplete (a trial failed) or interrupted. Tracking trouble here must not hide the sweep's outcome."""
    try:
        client.set_tag(parent_run_id, tags.STATUS, status)
        if status == "running":
            client.update_run(parent_run_id, status="RUNNING")
        else:
            client.set_terminated(parent_run_id, RunStatus(status).mlflow)
    except Exception as err:
        log.warning(f"mutransfer sweep: could not mark the study run {status} ({type(err).__name__}: {err})")


def select_trials(cfg: StudyConfig, trial_index: int | None = None) -> list[TrialSpec]:
    """Every trial of the study, or just the one at `trial_index`."""
    trials = cfg.trials()
    if trial_index is None:
        return trials
    if not 0 <= trial_index < len(trials):
        raise UsageError(f"--trial-index {trial_index}: study {cfg.study.name} has {len(trials)} trials, "
                         f"indices 0-{len(trials) - 1}")
    return [trials[trial_index]]


def check_shared_tracking(uri: str) -> None:
    """Array tasks write to MLflow at the same time from many nodes: a sqlite or file store cannot take
    that (locks on network filesystems), a tracking server (or a database server behind one) can."""
    from mutransfer.train.tracking import server_reachable

    if not uri.startswith(("http://", "https://", "databricks")):
        raise UsageError(f"--slurm needs an MLflow tracking server, got {uri!r}: start one (`mlflow server "
                         "--backend-store-uri ... --host 0.0.0.0`) and pass --tracking-uri http://HOST:PORT or "
                         "set MLFLOW_TRACKING_URI")
    if not server_reachable(uri):
        raise UsageError(f"the MLflow server {uri} does not answer (GET /health)")


def pending_trials(cfg: StudyConfig, tracking_uri: str | None = None) -> tuple[str, list[int], str]:
    """(parent run id, indices of the trials not yet finished or diverged, tracking URI) for a job array.

    The study's parent run is created here, once: array tasks that start together would each create one.
    """
    uri = resolve_tracking_uri(tracking_uri)
    check_shared_tracking(uri)
    client = client_for(uri)
    parent = ensure_study_run(client, cfg)
    done = {t.key for t in latest_per_key(load_trials(client, cfg.study.name, cfg.study.experiment))
            if t.status in DONE}
    return parent, [i for i, trial in enumerate(cfg.trials()) if trial.key not in done], uri


def run_sweep(cfg: StudyConfig, launcher: str = "inprocess", parallel: int = 1, gpus_per_trial: int = 1,
              tracking_uri: str | None = None, progress: bool = True, trial_index: int | None = None,
              stack: int | None = None) -> SweepSummary:
    """Run the study's trials not yet done (or only `trial_index`). In process, trials of one shape train
    `stack` at a time as one stacked model (None: as many as fit in memory; 1: one trial at a time)."""
    if launcher not in LAUNCHERS:
        raise UsageError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if parallel < 1 or gpus_per_trial < 1 or (stack is not None and stack < 1):
        raise UsageError("--parallel, --gpus-per-trial and --stack must be at least 1")
    if launcher == "inprocess" and parallel > 1:
        raise UsageError("--parallel needs --launcher deepspeed or torchrun (in-process trials run one by one)")
    if launcher != "inprocess" and stack not in (None, 1):
        raise UsageError("--stack needs --launcher inprocess (launched trials train one per launch)")
    selected = select_trials(cfg, trial_index)
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
    # planned before anything is marked running: a study that cannot stack at an explicit --stack K is refused
    stacks = plan_stacks(todo, stack_sizer(stack, lambda t: trial_config(cfg, t, parent, uri))) \
        if launcher == "inprocess" else []
    whole_study = trial_index is None  # an array task leaves the parent run to the others
    if whole_study:
        mark_study(client, parent, "running")
    bar = tqdm(total=len(todo), desc=f"study {cfg.study.name}", disable=not progress, dynamic_ncols=True)
    sweep = _Sweep(cfg, client, parent, uri, summary, bar)
    with SweepStop() as stop, TrialClaims(cfg.output_dir / "claims") as claims:
        if launcher == "inprocess":
            _run_in_process(sweep, stacks, claims, stop)
        else:
            _run_launched(sweep, todo, claims, stop, launcher, parallel, gpus_per_trial)
        summary.interrupted = stop.signal
    bar.close()
    _say_what_is_left(cfg, summary, todo)
    close_study(client, cfg, parent, summary, whole_study)
    return summary


@dataclass
class _Sweep:
    """What every trial of one sweep shares."""

    cfg: StudyConfig
    client: Any
    parent: str
    uri: str
    summary: SweepSummary
    bar: Any

    def record(self, trial: TrialSpec, status: str) -> None:
        self.summary.ran.append(trial.key)
        self.summary.statuses[trial.key] = status
        self.bar.update(1)


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


def _run_in_process(sweep: _Sweep, stacks: list[list[TrialSpec]], claims: TrialClaims, stop: SweepStop) -> None:
    """Stack after stack of trials in this process, until done or told to stop. Each trial of a stack is
    claimed first; the ones another sweep holds or has finished drop out of it."""
    for trials in stacks:
        if stop.signal is not None:
            break
        claimed: dict[TrialSpec, str | None] = {}
        for trial in trials:
            continued = claim_trial(sweep.client, sweep.cfg, claims, trial, sweep.summary)
            if continued is False:
                sweep.bar.update(1)
            else:
                claimed[trial] = continued
        if not claimed:
            continue
        try:
            statuses = _train_claimed(sweep, claimed)
        finally:
            for trial in claimed:
                claims.release(trial.key)
        if RunStatus.INTERRUPTED in statuses:  # the trainer's own handlers caught the signal
            stop.signal = stop.signal or signal.SIGINT
        for trial, status in zip(claimed, statuses):
            sweep.record(trial, status)


def _train_claimed(sweep: _Sweep, claimed: dict[TrialSpec, str | None]) -> list[str]:
    """Train the claimed trials (each continuing its child run, if any): alone when there is one, else as one
    stack. Their sweep statuses."""
    keys = [trial.key for trial in claimed]
    sweep.bar.set_postfix_str(keys[0] if len(keys) == 1 else f"{keys[0]} +{len(keys) - 1} stacked")
    return train_trials(lambda: [trial_config(sweep.cfg, trial, sweep.parent, sweep.uri, continued)
                                 for trial, continued in claimed.items()], keys)


def _run_launched(sweep: _Sweep, todo: list[TrialSpec], claims: TrialClaims, stop: SweepStop, launcher: str,
                  parallel: int, gpus_per_trial: int) -> None:
    """Up to `parallel` launches at once, each on its own block of GPUs, in a process group of its own: a
    stop signal is passed on to every running launch (DeepSpeed's runner does not pass it to its ranks)."""
    free_slots = [list(range(i * gpus_per_trial, (i + 1) * gpus_per_trial)) for i in range(parallel)]
    running: dict[subprocess.Popen, tuple[TrialSpec, list[int]]] = {}
    queue = list(todo)
    forwarded = False
    while (queue and stop.signal is None) or running:
        while queue and free_slots and stop.signal is None:
            trial = queue.pop(0)
            continued = claim_trial(sweep.client, sweep.cfg, claims, trial, sweep.summary)
            if continued is False:
                sweep.bar.update(1)
                continue
            gpus = free_slots.pop(0)
            running[_launch(sweep, trial, continued, launcher, gpus)] = (trial, gpus)
        if stop.signal is not None and not forwarded:
            for proc in running:
                signal_group(proc, signal.SIGTERM)  # each trial checkpoints (if it keeps any) and stops
            forwarded = True
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            trial, gpus = running.pop(proc)
            free_slots.append(gpus)
            claims.release(trial.key)
            sweep.record(trial, _launch_outcome(sweep.cfg, trial, proc.returncode, forwarded))


def _launch(sweep: _Sweep, trial: TrialSpec, continued: str | None, launcher: str, gpus: list[int]
            ) -> subprocess.Popen:
    """Start one trial as a deepspeed / torchrun launch on `gpus`, its output in the trial's launch.log."""
    from mutransfer.netutil import free_port

    folder = sweep.cfg.output_dir / trial.key
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "trial.yaml"
    save_config(trial_config(sweep.cfg, trial, sweep.parent, sweep.uri, continued, ranks=len(gpus)), config_path)
    cmd, env = trial_command(launcher, config_path, gpus, free_port())
    with open(folder / "launch.log", "w") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _launch_outcome(cfg: StudyConfig, trial: TrialSpec, returncode: int, forwarded: bool) -> str:
    from mutransfer.train.trainer import EXIT_DIVERGED

    status = {0: _launched_status(cfg.output_dir / trial.key), EXIT_DIVERGED: RunStatus.DIVERGED}.get(
        returncode, RunStatus.INTERRUPTED if forwarded else RunStatus.FAILED)
    if status == RunStatus.FAILED:
        log.error(f"trial {trial.key} failed (exit {returncode}); see {cfg.output_dir / trial.key / 'launch.log'}")
    return status


def _launched_status(folder: Path) -> str:
    """finished, or interrupted for a launch that exited 0 after a stop signal (result.json says preempted)."""
    try:
        status = json.loads((folder / "result.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return RunStatus.FINISHED
    return RunStatus.INTERRUPTED if status == RunStatus.PREEMPTED else status
