"""One study's analysis, computed once from its trials: the object `report`, `transfer` and the demo all read,
so that the tables, the verdict and the transferred lr come from the same trials, the same filter and the same
fits.

The filter is one: a study's proxy trials as `store.load_trials` reads them (strictly: a trial without a valid
identity is an error, never a default), one per trial key (`store.latest_per_key`). Everything else is computed
from those by `analysis` and `holdout`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mutransfer.errors import UsageError
from mutransfer.tags import RunStatus

from . import analysis, holdout
from .analysis import Optimum, Point, ShapeFit, VariantTrend
from .store import MAXIMISED, Trial, find_study_run, latest_per_key, load_trials
from .trial import Shape


@dataclass(frozen=True)
class StudyAnalysis:
    """A study's trials and everything fitted from them. Build it with `load` (from MLflow) or `of` (from
    trials at hand)."""

    name: str
    """The study's name."""
    metric: str
    trials: list[Trial]
    """The proxies analysed: one per trial key."""
    per_shape: dict[Shape, dict[Point, float]]
    """The metric per shape and grid point, averaged over seeds (a diverged seed makes the point diverged)."""
    optima: dict[Shape, Optimum]
    """Each shape's best grid point (shapes where every point diverged are left out)."""
    shifts: dict[Shape, tuple[int, int]]
    """Each optimum's (lr, momentum) grid steps from its variant's smallest shape."""
    fits: dict[Shape, ShapeFit]
    """Each shape's optimum fitted between grid points, per seed."""
    trends: dict[str, VariantTrend]
    """Per variant: the law of the optimum along every axis the study varied, and its verdicts."""
    heldout: dict[str, list[holdout.HeldOut]]
    """Per variant: the shapes at each axis's largest value, predicted from the others."""
    targets: list[Trial] = field(default_factory=list)
    """The study's target runs (`mutransfer transfer`), one per key: shown beside the proxies, never fitted."""
    parent: Any = None
    """The study's parent run in MLflow (None for an analysis of trials at hand)."""

    @classmethod
    def of(cls, trials: list[Trial], metric: str, name: str = "", targets: list[Trial] = (),
           parent: Any = None) -> StudyAnalysis:
        """The analysis of `trials` (one per key, as `load` passes them)."""
        optima = analysis.optimum_per_shape(trials, metric)
        fits = analysis.fit_shapes(trials, metric)
        variants = sorted({s.variant for s in fits})
        heldout = {v: holdout.held_out([f for s, f in fits.items() if s.variant == v]) for v in variants}
        return cls(name, metric, trials, analysis.mean_over_seeds(trials, metric), optima, analysis.shifts(optima),
                   fits, analysis.trends(fits), heldout, list(targets), parent)

    @classmethod
    def load(cls, client, study: str, metric: str, experiment: str | None = None) -> StudyAnalysis:
        """The analysis of a study in MLflow. UsageError for an unknown study, a study without proxy trials, or
        a metric no finished trial logged; StoredRunError for a trial whose identity is missing or malformed."""
        parent = find_study_run(client, study, experiment)
        where = f"the MLflow store at {client.tracking_uri}" + (f", experiment {experiment!r}" if experiment else "")
        if parent is None:
            raise UsageError(f"no study named {study!r} in {where}")
        trials = latest_per_key(load_trials(client, study, experiment))
        if not trials:
            raise UsageError(f"study {study!r} in {where} has no proxy trials yet")
        logged = {name for t in trials for name in t.metrics}
        if any(t.status == RunStatus.FINISHED for t in trials) and metric not in logged:
            raise UsageError(f"no trial of study {study!r} logged {metric!r}; metrics logged: "
                             + ", ".join(sorted(n for n in logged if n.startswith("final/")) or sorted(logged)))
        targets = latest_per_key(load_trials(client, study, experiment, role="target"))
        return cls.of(trials, metric, study, targets, parent)

    @property
    def variants(self) -> list[str]:
        """The variants with at least one fitted shape."""
        return sorted(self.trends)

    def fits_of(self, variant: str) -> list[ShapeFit]:
        return [f for s, f in self.fits.items() if s.variant == variant]

    def trials_of(self, variant: str) -> list[Trial]:
        return [t for t in self.trials if t.spec.variant == variant]

    def largest_fit(self, variant: str) -> ShapeFit:
        """The fitted optimum of the variant's largest proxy (`analysis.proxy_size`)."""
        return max(self.fits_of(variant), key=lambda f: analysis.proxy_size(f.shape))

    @property
    def all_diverged(self) -> list[Shape]:
        """Shapes where every grid point diverged or failed."""
        return sorted(s for s in self.per_shape if s not in self.optima)

    @property
    def chance_loss(self) -> float | None:
        """ln(num_classes) when the metric is a loss and a finished trial's logged config gives the number of
        classes: the loss of a model that has learnt nothing, where the report's plots clip."""
        if "loss" not in self.metric or self.metric in MAXIMISED:
            return None
        for trial in self.trials:
            if trial.status == RunStatus.FINISHED:
                classes = trial.params.get("data.num_classes", "")
                return math.log(int(classes)) if classes.isdigit() and int(classes) > 1 else None
        return None
