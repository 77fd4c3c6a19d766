"""A sweep as a SLURM job array (`mutransfer sweep --slurm`): the unit one task runs, the units not yet done,
and the check that the MLflow store takes many writers at once.

With `--stack 1` a task runs one trial (`--trial-index I`: trial I in the order of `StudyConfig.trials()`).
Otherwise a task runs one stack (`--stack-index I`): stack I of a plan made from the whole study, so that
every task, on whatever node and whatever is already done, plans the same stacks: `--stack K` trials of one
shape per stack, or (no `--stack`) every trial of a shape in one stack (`stacks.array_stacks`). The plan
never reads free memory; a task whose automatic stack does not fit its device trains it in parts that do.
"""

from __future__ import annotations

from dataclasses import dataclass

from mutransfer.errors import UsageError
from mutransfer.tags import DONE
from mutransfer.train.tracking import resolve_tracking_uri

from .config import StudyConfig
from .stacks import array_stacks
from .store import client_for, latest_per_key, load_trials
from .sweep_context import ensure_study_run, trial_config
from .trial import TrialSpec


def array_units(cfg: StudyConfig, stack: int | None) -> list[list[TrialSpec]]:
    """What each array task runs, by index: one trial each with `stack` 1, else the study's stacks."""
    trials = cfg.trials()
    if stack == 1:
        return [[trial] for trial in trials]
    return array_stacks(trials, stack, lambda trial: trial_config(cfg, trial, None, None))


def select_trials(cfg: StudyConfig, trial_index: int | None = None, stack_index: int | None = None,
                  stack: int | None = None) -> list[TrialSpec]:
    """Every trial of the study, or just trial `trial_index`, or the trials of stack `stack_index`."""
    if trial_index is not None and stack_index is not None:
        raise UsageError("--trial-index and --stack-index each pick what a task runs: pass one")
    if trial_index is None and stack_index is None:
        return cfg.trials()
    units = array_units(cfg, 1 if trial_index is not None else stack)
    index, flag, what = (trial_index, "--trial-index", "trials") if trial_index is not None else \
        (stack_index, "--stack-index", "stacks" + (f" of {stack}" if stack else ""))
    if not 0 <= index < len(units):
        raise UsageError(f"{flag} {index}: study {cfg.study.name} has {len(units)} {what}, "
                         f"indices 0-{len(units) - 1}")
    return units[index]


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


@dataclass
class ArrayPlan:
    """A job array over what is left of a study: the indices of the units (trials or stacks) with a trial
    not yet finished or diverged."""

    parent: str
    uri: str
    units: list[list[TrialSpec]]
    pending: list[int]

    @property
    def per_stack(self) -> bool:
        return any(len(unit) > 1 for unit in self.units)


def pending_array(cfg: StudyConfig, tracking_uri: str | None = None, stack: int | None = None) -> ArrayPlan:
    """The array's plan. The study's parent run is created here, once: array tasks that start together
    would each create one."""
    units = array_units(cfg, stack)  # refuses an explicit --stack K that the study cannot stack
    uri = resolve_tracking_uri(tracking_uri)
    check_shared_tracking(uri)
    client = client_for(uri)
    parent = ensure_study_run(client, cfg)
    done = {t.key for t in latest_per_key(load_trials(client, cfg.study.name, cfg.study.experiment))
            if t.status in DONE}
    pending = [i for i, unit in enumerate(units) if any(trial.key not in done for trial in unit)]
    return ArrayPlan(parent, uri, units, pending)
