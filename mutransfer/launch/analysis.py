"""Where the optimum sits for each proxy shape, and how far it moves: the evidence that transfer holds."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from .store import MAXIMISED, Trial

Shape = tuple[str, int, int]  # (parametrization, width, depth)
Point = tuple[float, float, float]  # (lr, momentum, weight_decay)


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
        values[trial.shape][(trial.lr, trial.momentum, trial.weight_decay)].append(trial.value(metric))
    worst = -math.inf if metric in MAXIMISED else math.inf

    def mean(seeds: list[float]) -> float:
        return sum(seeds) / len(seeds) if all(math.isfinite(x) for x in seeds) else worst

    return {shape: {point: mean(seeds) for point, seeds in points.items()} for shape, points in values.items()}


def grids(trials: list[Trial]) -> tuple[list[float], list[float], list[float]]:
    """The sorted lr, momentum and weight-decay values the study used."""
    return (sorted({t.lr for t in trials}), sorted({t.momentum for t in trials}),
            sorted({t.weight_decay for t in trials}))


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


def proxy_size(shape: Shape) -> tuple[int, int, int]:
    """Order of proxy shapes: width x depth, then width, then depth."""
    return (shape[1] * shape[2], shape[1], shape[2])


def reference_shape(shapes: list[Shape], parametrization: str) -> Shape | None:
    """The smallest proxy of a parametrization: where shifts are measured from."""
    own = [s for s in shapes if s[0] == parametrization]
    return min(own, key=proxy_size) if own else None


def shifts(optima: dict[Shape, Optimum]) -> dict[Shape, tuple[int, int]]:
    """(lr grid steps, momentum grid steps) of each shape's optimum from its parametrization's smallest shape."""
    out = {}
    for shape, opt in optima.items():
        ref = optima[reference_shape(list(optima), shape[0])]
        out[shape] = (opt.lr_step - ref.lr_step, opt.momentum_step - ref.momentum_step)
    return out


def verdicts(optima: dict[Shape, Optimum], shift: dict[Shape, tuple[int, int]]) -> dict[str, dict[str, Any]]:
    """Per parametrization: the largest |lr shift| and |momentum shift| in grid steps, and whether transfer
    holds (every lr shift within one grid step). `holds` is None with a single shape: nothing to compare."""
    out: dict[str, dict[str, Any]] = {}
    for param in sorted({s[0] for s in optima}):
        own = [s for s in optima if s[0] == param]
        worst = max(own, key=lambda s: (abs(shift[s][0]), s))
        out[param] = {
            "shapes": len(own),
            "reference": reference_shape(own, param),
            "max_lr_shift": abs(shift[worst][0]),
            "max_lr_shift_shape": worst,
            "max_momentum_shift": max(abs(shift[s][1]) for s in own),
            "holds": None if len(own) < 2 else abs(shift[worst][0]) <= 1,
        }
    return out
