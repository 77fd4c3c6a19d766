"""The numbers behind a transfer verdict: where an optimum sits on a grid, and how it moves with size.

Pure functions on floats (no MLflow, no trials), all in log2 units: log2(lr) for learning rates,
log2(1 - beta) for SGD momentum or Adam beta1, log2(width) and log2(depth) for shapes.

- `fit_optimum`: the minimum of one loss curve, from the least-squares parabola through the best grid point
  and its neighbours, up to `NEIGHBOURS` on each side. Short training makes curves rough (adjacent learning
  rates differ by more than their trend): on the ViT depth study, two neighbours a side cut the spread of
  the optimum over seeds from 0.69 to 0.44 log2 against one a side. The vertex stays within one grid step of
  the best point and within the finite points used, so it never lands where training diverged. A best
  point at either end of the grid is flagged as an edge and reported as the grid value: the true optimum
  may lie beyond it, so it is a bound, never a fitted optimum.
- `fit_trend`: least squares of optima (one per seed and shape) against log2 of each axis that varies (width,
  depth, batch, length), with standard errors from the residuals, and the prediction (with its standard
  error) at any other shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

PARABOLA, GRID = "parabola", "grid"  # how an optimum was found
NEIGHBOURS = 2  # grid points a side that the parabola is fitted through
LOW, HIGH = "low", "high"  # which end of the grid a best point sits on


@dataclass(frozen=True)
class CurveOptimum:
    """The optimum of one curve: `x` in log2 units; `value` the best grid value (the least-squares parabola's
    own minimum undershoots sharp curves, down to negative losses, so it is not reported)."""

    x: float
    value: float
    how: str  # PARABOLA, or GRID where no parabola applies (edge, too few finite points, no curvature)
    edge: str = ""  # LOW / HIGH when the best grid point is the grid's first / last point


def fit_optimum(xs: list[float], values: list[float], neighbours: int = NEIGHBOURS) -> CurveOptimum | None:
    """Minimum of a curve sampled at increasing `xs`; non-finite values are diverged points, never best.

    None when every point diverged.
    """
    if len(xs) != len(values) or any(b <= a for a, b in zip(xs, xs[1:])):
        raise ValueError("fit_optimum needs strictly increasing xs, one value each")
    finite = [i for i, v in enumerate(values) if math.isfinite(v)]
    if not finite:
        return None
    best = min(finite, key=lambda i: values[i])
    if best == 0 or best == len(xs) - 1:
        return CurveOptimum(xs[best], values[best], GRID, LOW if best == 0 else HIGH)
    window = [i for i in range(best - neighbours, best + neighbours + 1) if 0 <= i < len(xs) and i in finite]
    if len(window) < 3:
        return CurveOptimum(xs[best], values[best], GRID)
    a, b, _ = np.polyfit([xs[i] for i in window], [values[i] for i in window], 2)
    if a <= 0:  # no curvature to place the minimum by
        return CurveOptimum(xs[best], values[best], GRID)
    low, high = max(xs[best - 1], xs[window[0]]), min(xs[best + 1], xs[window[-1]])
    return CurveOptimum(float(np.clip(-b / (2 * a), low, high)), values[best], PARABOLA)


@dataclass(frozen=True)
class SeedSummary:
    """Optima of one shape's curves, one per seed: their mean and spread."""

    per_seed: tuple[CurveOptimum, ...]

    @property
    def x(self) -> float:
        return float(np.mean([o.x for o in self.per_seed]))

    @property
    def spread(self) -> float:
        """Standard deviation over seeds (0 with one seed)."""
        return float(np.std([o.x for o in self.per_seed], ddof=1)) if len(self.per_seed) > 1 else 0.0

    @property
    def value(self) -> float:
        return float(np.mean([o.value for o in self.per_seed]))

    @property
    def edges(self) -> tuple[str, ...]:
        """The grid edges that some seed's best point sits on ('low', 'high')."""
        return tuple(sorted({o.edge for o in self.per_seed if o.edge}))


@dataclass(frozen=True)
class Trend:
    """y = intercept + slope[axis] * log2(axis) for each axis that varies among the observations.

    `slopes` and `errors` (standard errors) are in y's log2 units per doubling of the axis; an axis that
    does not vary has no slope. `dof` is observations minus coefficients: with dof 0 the errors are inf.
    """

    axes: tuple[str, ...]
    coefficients: tuple[float, ...]  # intercept, then one per axis
    covariance: tuple[tuple[float, ...], ...]
    observations: int
    dof: int
    residual_std: float
    slopes: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)

    def significant(self, axis: str, z: float = 2.0) -> bool:
        """Whether the slope is more than `z` standard errors from zero."""
        return axis in self.slopes and abs(self.slopes[axis]) > z * self.errors[axis]

    def predict(self, shape: dict[str, float]) -> tuple[float, float]:
        """(prediction, its standard error) at `shape` = {axis: size}; axes the trend lacks are flat."""
        row = np.array([1.0] + [math.log2(shape[axis]) for axis in self.axes])
        cov = np.array(self.covariance)
        return float(row @ np.array(self.coefficients)), float(math.sqrt(max(row @ cov @ row, 0.0)))


def fit_trend(sizes: list[dict[str, float]], ys: list[float], axes: tuple[str, ...] = ("width", "depth")) -> Trend:
    """Least squares of `ys` against log2 of each axis in `axes` that takes more than one value."""
    if len(sizes) != len(ys) or not ys:
        raise ValueError("fit_trend needs one size per observation, and at least one observation")
    used = tuple(a for a in axes if len({s[a] for s in sizes}) > 1)
    design = np.array([[1.0] + [math.log2(s[a]) for a in used] for s in sizes])
    y = np.array(ys, dtype=float)
    coefficients, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = len(ys) - design.shape[1]
    residual = y - design @ coefficients
    variance = float(residual @ residual) / dof if dof > 0 else math.inf
    inverse = np.linalg.pinv(design.T @ design)
    covariance = inverse * variance if dof > 0 else np.full_like(inverse, math.inf)
    return Trend(
        axes=used, coefficients=tuple(float(c) for c in coefficients),
        covariance=tuple(tuple(float(v) for v in row) for row in covariance), observations=len(ys), dof=dof,
        residual_std=math.sqrt(variance) if dof > 0 else math.inf,
        slopes={a: float(coefficients[i + 1]) for i, a in enumerate(used)},
        errors={a: math.sqrt(max(covariance[i + 1][i + 1], 0.0)) for i, a in enumerate(used)},
    )


def flat_where_insignificant(sizes: list[dict[str, float]], ys: list[float], z: float = 2.0,
                             axes: tuple[str, ...] = ("width", "depth")) -> Trend:
    """The trend refitted without the axes whose slope is within `z` standard errors of zero.

    What `transfer` extrapolates with: a slope indistinguishable from zero, carried over several doublings,
    adds its noise to the prediction; treated as flat, every proxy's optimum informs the target equally.
    """
    full = fit_trend(sizes, ys, axes)
    kept = tuple(a for a in full.axes if full.significant(a, z))
    return full if kept == full.axes else fit_trend(sizes, ys, kept)
