"""Where the optimum sits for each proxy shape, and how it moves with size: the evidence that transfer holds.

Grid view (`optimum_per_shape`, `shifts`): the best grid point of the seed-averaged curves, for plots and
`transfer --from largest`. Fitted view (`fit_shapes`, `trends`): each seed's optimum fitted between grid
points (`fit.fit_optimum`), and the seed-averaged curve's optimum; per variant one law, fitted jointly
over every shape and seed: the optimum's log2(lr) linear in log2 of each axis the study varied (width, depth,
global batch, training length), each slope judged by `AxisVerdict` against a tolerance per doubling, with its
analytic standard error and a bootstrap over seeds as a check.

Length is measured in samples, except where the study varied the batch at a fixed number of steps: there it
is measured in steps, so that the batch slope means "at fixed steps" (in samples the two would be one axis).
At a fixed batch the two units give the same length slope.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from . import fit
from .store import MAXIMISED, Trial
from .trial import Shape

Point = tuple[float, float, float]  # (lr, momentum, weight_decay)
AXES = ("width", "depth", "batch", "length")
SHAPE_AXES = ("width", "depth")  # what a parametrization promises to transfer across
SAMPLES, STEPS = "samples", "steps"  # the units a length is measured in


@dataclass(frozen=True)
class Optimum:
    shape: Shape
    lr: float
    momentum: float
    weight_decay: float
    value: float
    trials: int  # grid points with a finite value at this shape
    lr_step: int  # index of lr in the study's sorted lr grid
    momentum_step: int


def better(metric: str):
    return max if metric in MAXIMISED else min


def mean_over_seeds(trials: list[Trial], metric: str) -> dict[Shape, dict[Point, float]]:
    """metric per shape and grid point, averaged over seeds; a diverged seed makes the point diverged."""
    values: dict[Shape, dict[Point, list[float]]] = defaultdict(lambda: defaultdict(list))
    for trial in trials:
        values[trial.shape][trial.spec.point].append(trial.value(metric))
    worst = -math.inf if metric in MAXIMISED else math.inf

    def mean(seeds: list[float]) -> float:
        return sum(seeds) / len(seeds) if all(math.isfinite(x) for x in seeds) else worst

    return {shape: {point: mean(seeds) for point, seeds in points.items()} for shape, points in values.items()}


def grids(trials: list[Trial]) -> tuple[list[float], list[float], list[float]]:
    """The sorted lr, momentum and weight-decay values the study used."""
    return (sorted({t.spec.lr for t in trials}), sorted({t.spec.momentum for t in trials}),
            sorted({t.spec.weight_decay for t in trials}))


def optimum_per_shape(trials: list[Trial], metric: str) -> dict[Shape, Optimum]:
    """The best (lr, momentum, weight decay) of each shape; shapes whose trials all diverged are left out."""
    lr_grid, momentum_grid, _ = grids(trials)
    pick = better(metric)
    out: dict[Shape, Optimum] = {}
    for shape, points in mean_over_seeds(trials, metric).items():
        finite = {p: v for p, v in points.items() if math.isfinite(v)}
        if not finite:
            continue
        point = pick(finite, key=lambda p: finite[p])
        out[shape] = Optimum(shape, point[0], point[1], point[2], finite[point], len(finite),
                             lr_grid.index(point[0]), momentum_grid.index(point[1]))
    return dict(sorted(out.items()))


def proxy_size(shape: Shape) -> tuple[int, ...]:
    """Order of proxy shapes: width x depth, then width, then depth, then length in samples, then batch."""
    return (shape.width * shape.depth, shape.width, shape.depth, shape.samples, shape.batch_size)


def length_unit(shapes: list[Shape]) -> str:
    """steps where the batch varies at one number of steps (the batch slope is then 'at fixed steps'), else
    samples."""
    if len({s.batch_size for s in shapes}) > 1 and len({s.steps for s in shapes}) == 1:
        return STEPS
    return SAMPLES


def axis_sizes(shape: Shape, unit: str = SAMPLES) -> dict[str, float]:
    """{axis: size} of a shape, its length in `unit`."""
    return {"width": shape.width, "depth": shape.depth, "batch": shape.batch_size,
            "length": shape.samples if unit == SAMPLES else shape.steps}


def reference_shape(shapes: list[Shape], variant: str) -> Shape | None:
    """The smallest proxy of a variant: where shifts are measured from."""
    own = [s for s in shapes if s.variant == variant]
    return min(own, key=proxy_size) if own else None


def shifts(optima: dict[Shape, Optimum]) -> dict[Shape, tuple[int, int]]:
    """(lr grid steps, momentum grid steps) of each shape's optimum from its variant's smallest shape."""
    out = {}
    for shape, opt in optima.items():
        ref = optima[reference_shape(list(optima), shape.variant)]
        out[shape] = (opt.lr_step - ref.lr_step, opt.momentum_step - ref.momentum_step)
    return out


# --- fitted optima --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeFit:
    """A shape's fitted optimum: lr in log2(lr), momentum in log2(1 - momentum), each over seeds."""

    shape: Shape
    lr: fit.SeedSummary
    momentum: fit.SeedSummary | None  # None when the study used one momentum
    momentum_grid_value: float  # the momentum the lr curves were read at when not fitted
    weight_decay: float
    seed_ids: tuple[int, ...] = ()  # the seed of each of lr.per_seed
    mean_curve: fit.CurveOptimum | None = None  # the optimum of the seed-averaged lr curve

    @property
    def lr_value(self) -> float:
        return 2.0**self.lr.x

    @property
    def momentum_value(self) -> float:
        return 1.0 - 2.0**self.momentum.x if self.momentum else self.momentum_grid_value

    @property
    def seeds(self) -> int:
        return len(self.lr.per_seed)


def _curve(points: dict[Point, float], axis: int, fixed: Point, grid: list[float]) -> list[float]:
    """Values along one grid axis with the other coordinates held at `fixed`; missing points never win."""
    def at(v: float) -> Point:
        return tuple(v if i == axis else fixed[i] for i in range(3))  # type: ignore[return-value]

    return [points.get(at(v), math.inf) for v in grid]


def _fit_seed(points: dict[Point, float], lr_grid: list[float], momentum_grid: list[float]
              ) -> tuple[fit.CurveOptimum, fit.CurveOptimum | None, Point] | None:
    """One seed's curves (values already sign-flipped so that lower is better): fitted lr and momentum."""
    finite = {p: v for p, v in points.items() if math.isfinite(v)}
    if not finite:
        return None
    best = min(finite, key=lambda p: finite[p])
    lr_opt = fit.fit_optimum([math.log2(v) for v in lr_grid], _curve(points, 0, best, lr_grid))
    momentum_opt = None
    if len(momentum_grid) > 1:  # x = log2(1 - m) increases as m falls: read the grid backwards
        grid = sorted(momentum_grid, reverse=True)
        momentum_opt = fit.fit_optimum([math.log2(1 - m) for m in grid], _curve(points, 1, best, grid))
    return lr_opt, momentum_opt, best


def fit_shapes(trials: list[Trial], metric: str) -> dict[Shape, ShapeFit]:
    """Each shape's optimum fitted per seed, then averaged; shapes where every seed diverged are left out."""
    lr_grid, momentum_grid, _ = grids(trials)
    sign = -1.0 if metric in MAXIMISED else 1.0
    by_seed: dict[Shape, dict[int, dict[Point, float]]] = defaultdict(lambda: defaultdict(dict))
    for t in trials:
        by_seed[t.shape][t.spec.seed][t.spec.point] = sign * t.value(metric)
    out = {}
    for shape, seeds in sorted(by_seed.items()):
        fitted = {seed: _fit_seed(points, lr_grid, momentum_grid) for seed, points in sorted(seeds.items())}
        fits = [f for f in fitted.values() if f]
        if not fits:
            continue
        lr = fit.SeedSummary(tuple(_signed(f[0], sign) for f in fits))
        momentum = fit.SeedSummary(tuple(_signed(f[1], sign) for f in fits)) if fits[0][1] else None
        mean = _fit_seed(_seed_mean(list(seeds.values())), lr_grid, [])
        out[shape] = ShapeFit(shape, lr, momentum, fits[0][2][1], fits[0][2][2],
                              tuple(seed for seed, f in fitted.items() if f), mean and _signed(mean[0], sign))
    return out


def _seed_mean(seeds: list[dict[Point, float]]) -> dict[Point, float]:
    """The seed-averaged values (already signed so that lower is better); a point any seed lacks or diverged
    at is diverged."""
    points = set().union(*seeds)
    return {p: sum(s.get(p, math.inf) for s in seeds) / len(seeds) for p in points}


def _signed(optimum: fit.CurveOptimum, sign: float) -> fit.CurveOptimum:
    return fit.CurveOptimum(optimum.x, sign * optimum.value, optimum.how, optimum.edge)


# --- trends and verdicts ----------------------------------------------------------------------------------
TOLERANCE_PER_DOUBLING = 0.5 / 3  # 0.5 log2 over x8 (three doublings): the bar a parametrization must meet
BOOTSTRAP_RESAMPLES = 400


@dataclass(frozen=True)
class AxisVerdict:
    """How the optimum moves along one axis across a variant's proxies."""

    axis: str
    slope: float  # log2 units per doubling
    error: float  # its standard error (the larger of the analytic one and the bootstrap over seeds)
    doublings: float  # the proxies' range along the axis, in doublings
    outcome: str  # holds | drifts | unclear

    @property
    def drift(self) -> float:
        """How far the optimum moves across the proxies' range (log2 units)."""
        return self.slope * self.doublings


def judge(axis: str, slope: float, error: float, doublings: float,
          tolerance: float = TOLERANCE_PER_DOUBLING) -> AxisVerdict:
    """drifts: beyond the tolerance and over two standard errors from zero; holds: within the tolerance and
    measured to within it; unclear: neither (more seeds, or a finer grid, would tell)."""
    if abs(slope) > tolerance and abs(slope) > 2 * error:
        outcome = "drifts"
    elif abs(slope) <= tolerance and error <= tolerance:
        outcome = "holds"
    else:
        outcome = "unclear"
    return AxisVerdict(axis, slope, error, doublings, outcome)


@dataclass(frozen=True)
class VariantTrend:
    """One variant's proxies: how the fitted lr (and momentum) optimum and its loss move along every
    axis the study varied, as one law fitted over every shape and seed."""

    variant: str
    lr: fit.Trend
    momentum: fit.Trend | None
    loss: fit.Trend
    verdicts: dict[str, AxisVerdict]  # per varying axis, for the lr
    momentum_verdicts: dict[str, AxisVerdict]
    edge_optima: int  # seed optima at a grid edge (bounds, not fits)
    observations: int
    sizes: dict[str, tuple[float, float]]  # axis -> (smallest, largest) proxy
    length_unit: str = SAMPLES
    bootstrap_errors: dict[str, float] = field(default_factory=dict)  # per axis, over seeds (nan: < 3 seeds)
    mean_curve_lr: fit.Trend | None = None  # the law fitted to the seed-averaged curves' optima

    @property
    def bigger_is_better(self) -> dict[str, bool]:
        """Per varying axis where it applies (not the batch at a fixed number of samples): whether the loss at
        the optimum falls as the proxies grow."""
        return {axis: slope < 0 for axis, slope in self.loss.slopes.items()
                if axis != "batch" or self.length_unit == STEPS}

    @property
    def transfers(self) -> bool | None:
        """True when every varying shape axis (width, depth: what a parametrization promises) holds, False
        when any drifts, None otherwise (or neither varies). Batch and length move the optimum under every
        parametrization; the law extrapolates them and `schedule_sentence` says how."""
        outcomes = {v.outcome for a, v in self.verdicts.items() if a in SHAPE_AXES}
        if "drifts" in outcomes:
            return False
        return True if outcomes == {"holds"} else None


def observations(fits: list[ShapeFit], pick, unit: str = SAMPLES, seeds: list[int] | None = None
                 ) -> tuple[list[dict[str, float]], list[float]]:
    """(sizes, values): one observation per seed optimum, `pick(fit)` giving a shape's per-seed values; with
    `seeds`, only those seeds' (a seed listed twice counts twice: a bootstrap resample)."""
    sizes, ys = [], []
    for f in fits:
        values = dict(zip(f.seed_ids, pick(f))) if seeds is not None else None
        for value in pick(f) if seeds is None else [values[s] for s in seeds if s in values]:
            sizes.append(axis_sizes(f.shape, unit))
            ys.append(value)
    return sizes, ys


def lr_observations(fits: list[ShapeFit], unit: str, seeds: list[int] | None = None):
    return observations(fits, lambda f: [o.x for o in f.lr.per_seed], unit, seeds)


def bootstrap_errors(fits: list[ShapeFit], unit: str, axes: tuple[str, ...],
                     resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, float]:
    """The spread of each slope over resamples of the seeds (with replacement; a seed keeps all its shapes):
    what the law's error is when seeds, not single optima, are the independent draws. nan under 3 seeds."""
    import numpy as np

    seeds = sorted({s for f in fits for s in f.seed_ids})
    if len(seeds) < 3:
        return {axis: math.nan for axis in axes}
    rng = np.random.default_rng(0)
    slopes: dict[str, list[float]] = {axis: [] for axis in axes}
    for _ in range(resamples):
        drawn = [int(s) for s in rng.choice(seeds, size=len(seeds))]
        trend = fit.fit_trend(*lr_observations(fits, unit, drawn), axes)
        for axis in axes:
            slopes[axis].append(trend.slopes.get(axis, math.nan))
    return {axis: float(np.nanstd(values, ddof=1)) for axis, values in slopes.items()}


def _verdicts(trend: fit.Trend, sizes: dict[str, tuple[float, float]],
              extra_errors: dict[str, float] | None = None) -> dict[str, AxisVerdict]:
    def error(axis: str) -> float:
        other = (extra_errors or {}).get(axis, math.nan)
        return max(trend.errors[axis], other) if math.isfinite(other) else trend.errors[axis]

    return {axis: judge(axis, trend.slopes[axis], error(axis), math.log2(sizes[axis][1] / sizes[axis][0]))
            for axis in trend.axes}


def trend_of(variant: str, fits: list[ShapeFit]) -> VariantTrend:
    """Fit one variant's law over every shape and seed (each seed's optimum is one observation)."""
    unit = length_unit([f.shape for f in fits])
    sizes, lr_ys = lr_observations(fits, unit)
    lr = fit.fit_trend(sizes, lr_ys, AXES)
    momentum = None
    if all(f.momentum for f in fits):
        momentum = fit.fit_trend(*observations(fits, lambda f: [o.x for o in f.momentum.per_seed], unit), AXES)
    loss = fit.fit_trend(*observations(fits, lambda f: [o.value for o in f.lr.per_seed], unit), AXES)
    means = [f for f in fits if f.mean_curve]
    mean_curve = fit.fit_trend([axis_sizes(f.shape, unit) for f in means], [f.mean_curve.x for f in means],
                               lr.axes) if means else None
    ranges = {a: (min(s[a] for s in sizes), max(s[a] for s in sizes)) for a in AXES}
    boot = bootstrap_errors(fits, unit, lr.axes)
    return VariantTrend(
        variant, lr, momentum, loss, _verdicts(lr, ranges, boot),
        _verdicts(momentum, ranges) if momentum else {},
        edge_optima=sum(1 for f in fits for o in f.lr.per_seed if o.edge), observations=len(lr_ys), sizes=ranges,
        length_unit=unit, bootstrap_errors=boot, mean_curve_lr=mean_curve,
    )


def trends(fits: dict[Shape, ShapeFit]) -> dict[str, VariantTrend]:
    """A trend per variant."""
    variants = sorted({shape.variant for shape in fits})
    return {v: trend_of(v, [f for s, f in fits.items() if s.variant == v]) for v in variants}


# --- in words -------------------------------------------------------------------------------------------
def _moves(slope: float) -> str:
    return f"{'rises' if slope > 0 else 'falls'} {abs(slope):.2f}"


def axis_sentence(verdict: AxisVerdict, sizes: tuple[float, float], what: str = "optimal lr") -> str:
    """'depth: the optimal lr falls 0.40 +- 0.08 log2 per doubling; across the proxies (2 -> 16) it moves
    -1.20 log2: drifts'."""
    small, large = sizes
    return (f"{verdict.axis}: the {what} {_moves(verdict.slope)} +- {verdict.error:.2f} log2 per doubling; "
            f"across the proxies ({small:g} -> {large:g}) it moves {verdict.drift:+.2f} log2: {verdict.outcome}")


def target_sentence(trend: VariantTrend, target: dict[str, float], what: str = "optimal lr") -> list[str]:
    """Per varying axis: how far the target lies beyond the largest proxy and where the trend puts its optimum."""
    lines = []
    for axis, verdict in trend.verdicts.items():
        beyond = math.log2(target[axis] / trend.sizes[axis][1])
        lines.append(f"at the target's {axis} ({target[axis]:g}, {beyond:+.1f} doublings from your largest proxy) "
                     f"the trend puts the {what} {verdict.slope * beyond:+.2f} log2 from the largest proxy's")
    return lines


def summary_sentence(trend: VariantTrend) -> str:
    """One line a user can act on: transfers, drifts (which axis, how much), or cannot tell yet."""
    worse = [axis for axis, better in trend.bigger_is_better.items() if not better]
    caveat = (f" Warning: the loss at the optimum does not fall with {' and '.join(worse)}, so this study cannot "
              "judge transfer along it." if worse else "")
    drifting = [v for a, v in trend.verdicts.items() if v.outcome == "drifts" and a in SHAPE_AXES]
    if trend.transfers:
        head = f"{trend.variant}: transfers (every slope within {TOLERANCE_PER_DOUBLING:.2f} log2 per doubling)."
    elif drifting:
        parts = [f"{v.axis} {v.slope:+.2f} log2 per doubling" for v in drifting]
        head = f"{trend.variant}: drifts ({', '.join(parts)}): tune at the target's size or extrapolate."
    elif not any(a in SHAPE_AXES for a in trend.verdicts):
        head = f"{trend.variant}: one proxy width and depth only, nothing to compare."
    else:
        head = f"{trend.variant}: cannot tell yet (the slopes' errors exceed the tolerance): add seeds."
    edges = (f" {trend.edge_optima} of {trend.observations} seed optima sit on a grid edge (bounds, not fits): "
             "widen the lr grid." if trend.edge_optima else "")
    return head + schedule_sentence(trend) + edges + caveat


def schedule_sentence(trend: VariantTrend) -> str:
    """' The optimum moves with length (-0.22 +- 0.03 log2 per doubling): transfer extrapolates it.' for the
    batch and length axes whose slope is significant; '' otherwise."""
    moving = [v for a, v in trend.verdicts.items() if a not in SHAPE_AXES and abs(v.slope) > 2 * v.error]
    if not moving:
        return ""
    parts = [f"{v.axis} ({v.slope:+.2f} +- {v.error:.2f} log2 per doubling)" for v in moving]
    return f" The optimum moves with {' and '.join(parts)}: transfer extrapolates it to the target's."
