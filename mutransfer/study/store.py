"""How a study lives in MLflow, and reading it back.

A study is one parent run (tags `mutransfer.study=<name>`, `mutransfer.role=study`) in the study's
experiment. Each trial is a child run (`mlflow.parentRunId`) tagged with:

    mutransfer.study, mutransfer.trial_key, mutransfer.role=proxy (target for the transferred run),
    mutransfer.width, mutransfer.depth, mutransfer.variant (the variant's label), mutransfer.batch_size,
    mutransfer.steps, mutransfer.lr, mutransfer.momentum, mutransfer.weight_decay, mutransfer.seed,
    mutransfer.status (a `tags.RunStatus`)

(the names are those of `mutransfer.tags`) and holds the trainer's metrics, among them `final/eval_loss`,
`final/eval_top1`, `final/train_loss`, and its resolved config as params.

Reading back is strict: a run that lacks one of these is an error naming the run, never a default. Runs
recorded before the batch and length tags existed are read from the config the run itself logged as params
(global batch = data.batch_size x optim.accumulation x world_size, length = run.steps): that is exactly what
the run trained with. Only where those params are missing too (or the run trained by epochs) is it an error;
the study's current config is never used, since it may have changed since the run.
"""

from __future__ import annotations

import math
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
                key: str | None = None) -> list[Trial]:
    """Every run of a study (proxies by default; those of one trial `key`), newest first for each trial key.
    StoredRunError names the first run that lacks a field."""
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
    return [Trial(run_id=run.info.run_id, key=run.data.tags.get(tags.TRIAL_KEY, run.info.run_id),
                  role=run.data.tags.get(tags.ROLE, ""), spec=stored_spec(run),
                  status=run.data.tags.get(tags.STATUS, "unknown"), metrics=dict(run.data.metrics),
                  params=dict(run.data.params))
            for run in runs]


def stored_spec(run) -> TrialSpec:
    """The TrialSpec a stored run trained, from its tags (batch and length from its logged config for runs
    recorded before those tags existed)."""
    found, params = run.data.tags, run.data.params

    def read(tag: str, kind: type, fallback: Any = None) -> Any:
        raw = found.get(tag, fallback)
        try:
            if raw is None:
                raise ValueError("missing")
            return kind(float(raw)) if kind is int else kind(raw)
        except (TypeError, ValueError):
            raise StoredRunError(f"run {run.info.run_id} ({found.get(tags.TRIAL_KEY, run.info.run_name)}) has no "
                                 f"valid tag {tag} (got {raw!r}): it was not recorded by this version of "
                                 "mutransfer; delete it or tag it") from None

    label = found.get(tags.VARIANT) or found.get(tags.PARAMETRIZATION)
    return TrialSpec(variant=read(tags.VARIANT, str, label), width=read(tags.WIDTH, int),
                     depth=read(tags.DEPTH, int), batch_size=read(tags.BATCH_SIZE, int, _logged_batch(params)),
                     steps=read(tags.STEPS, int, params.get("run.steps")), lr=read(tags.LR, float),
                     momentum=read(tags.MOMENTUM, float),
                     weight_decay=read(tags.WEIGHT_DECAY, float, params.get("optim.weight_decay")),
                     seed=read(tags.SEED, int, params.get("run.seed")))


def _logged_batch(params: dict[str, str]) -> str | None:
    """The global batch from a run's logged config, or None where it did not log one."""
    try:
        return str(int(params["data.batch_size"]) * int(params["optim.accumulation"]) * int(params["world_size"]))
    except (KeyError, ValueError):
        return None


def latest_per_key(trials: list[Trial]) -> list[Trial]:
    """One trial per key: a finished or diverged one if any, else the newest."""
    chosen: dict[str, Trial] = {}
    for trial in trials:  # newest first
        current = chosen.get(trial.key)
        if current is None or (current.status not in (RunStatus.FINISHED, RunStatus.DIVERGED)
                               and trial.status in (RunStatus.FINISHED, RunStatus.DIVERGED)):
            chosen[trial.key] = trial
    return list(chosen.values())
