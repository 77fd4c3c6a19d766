"""The two figures that show transfer at a glance (PNG, matplotlib's object API, no global state).

- `transfer_curves`: metric vs log2(lr), one panel per parametrization, one curve per proxy shape (labelled by
  the axes the study varies: width, depth, batch, length), the fitted optimum of each curve starred with its
  seed spread as a horizontal bar. Flat transfer shows as stars stacked on one vertical line.
- `trend_figure`: a column per varying axis (width, depth, global batch, training length): the fitted
  optimum's log2(lr) against log2(size) with its seed spread and the law's slope along that axis for each
  parametrization (top row), and the loss at the optimum (bottom row), which must fall as the proxies grow
  (longer training must reach a lower loss) for the study to mean anything.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .analysis import AXES, ParamTrend, Point, Shape, ShapeFit, axis_sizes, length_unit


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


def transfer_curves(curves: dict[Shape, dict[Point, float]], fits: dict[Shape, ShapeFit],
                    y_limits: tuple[float, float], metric: str, title: str, path: Path) -> None:
    """`curves`: per shape, the seed-mean metric at each grid point (lr profile: best over the rest)."""
    from matplotlib.figure import Figure

    labels = sorted({s[0] for s in curves})
    sizes = sorted({tuple(s[1:]) for s in curves})
    varying = _varying(list(curves))
    colours = _size_colours(sizes)
    columns = min(len(labels), 3)
    rows = math.ceil(len(labels) / columns)
    fig = Figure(figsize=(4.6 * columns + 0.4, 3.6 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, label in zip(axes, labels):
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(*y_limits)
        for shape in sorted((s for s in curves if s[0] == label), key=lambda s: (s[1] * s[2], s)):
            colour = colours[tuple(shape[1:])]
            points = sorted((math.log2(lr), v) for lr, v in curves[shape].items() if math.isfinite(v))
            if points:
                ax.plot(*zip(*points), "-o", color=colour, markersize=3, linewidth=1.3,
                        label=_size_label(shape, varying))
            if shape in fits:
                f = fits[shape]
                ax.errorbar([f.lr.x], [min(max(f.lr.value, y_limits[0]), y_limits[1])], xerr=[f.lr.spread],
                            marker="*", markersize=13, color=colour, markeredgecolor="black", capsize=3, zorder=5)
        ax.legend(fontsize=8, loc="upper center")
    for ax in axes[len(labels):]:
        ax.set_visible(False)
    for ax in axes[-columns:]:
        ax.set_xlabel("log2 learning rate")
    for ax in axes[::columns]:
        ax.set_ylabel(metric)
    fig.suptitle(title + "\nstar: fitted optimum, bar: its spread over seeds", fontsize=11)
    fig.savefig(path, dpi=110)


def trend_figure(fits: dict[Shape, ShapeFit], trends: dict[str, ParamTrend], metric: str, title: str,
                 path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    varying = _varying(list(fits)) or ["depth"]
    fig = Figure(figsize=(5.6 * len(varying) + 0.4, 7.4), layout="constrained")
    axes = fig.subplots(2, len(varying), squeeze=False, sharex="col")
    colours = {label: colormaps["tab10"](i % 10) for i, label in enumerate(sorted(trends))}
    for col, axis in enumerate(varying):
        top, bottom = axes[0][col], axes[1][col]
        for label, trend in sorted(trends.items()):
            own = sorted((f for s, f in fits.items() if s[0] == label),
                         key=lambda f: axis_sizes(f.shape, trend.length_unit)[axis])
            xs = [math.log2(axis_sizes(f.shape, trend.length_unit)[axis]) for f in own]
            verdict = trend.verdicts.get(axis)
            name = label + (f": {verdict.slope:+.2f}+-{verdict.error:.2f}/doubling, {verdict.outcome}" if verdict else "")
            top.errorbar(xs, [f.lr.x for f in own], yerr=[f.lr.spread for f in own], marker="o", capsize=3,
                         linestyle="none", color=colours[label], label=name)
            if verdict:  # the fitted line through the mean of the points
                mid_x, mid_y = sum(xs) / len(xs), sum(f.lr.x for f in own) / len(own)
                top.plot([xs[0], xs[-1]], [mid_y + verdict.slope * (x - mid_x) for x in (xs[0], xs[-1])],
                         color=colours[label], linewidth=1.2)
            bottom.plot(xs, [f.lr.value for f in own], "-o", color=colours[label], markersize=4, label=label)
        top.set_ylabel("fitted optimal log2 lr")
        top.set_title(f"optimum vs {axis_title(axis, trends)}", fontsize=10)
        top.legend(fontsize=7.5)
        bottom.set_ylabel(f"{metric} at the optimum")
        bottom.set_xlabel(f"log2 {axis_title(axis, trends)}")
        bottom.set_title("bigger must be better: this must fall", fontsize=10)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)


def axis_title(axis: str, trends: dict[str, ParamTrend]) -> str:
    """'length (samples)' or 'batch (at fixed steps)': what the axis is measured in."""
    units = {t.length_unit for t in trends.values()} or {"samples"}
    unit = units.pop() if len(units) == 1 else "samples"
    if axis == "length":
        return f"length ({unit})"
    return f"batch (at fixed {unit})" if axis == "batch" else axis
