"""An extrapolation that checks itself: leave out the largest value of each axis a study varied, fit the law
to the rest, predict the left-out shapes' optima, and compare.

For each left-out shape the miss is its observed optimum (the mean of its seeds' fitted log2 lr) minus the
prediction; the 95 % interval is t(0.975, dof) x sqrt(se_prediction^2 + residual^2 / seeds), the interval of
a mean of that many seeds under the law fitted without them. Coverage is the share of left-out shapes inside
their interval: a law that extrapolates covers about 95 %; misses beyond their intervals say that it does
not (tune closer to the target). An axis needs three values (two left to fit a slope on) to be checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import fit
from .analysis import AXES, ShapeFit, axis_sizes, length_unit, lr_observations
from .trial import Shape

# two-sided 95 % quantiles of Student's t by degrees of freedom (beyond the table: the normal's 1.96)
T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 12: 2.18,
         15: 2.13, 20: 2.09, 30: 2.04, 60: 2.00}


def t_975(dof: int) -> float:
    """Student's t quantile for a two-sided 95 % interval (the next smaller tabulated dof: conservative)."""
    if dof < 1:
        return math.inf
    return T_975[max(d for d in T_975 if d <= dof)] if dof <= 60 else 1.96


@dataclass(frozen=True)
class HeldOut:
    """One left-out shape: its observed optimum against the law fitted without the largest value of `axis`."""

    axis: str
    shape: Shape
    size: float  # the left-out value of `axis`
    observed: float  # log2 lr, mean over seeds
    predicted: float
    interval: float  # half-width of the 95 % interval (inf where the rest leaves no residual to judge by)

    @property
    def miss(self) -> float:
        return self.observed - self.predicted

    @property
    def within(self) -> bool:
        return abs(self.miss) <= self.interval


def held_out(fits: list[ShapeFit]) -> list[HeldOut]:
    """One parametrization's shapes: for each axis with three or more values, the shapes at its largest value
    predicted from the others."""
    unit = length_unit([f.shape for f in fits])
    out = []
    for axis in AXES:
        values = sorted({axis_sizes(f.shape, unit)[axis] for f in fits})
        if len(values) < 3:
            continue
        rest = [f for f in fits if axis_sizes(f.shape, unit)[axis] < values[-1]]
        law = fit.fit_trend(*lr_observations(rest, unit), AXES)
        for f in (f for f in fits if axis_sizes(f.shape, unit)[axis] == values[-1]):
            predicted, error = law.predict(axis_sizes(f.shape, unit))
            spread = error**2 + law.residual_std**2 / len(f.lr.per_seed) if law.dof > 0 else math.inf
            out.append(HeldOut(axis, f.shape, values[-1], f.lr.x, predicted, t_975(law.dof) * math.sqrt(spread)))
    return out


def coverage(checks: list[HeldOut]) -> float:
    """The share of left-out shapes inside their 95 % interval (nan when nothing was checked)."""
    return sum(c.within for c in checks) / len(checks) if checks else math.nan


def sentence(checks: list[HeldOut]) -> str:
    """'held-out check: 3 of 4 left-out shapes within their 95 % interval (coverage 75 %); worst miss ...'"""
    if not checks:
        return "held-out check: no axis has three values, nothing to leave out"
    worst = max(checks, key=lambda c: abs(c.miss) / c.interval if c.interval else math.inf)
    return (f"held-out check: {sum(c.within for c in checks)} of {len(checks)} left-out shapes within their 95 % "
            f"interval (coverage {coverage(checks):.0%}); worst miss {worst.miss:+.2f} log2 against +-"
            f"{worst.interval:.2f} ({worst.axis} {worst.size:g} left out)")
