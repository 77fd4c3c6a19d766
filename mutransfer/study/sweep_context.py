"""What every trial of one `mutransfer sweep` shares, however it trains (in process, launched, a stack per
GPU, an array task): the study's parent run, a trial's RunConfig, claiming a trial before it runs (and the
child run it continues), the sweep's summary and its stop signal."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import Any

from mutransfer import tags
from mutransfer.folder_lock import folder_lock
from mutransfer.tags import DONE, RunStatus
from mutransfer.train.config import RunConfig
from mutransfer.train.signals import StopRequest
from mutransfer.train.tracking import flatten, training_experiment_id

from .claims import TrialClaims
from .config import StudyConfig
from .progress import SweepProgress
from .store import find_study_run, latest_per_key, load_trials
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
    stack_sizes: list[int] = field(default_factory=list)  # the plan: trials per stack, in order

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


@dataclass
class SweepContext:
    """What every trial of one sweep shares: the study, its MLflow client, parent run and URI, the summary
    and the progress bar (`progress.SweepProgress`)."""

    cfg: StudyConfig
    client: Any
    parent: str
    uri: str
    summary: SweepSummary
    progress: SweepProgress

    def record(self, stack: list[TrialSpec], statuses: list[str]) -> None:
        """The outcomes of a stack (or one trial) this sweep trained, in the summary and the progress bar."""
        for trial, status in zip(stack, statuses, strict=True):
            self.summary.ran.append(trial.key)
            self.summary.statuses[trial.key] = status
        self.progress.trained(stack)

    def config(self, trial: TrialSpec, continued: str | None = None, ranks: int = 1) -> RunConfig:
        return trial_config(self.cfg, trial, self.parent, self.uri, continued, ranks)

    def claim(self, claims: TrialClaims, trials: list[TrialSpec]) -> dict[TrialSpec, str | None]:
        """The trials of `trials` this sweep now holds, each with the child run it continues (None: a new
        one); the others (held elsewhere, or done) count as progress and drop out."""
        held = []
        for trial in trials:
            if claims.take(trial.key):
                held.append(trial)
            else:
                self.summary.elsewhere.append(trial.key)
                self.progress.passed(trial)
        claimed = continued_runs(self.client, self.cfg, claims, held, self.summary)
        for trial in held:
            if trial not in claimed:  # done meanwhile
                self.progress.passed(trial)
        return claimed


def ensure_study_run(client, cfg: StudyConfig) -> str:
    """The study's parent run id, created (with the study config as params) on first use: under a lock on the
    study's folder, so that sweeps started together on one machine make one. (Job arrays get theirs from
    `pending_array` before any task starts.)"""
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


def trial_config(cfg: StudyConfig, trial: TrialSpec, parent_run_id: str | None, tracking_uri: str | None,
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


def continued_runs(client, cfg: StudyConfig, claims: TrialClaims, held: list[TrialSpec], summary: SweepSummary
                   ) -> dict[TrialSpec, str | None]:
    """Of trials this sweep has just claimed, the ones still to run, each with the child run it continues
    (None: a new one). Their runs are read again, with one search for them all: another sweep may have
    finished one meanwhile, whose claim is released here and which the summary lists as skipped. The caller
    releases the others' claims when they end."""
    if not held:
        return {}
    runs = load_trials(client, cfg.study.name, cfg.study.experiment, keys={trial.key for trial in held})
    done = {t.key: t.status for t in latest_per_key(runs) if t.status in DONE}
    for key in (trial.key for trial in held if trial.key in done):  # in the order held, as the summary lists them
        claims.release(key)
        summary.skipped.append(key)
        summary.statuses[key] = done[key]
    continued = runs_to_continue(client, runs, {trial.key for trial in held} - set(done))
    return {trial: continued.get(trial.key) for trial in held if trial.key not in done}


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
