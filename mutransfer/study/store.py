"""How a study lives in MLflow, and reading it back.

A study is one parent run (tags `mutransfer.study=<name>`, `mutransfer.role=study`) in the study's
experiment. Each trial is a child run (`mlflow.parentRunId`) tagged with:

    mutransfer.study, mutransfer.trial_key, mutransfer.role=proxy (target for the transferred run),
    mutransfer.trial (the run's identity: one JSON object of every TrialSpec field, written by the trainer
    through `tags.identity_tags`), a copy of each of its fields under its own tag for MLflow's UI
    (mutransfer.variant, mutransfer.width, ...), and mutransfer.status (a `tags.RunStatus`)

(the names are those of `mutransfer.tags`) and holds the trainer's metrics, among them `final/eval_loss`,
`final/eval_top1`, `final/train_loss`, and its resolved config as params.

Reading back is strict and reads the identity from `mutransfer.trial` only: a run without it, or with a field
missing, of the wrong type or out of range, is a StoredRunError naming the run, never a default. The
single-field copies are not read (a user may edit them in the UI; they are not what the run trained).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from mutransfer import tags
from mutransfer.errors import UserError
from mutransfer.tags import RunStatus

from .trial import Shape, TrialSpec

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
    params: dict[str, str] = field(default_factory=dict)
    """The resolved config the run logged (flattened), for the checks that a target matches its proxies."""

    @property
    def shape(self) -> Shape:
        return self.spec.shape

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


class StoredRunError(UserError, ValueError):
    """A run of a study that lacks a field the analysis needs."""


def load_trials(client, study: str, experiment: str | None = None, role: str | None = "proxy",
                keys: Collection[str] | None = None) -> list[Trial]:
    """Every run of a study (proxies by default; with `keys`, those of these trial keys only), newest first for
    each trial key. StoredRunError names the first run that lacks a field."""
    experiments = _experiment_ids(client, experiment)
    if not experiments:
        return []
    flt = f"tags.`{tags.STUDY}` = '{study}' and tags.`{tags.ROLE}` != 'study'"
    if role:
        flt = f"tags.`{tags.STUDY}` = '{study}' and tags.`{tags.ROLE}` = '{role}'"
    if keys is not None:
        # one search for the keys' common prefix (a stack's trials share their shape's), then exactly these:
        # MLflow's filter has no IN for tags, and LIKE's `_` matches any character
        flt += f" and tags.`{tags.TRIAL_KEY}` LIKE '{os.path.commonprefix(list(keys))}%'"
    runs = []
    token = None
    while True:
        page = client.search_runs(experiments, filter_string=flt, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        runs.extend(page)
        token = page.token
        if not token:
            break
    if keys is not None:
        runs = [run for run in runs if run.data.tags.get(tags.TRIAL_KEY) in keys]
    return [Trial(run_id=run.info.run_id, key=run.data.tags.get(tags.TRIAL_KEY, run.info.run_id),
                  role=run.data.tags.get(tags.ROLE, ""), spec=stored_spec(run),
                  status=run.data.tags.get(tags.STATUS, "unknown"), metrics=dict(run.data.metrics),
                  params=dict(run.data.params))
            for run in runs]


def stored_spec(run) -> TrialSpec:
    """The TrialSpec a stored run trained, from its `mutransfer.trial` tag; StoredRunError naming the run when
    the tag is missing or any field of it is missing or malformed."""
    found = run.data.tags
    where = f"run {run.info.run_id} ({found.get(tags.TRIAL_KEY, run.info.run_name)})"
    raw = found.get(tags.TRIAL)
    if raw is None:
        raise StoredRunError(f"{where} has no tag {tags.TRIAL}: it was recorded by a mutransfer older than that "
                             "tag, or not by mutransfer; delete it, or sweep the study again in a new experiment")
    try:
        return TrialSpec.from_identity(json.loads(raw))
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise StoredRunError(f"{where} has a malformed tag {tags.TRIAL} ({err}): {raw!r}") from None


def latest_per_key(trials: list[Trial]) -> list[Trial]:
    """One trial per key: a finished or diverged one if any, else the newest."""
    chosen: dict[str, Trial] = {}
    for trial in trials:  # newest first
        current = chosen.get(trial.key)
        if current is None or (current.status not in (RunStatus.FINISHED, RunStatus.DIVERGED)
                               and trial.status in (RunStatus.FINISHED, RunStatus.DIVERGED)):
            chosen[trial.key] = trial
    return list(chosen.values())
