"""The per-shape grid figures of a report: metric vs lr (or momentum) per width, one panel per variant
and depth, and the lr x momentum heat map of one shape. The y range is clipped to what matters (near the
optimum, below chance loss) and off-scale or diverged points are marked, not dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import analysis
from .analysis import Optimum, Point, Shape
from .store import MAXIMISED

# Above the clip line (below it for maximised metrics) each panel keeps a band for off-scale and diverged
# markers; diverged points sit in it as an x, values beyond the clip as a hollow triangle on the line.
MARKER_BAND = 0.16  # of the clipped value span


# --------------------------------------------------------------------------------------------------------
# numbers


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of an already sorted, non-empty list."""
    pos = (len(sorted_values) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


@dataclass(frozen=True)
class ValueRange:
    """Shared y axis of a figure: values beyond `clip` are drawn at it; the axis leaves a marker band."""

    low: float  # axis limits
    high: float
    best: float  # best finite value
    clip: float  # worst value drawn as is
    minimised: bool
    band: float  # where diverged points are marked, between the clip line and the axis end
    clip_reason: str = ""

    def clipped(self, value: float) -> float:
        return min(value, self.clip) if self.minimised else max(value, self.clip)

    def band_row(self, row: int) -> float:
        """The band, staggered per curve so that coinciding diverged markers stay apart."""
        step = 0.02 * (self.high - self.low)
        return self.band - step * row if self.minimised else self.band + step * row


def value_range(values: list[float], metric: str, chance_loss: float | None) -> ValueRange:
    """The y range shared by every panel of a figure (and the colour range of the heat maps).

    Only the worse end is clipped: near the optimum is where shapes differ and must stay readable. For a
    loss the cut is the chance level ln(num_classes), the loss of a uniform prediction: a run above it learnt
    nothing, and its exact value (often 10-100x the optimum just before diverging) would squash every curve
    into a flat line. Where the number of classes is unknown, or for other metrics, the cut is the 90th
    percentile (10th for metrics that are maximised), which leaves the worst tenth of the points off scale,
    where they are still marked.
    """
    minimised = metric not in MAXIMISED
    finite = sorted(_finite(values))
    if not finite:
        return ValueRange(0.0, 1.0, 0.0 if minimised else 1.0, 0.9 if minimised else 0.1, minimised,
                          0.95 if minimised else 0.05)
    best, worst = (finite[0], finite[-1]) if minimised else (finite[-1], finite[0])
    if minimised and chance_loss is not None and chance_loss > best:
        cut, reason = chance_loss, f"chance level ln({round(math.exp(chance_loss))})"
    else:
        cut = _percentile(finite, 0.90 if minimised else 0.10)
        reason = "90th percentile" if minimised else "10th percentile"
    if minimised:
        clip = min(worst, cut) if cut > best else worst
    else:
        clip = max(worst, cut) if cut < best else worst
    span = abs(clip - best) or max(abs(best) * 0.05, 0.05)
    direction = 1.0 if minimised else -1.0
    ends = (best - direction * 0.05 * span, clip + direction * MARKER_BAND * span)
    band = clip + direction * 0.8 * MARKER_BAND * span
    return ValueRange(min(ends), max(ends), best, clip, minimised, band, reason if clip != worst else "")


def _diverged(value: float) -> bool:
    return not math.isfinite(value)


def lr_profile(points: dict[Point, float], metric: str) -> dict[float, float]:
    """The best value at each lr over every momentum and weight decay the shape tried (diverged: +-inf)."""
    best: dict[float, float] = {}
    pick = analysis.better(metric)
    for (lr, _momentum, _wd), value in points.items():
        best[lr] = pick(best[lr], value) if lr in best else value
    return dict(sorted(best.items()))


def momentum_slice(points: dict[Point, float], optimum: Optimum) -> dict[float, float]:
    """The value at each momentum with lr and weight decay held at the shape's optimum."""
    return dict(sorted((m, v) for (lr, m, wd), v in points.items()
                       if lr == optimum.lr and wd == optimum.weight_decay))


def lr_momentum_grid(points: dict[Point, float], metric: str) -> dict[tuple[float, float], float]:
    """The best value at each (lr, momentum) over weight decays."""
    best: dict[tuple[float, float], float] = {}
    pick = analysis.better(metric)
    for (lr, momentum, _wd), value in points.items():
        key = (lr, momentum)
        best[key] = pick(best[key], value) if key in best else value
    return best


# --------------------------------------------------------------------------------------------------------
# plots


def _size_colours(sizes: list[tuple[int, ...]]) -> dict[tuple[int, ...], Any]:
    """A colour per (width, batch, steps) of a panel's curves."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    n = max(len(sizes) - 1, 1)
    # darker = narrower; stop before viridis' pale yellow end, which is hard to see on white
    return {s: cmap(0.85 * i / n) for i, s in enumerate(sorted(sizes))}


def _curve_key(shape: Shape) -> tuple[int, ...]:
    return (shape.width, shape.batch_size, shape.steps)


def _curve_name(key: tuple[int, ...], keys: list[tuple[int, ...]]) -> str:
    """'width 32', plus batch and steps where the curves differ in them."""
    parts = [f"width {key[0]}"]
    parts += [f"{name} {key[i]}" for i, name in ((1, "batch"), (2, "steps")) if len({k[i] for k in keys}) > 1]
    return ", ".join(parts)


def curve_figure(
    curves: dict[Shape, dict[float, float]],
    optimum_x: dict[Shape, float],
    y: ValueRange,
    metric: str,
    x_label: str,
    x_of: Any,
    title: str,
    path: Path,
) -> None:
    """One panel per (variant, depth), one curve per width (and batch and length where they vary);
    shared axes, clipped y."""
    from matplotlib.figure import Figure

    variants = sorted({s.variant for s in curves})
    depths = sorted({s.depth for s in curves})
    colours = _size_colours(sorted({_curve_key(s) for s in curves}))
    fig_width = max(6.5, 4.2 * len(depths) + 0.6)
    fig = Figure(figsize=(fig_width, 3.3 * len(variants) + 1.3), layout="constrained")
    axes = fig.subplots(len(variants), len(depths), sharex=True, sharey=True, squeeze=False)
    marks: set[str] = set()  # "diverged" / "clipped" where some panel shows them
    for row, variant in enumerate(variants):
        for col, depth in enumerate(depths):
            ax = axes[row][col]
            _panel_frame(ax, f"{variant}, depth {depth}", y, x_label if row == len(variants) - 1 else None,
                         metric if col == 0 else None)
            panel = sorted((s for s in curves if s.variant == variant and s.depth == depth), key=_curve_key)
            if not panel:
                ax.text(0.5, 0.5, "no trials", transform=ax.transAxes, ha="center", va="center", color="grey")
            for band_row, shape in enumerate(panel):
                points = [(x_of(x), value) for x, value in sorted(curves[shape].items())]
                best_value = curves[shape].get(optimum_x.get(shape, math.nan))
                best = (x_of(optimum_x[shape]), best_value) if best_value is not None else None
                marks |= _draw_curve(ax, points, best, colours[_curve_key(shape)], y, band_row)
    handles = _curve_legend(colours, marks, y)
    columns = max(1, min(len(handles), int(fig_width // 2.2)))  # about 2.2 inches per legend entry
    fig.legend(handles=handles, loc="outside lower center", ncols=columns, fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)


def _panel_frame(ax: Any, title: str, y: ValueRange, x_label: str | None, y_label: str | None) -> None:
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_ylim(y.low, y.high)
    if y.clip_reason:  # only where something is actually clipped
        ax.axhline(y.clip, color="0.6", linestyle=":", linewidth=1)
    if x_label:
        ax.set_xlabel(x_label)
    if y_label:
        ax.set_ylabel(y_label)


def _draw_curve(ax: Any, points: list[tuple[float, float]], best: tuple[float, float] | None, colour: Any,
                y: ValueRange, band_row: int) -> set[str]:
    """One curve: finite points joined, clipped ones as open triangles at the clip, diverged ones as crosses
    in their own band, the optimum as a star. Returns the kinds of mark it drew."""
    marks = set()
    finite = [(x, value) for x, value in points if not _diverged(value)]
    if finite:
        ax.plot([x for x, _ in finite], [y.clipped(v) for _, v in finite], "-o", color=colour,
                markersize=3.5, linewidth=1.4)
    clipped = [(x, y.clip) for x, value in finite if y.clipped(value) != value]
    if clipped:
        marks.add("clipped")
        ax.plot(*zip(*clipped), linestyle="none", marker=_off_scale(y), markersize=7, markerfacecolor="white",
                color=colour)
    diverged_x = [x for x, value in points if _diverged(value)]
    if diverged_x:
        marks.add("diverged")
        ax.plot(diverged_x, [y.band_row(band_row)] * len(diverged_x), linestyle="none", marker="x",
                markersize=7, markeredgewidth=1.6, color=colour)
    if best is not None and not _diverged(best[1]):
        ax.plot([best[0]], [y.clipped(best[1])], marker="*", markersize=14, color=colour, markeredgecolor="black",
                linestyle="none", zorder=5)
    return marks


def _off_scale(y: ValueRange) -> str:
    return "^" if y.minimised else "v"


def _curve_legend(colours: dict[tuple[int, ...], Any], marks: set[str], y: ValueRange) -> list[Any]:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", markersize=4, label=_curve_name(k, list(colours)))
               for k, c in colours.items()]
    handles.append(Line2D([], [], color="black", marker="*", markersize=11, linestyle="none", label="optimum"))
    if "diverged" in marks:
        handles.append(Line2D([], [], color="black", marker="x", linestyle="none", label="diverged (or failed)"))
    if "clipped" in marks:
        handles.append(Line2D([], [], color="black", marker=_off_scale(y), linestyle="none", markerfacecolor="white",
                              label=f"clipped at {y.clip:.3g} ({y.clip_reason})"))
    return handles


def heatmap(
    shape: Shape,
    grid: dict[tuple[float, float], float],
    optimum: Optimum | None,
    lr_grid: list[float],
    momentum_grid: list[float],
    metric: str,
    y: ValueRange,
    study: str,
    path: Path,
) -> None:
    """lr (log2, columns) x momentum (rows) of one shape; diverged cells grey with an x, missing ones blank."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    values = np.full((len(momentum_grid), len(lr_grid)), np.nan)
    diverged = []
    for (lr, momentum), value in grid.items():
        i, j = momentum_grid.index(momentum), lr_grid.index(lr)
        if _diverged(value):
            diverged.append((i, j))
        else:
            values[i, j] = value
    minimised = metric not in MAXIMISED
    # the best end is always yellow; missing cells stay white
    cmap = colormaps["viridis_r" if minimised else "viridis"].with_extremes(bad="white")

    fig = Figure(figsize=(max(4.5, 0.75 * len(lr_grid) + 2.5), max(3.0, 0.5 * len(momentum_grid) + 2.0)),
                 layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=min(y.best, y.clip), vmax=max(y.best, y.clip),
                      origin="lower", aspect="auto")
    for i, j in diverged:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.8", edgecolor="none"))
        ax.text(j, i, "x", ha="center", va="center", color="0.3", fontsize=11)
    if len(lr_grid) * len(momentum_grid) <= 200:  # numbers stay legible up to about this many cells
        for i in range(len(momentum_grid)):
            for j in range(len(lr_grid)):
                if not np.isnan(values[i, j]):
                    red, green, blue, _ = cmap(image.norm(values[i, j]))
                    dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                    ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    if optimum is not None:
        ax.add_patch(Rectangle((lr_grid.index(optimum.lr) - 0.5, momentum_grid.index(optimum.momentum) - 0.5),
                               1, 1, fill=False, edgecolor="red", linewidth=2.2))
    ax.set_xticks(range(len(lr_grid)), [f"{math.log2(lr):.3g}" for lr in lr_grid])
    ax.set_yticks(range(len(momentum_grid)), [f"{m:g}" for m in momentum_grid])
    ax.set_xlabel("log2 learning rate")
    ax.set_ylabel("momentum")
    ax.set_title(f"{study}: {shape.variant}, width {shape.width}, depth {shape.depth}, batch {shape.batch_size}, "
                 f"steps {shape.steps}\n"
                 f"{metric} (grey x = diverged or failed, "
                 f"red = optimum, best over weight decay)", fontsize=9)
    fig.colorbar(image, ax=ax, label=metric, extend="max" if minimised else "min")
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------------------------------------
# tables


