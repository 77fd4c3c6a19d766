"""The two figures that show transfer at a glance (PNG, matplotlib's object API, no global state).

- `transfer_curves`: metric vs log2(lr), one panel per variant, one curve per proxy shape (labelled by
  the axes the study varies: width, depth, batch, length), the fitted optimum of each curve starred with its
  seed spread as a horizontal bar; where several axes vary, a panel per variant and axis, its curves
  moving along that axis only. Flat transfer shows as stars stacked on one vertical line.
- `trend_figure`: a column per varying axis (width, depth, global batch, training length): the fitted
  optimum's log2(lr) against log2(size) with its seed spread and the law's slope along that axis for each
  variant (top row), and the loss at the optimum (bottom row), which must fall as the proxies grow
  (longer training must reach a lower loss) for the study to mean anything.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .analysis import AXES, Shape, ShapeFit, VariantTrend, axis_sizes, length_unit


def _size_colours(sizes: list[tuple[int, ...]]) -> dict[tuple[int, ...], Any]:
    from matplotlib import colormaps

    cmap, n = colormaps["viridis"], max(len(sizes) - 1, 1)
    return {s: cmap(0.85 * i / n) for i, s in enumerate(sorted(sizes, key=lambda s: (s[0] * s[1], s)))}


def _varying(shapes: list[Shape]) -> list[str]:
    unit = length_unit(shapes)
    return [a for a in AXES if len({axis_sizes(s, unit)[a] for s in shapes}) > 1]


def _size_label(shape: Shape, varying: list[str]) -> str:
    sizes = axis_sizes(shape, length_unit([shape]))
    return ", ".join(f"{axis} {sizes[axis]:g}" for axis in varying) or f"{shape.width} x {shape.depth}"


def _curve_panel(ax: Any, shapes: list[Shape], curves: dict[Shape, dict[float, float]], fits: dict[Shape, ShapeFit],
                 colours: dict[tuple[int, ...], Any], y_limits: tuple[float, float], varying: list[str]) -> None:
    """One panel: a curve per shape, its fitted optimum starred with the seed spread as a bar."""
    ax.grid(alpha=0.3)
    ax.set_ylim(*y_limits)
    for shape in sorted(shapes, key=lambda s: (s.width * s.depth, s)):
        colour = colours[tuple(shape[1:])]
        points = sorted((math.log2(lr), v) for lr, v in curves[shape].items() if math.isfinite(v))
        if points:
            ax.plot(*zip(*points), "-o", color=colour, markersize=3, linewidth=1.3, label=_size_label(shape, varying))
        if shape in fits:
            f = fits[shape]
            ax.errorbar([f.lr.x], [min(max(f.lr.value, y_limits[0]), y_limits[1])], xerr=[f.lr.spread],
                        marker="*", markersize=13, color=colour, markeredgecolor="black", capsize=3, zorder=5)
    ax.legend(fontsize=8, loc="upper center")


def _along(shapes: list[Shape], axis: str, varying: list[str]) -> list[Shape]:
    """The shapes that differ along `axis` only: every other varying axis at its largest value."""
    unit = length_unit(shapes)
    top = {a: max(axis_sizes(s, unit)[a] for s in shapes) for a in varying if a != axis}
    return [s for s in shapes if all(axis_sizes(s, unit)[a] == v for a, v in top.items())]


def transfer_curves(curves: dict[Shape, dict[float, float]], fits: dict[Shape, ShapeFit],
                    y_limits: tuple[float, float], metric: str, title: str, path: Path) -> None:
    """`curves`: per shape, the seed-mean metric at each lr (lr profile: best over the rest). One panel per
    variant; where several axes vary, a row per variant and a panel per axis, whose curves
    move along that axis with the others at their largest values."""
    from matplotlib.figure import Figure

    variants = sorted({s.variant for s in curves})
    varying = _varying(list(curves))
    colours = _size_colours(sorted({tuple(s[1:]) for s in curves}))
    panels = ([(v, [s for s in curves if s.variant == v], v) for v in variants] if len(varying) < 2 else
              [(v, _along([s for s in curves if s.variant == v], axis, varying), f"{v}: along {axis}")
               for v in variants for axis in varying])
    columns = min(len(panels), 3) if len(varying) < 2 else len(varying)
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(4.6 * columns + 0.4, 3.6 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, (_, shapes, name) in zip(axes, panels):
        ax.set_title(name, fontsize=10)
        _curve_panel(ax, shapes, curves, fits, colours, y_limits, varying)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-columns:]:
        ax.set_xlabel("log2 learning rate")
    for ax in axes[::columns]:
        ax.set_ylabel(metric)
    fig.suptitle(title + "\nstar: fitted optimum, bar: its spread over seeds", fontsize=11)
    fig.savefig(path, dpi=110)


def _families(own: list[ShapeFit], axis: str, unit: str, varying: list[str]) -> list[list[ShapeFit]]:
    """`own` split by the values of the other varying axes, each family sorted along `axis`: one line each."""
    groups: dict[tuple[float, ...], list[ShapeFit]] = {}
    for f in own:
        sizes = axis_sizes(f.shape, unit)
        groups.setdefault(tuple(sizes[a] for a in varying if a != axis), []).append(f)
    return [sorted(g, key=lambda f: axis_sizes(f.shape, unit)[axis]) for _, g in sorted(groups.items())]


def _log_size(f: ShapeFit, axis: str, unit: str) -> float:
    return math.log2(axis_sizes(f.shape, unit)[axis])


def _trend_column(top: Any, bottom: Any, axis: str, fits: dict[Shape, ShapeFit], trends: dict[str, VariantTrend],
                  colours: dict[str, Any], varying: list[str]) -> None:
    """One varying axis: per variant, a curve family (one line per value of the other axes) of the fitted
    optimum (top) and the loss there (bottom), and the law's slope through the mean of the points."""
    for variant, trend in sorted(trends.items()):
        own = [f for s, f in fits.items() if s.variant == variant]
        verdict = trend.verdicts.get(axis)
        name = variant + (f": {verdict.slope:+.2f}+-{verdict.error:.2f}/doubling, {verdict.outcome}" if verdict else "")
        for i, family in enumerate(_families(own, axis, trend.length_unit, varying)):
            xs = [_log_size(f, axis, trend.length_unit) for f in family]
            top.errorbar(xs, [f.lr.x for f in family], yerr=[f.lr.spread for f in family], marker="o", capsize=3,
                         linestyle=":", linewidth=0.8, color=colours[variant], label=None if i else name)
            bottom.plot(xs, [f.lr.value for f in family], "-o", color=colours[variant], markersize=4,
                        label=None if i else variant)
        if verdict:  # the law's slope along this axis, through the mean of the points
            xs = [_log_size(f, axis, trend.length_unit) for f in own]
            mid_x, mid_y = sum(xs) / len(xs), sum(f.lr.x for f in own) / len(own)
            top.plot([min(xs), max(xs)], [mid_y + verdict.slope * (x - mid_x) for x in (min(xs), max(xs))],
                     color=colours[variant], linewidth=1.6)


def trend_figure(fits: dict[Shape, ShapeFit], trends: dict[str, VariantTrend], metric: str, title: str,
                 path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    varying = _varying(list(fits)) or ["depth"]
    fig = Figure(figsize=(5.6 * len(varying) + 0.4, 7.4), layout="constrained")
    axes = fig.subplots(2, len(varying), squeeze=False, sharex="col")
    colours = {variant: colormaps["tab10"](i % 10) for i, variant in enumerate(sorted(trends))}
    for col, axis in enumerate(varying):
        top, bottom = axes[0][col], axes[1][col]
        _trend_column(top, bottom, axis, fits, trends, colours, varying)
        top.set_ylabel("fitted optimal log2 lr")
        top.set_title(f"optimum vs {axis_title(axis, trends)}", fontsize=10)
        top.legend(fontsize=7.5)
        bottom.set_ylabel(f"{metric} at the optimum")
        bottom.set_xlabel(f"log2 {axis_title(axis, trends)}")
        bottom.set_title("bigger must be better: this must fall" if axis != "batch" else
                         "loss at the optimum (need not fall with batch at fixed samples)", fontsize=10)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    fig.suptitle(title + ("\ndotted: one line per value of the other axes; solid: the law's slope"
                          if len(varying) > 1 else ""), fontsize=11)
    fig.savefig(path, dpi=110)


def axis_title(axis: str, trends: dict[str, VariantTrend]) -> str:
    """'length (samples)' or 'batch (at fixed steps)': what the axis is measured in."""
    units = {t.length_unit for t in trends.values()} or {"samples"}
    unit = units.pop() if len(units) == 1 else "samples"
    if axis == "length":
        return f"length ({unit})"
    return f"batch (at fixed {unit})" if axis == "batch" else axis
