"""How a study lives in MLflow, and reading it back.

A study is one parent run (tags `mutransfer.study=<name>`, `mutransfer.role=study`) in the study's
experiment. Each trial is a child run (`mlflow.parentRunId`) tagged with:

    mutransfer.study, mutransfer.trial_key, mutransfer.role=proxy (target for the transferred run),
    mutransfer.width, mutransfer.depth, mutransfer.parametrization, mutransfer.lr, mutransfer.momentum,
    mutransfer.weight_decay, mutransfer.seed, mutransfer.status (a `tags.RunStatus`)

(the names are those of `mutransfer.tags`) and holds the trainer's metrics, among them `final/eval_loss`, `final/eval_top1`, `final/train_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mutransfer import tags
from mutransfer.tags import RunStatus

from .trial import TrialSpec

DEFAULT_METRIC = "final/eval_loss"
# metrics where larger is better; everything else is minimised
MAXIMISED = frozenset({"final/eval_top1", "final/eval_top5", "eval/top1", "eval/top5"})


@dataclass
class Trial:
    """A run of a study as MLflow holds it: the trial it ran (`spec`), its status and its metrics. A target
    run's key is `target_<name>`, not its spec's key."""

    run_id: str
    key: str
    role: str
    spec: TrialSpec
    status: str
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[str, int, int]:
        return (self.spec.parametrization, self.spec.width, self.spec.depth)

    def value(self, metric: str) -> float:
        """The metric, or inf (-inf when maximised) for trials that diverged or lack it: never best."""
        bad = -math.inf if metric in MAXIMISED else math.inf
        if self.status != RunStatus.FINISHED:
            return bad
        value = self.metrics.get(metric)
        return bad if value is None or not math.isfinite(value) else value


def grid_order(trial: Trial) -> tuple[Any, ...]:
    """Sort key for tables and comparisons: shape, grid point, seed, then key."""
    return (trial.shape, trial.spec.point, trial.spec.seed, trial.key)


def client_for(uri: str | None):
    from mutransfer.train.tracking import mlflow_client

    return mlflow_client(uri)


def find_study_run(client, study: str, experiment: str | None = None):
    """The study's parent run, or None."""
    experiments = _experiment_ids(client, experiment)
    if not experiments:
        return None
    runs = client.search_runs(experiments, filter_string=f"tags.`{tags.STUDY}` = '{study}' and "
                              f"tags.`{tags.ROLE}` = 'study'", max_results=10)
    return runs[0] if runs else None


def _experiment_ids(client, experiment: str | None) -> list[str]:
    if experiment:
        found = client.get_experiment_by_name(experiment)
        return [found.experiment_id] if found else []
    return [e.experiment_id for e in client.search_experiments()]


def _as_float(value: Any, default: float = math.nan) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def load_trials(client, study: str, experiment: str | None = None, role: str | None = "proxy",
                key: str | None = None) -> list[Trial]:
    """Every run of a study (proxies by default; those of one trial `key`), newest first for each trial key."""
    experiments = _experiment_ids(client, experiment)
    if not experiments:
        return []
    flt = f"tags.`{tags.STUDY}` = '{study}' and tags.`{tags.ROLE}` != 'study'"
    if role:
        flt = f"tags.`{tags.STUDY}` = '{study}' and tags.`{tags.ROLE}` = '{role}'"
    if key:
        flt += f" and tags.`{tags.TRIAL_KEY}` = '{key}'"
    runs = []
    token = None
    while True:
        page = client.search_runs(experiments, filter_string=flt, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        runs.extend(page)
        token = page.token
        if not token:
            break
    trials = []
    for run in runs:
        found = run.data.tags
        trials.append(Trial(
            run_id=run.info.run_id,
            key=found.get(tags.TRIAL_KEY, run.info.run_id),
            role=found.get(tags.ROLE, ""),
            spec=TrialSpec(
                parametrization=found.get(tags.VARIANT) or found.get(tags.PARAMETRIZATION, ""),
                width=int(_as_float(found.get(tags.WIDTH), 0)),
                depth=int(_as_float(found.get(tags.DEPTH), 0)),
                lr=_as_float(found.get(tags.LR)),
                momentum=_as_float(found.get(tags.MOMENTUM)),
                weight_decay=_as_float(found.get(tags.WEIGHT_DECAY), 0.0),
                seed=int(_as_float(found.get(tags.SEED), 0)),
            ),
            status=found.get(tags.STATUS, "unknown"),
            metrics=dict(run.data.metrics),
        ))
    return trials


def latest_per_key(trials: list[Trial]) -> list[Trial]:
    """One trial per key: a finished or diverged one if any, else the newest."""
    chosen: dict[str, Trial] = {}
    for trial in trials:  # newest first
        current = chosen.get(trial.key)
        if current is None or (current.status not in (RunStatus.FINISHED, RunStatus.DIVERGED)
                               and trial.status in (RunStatus.FINISHED, RunStatus.DIVERGED)):
            chosen[trial.key] = trial
    return list(chosen.values())
