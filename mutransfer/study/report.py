"""`mutransfer report`: plots and tables that show whether a study's optimum stays put across proxy shapes.

Everything is computed once, by `study_analysis.StudyAnalysis` (the analysis `transfer` and the demo read too);
`figures` and `grid_figures` draw it, and this module writes the files and logs them:

    lr_curves.png        metric vs log2 lr, a panel per variant, a curve per proxy size, fitted optima
    trend.png            fitted optimum (and the loss there) vs log2 width / depth, with each trend line
    momentum_curves.png  metric vs momentum at each shape's best lr (and weight decay)
    heatmap_<variant>_w<W>_d<D>[_b<B>_t<T>].png  lr x momentum grid of one shape (studies with several momenta or
                         decays; _b/_t where the study varies batch or length)
    optima.csv           per shape: fitted optimum (mean of the seeds' and the seed-averaged curve's), its seed
                         spread, the loss there, grid edges; grid argmin
    trends.csv           per variant and axis (width, depth, batch, length): slope per doubling, its
                         analytic and seed-bootstrap errors, the seed-averaged curves' slope, the verdict
    heldout.csv          per axis with three or more values: each shape at its largest value predicted from
                         the others, the miss, the 95 % interval, within or not
    optima.md            all of it in words: the verdict per variant first, the held-out coverage
    trials.csv           every trial the analysis used, with its batch and length

The files are logged to the study's parent run under `report/`, and the fitted numbers as its metrics
(`optimum/<variant>/w<W>_d<D>[_b<B>_t<T>]/...`, `trend/<variant>/<axis>_slope...`, `heldout/<variant>/coverage`;
'+' in a variant becomes '_').
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import analysis, figures, holdout
from .analysis import Optimum, Shape, ShapeFit, VariantTrend
from .grid_figures import curve_figure, heatmap, lr_momentum_grid, lr_profile, momentum_slice, value_range
from .store import MAXIMISED, Trial, grid_order
from .study_analysis import StudyAnalysis

ARTIFACT_PATH = "report"


OPTIMA_COLUMNS = ["variant", "width", "depth", "batch_size", "steps", "samples", "lr", "log2_lr", "momentum", "weight_decay", "metric",
                  "value", "finite_points", "lr_shift_steps", "momentum_shift_steps", "reference_width",
                  "reference_depth", "fitted_lr", "fitted_log2_lr", "log2_lr_spread", "fitted_momentum",
                  "fitted_value", "seeds", "edge", "mean_curve_log2_lr"]
TREND_COLUMNS = ["variant", "axis", "length_unit", "slope_per_doubling", "slope_error", "analytic_error",
                 "bootstrap_error", "mean_curve_slope", "mean_curve_error", "doublings", "drift_log2", "outcome",
                 "loss_slope_per_doubling", "bigger_is_better", "edge_optima", "observations"]
HELDOUT_COLUMNS = ["variant", "axis", "left_out", "width", "depth", "batch_size", "steps", "observed_log2_lr",
                   "predicted_log2_lr", "miss", "interval_95", "within"]
TRIAL_COLUMNS = ["key", "variant", "width", "depth", "batch_size", "steps", "samples", "lr", "log2_lr",
                 "momentum", "weight_decay", "seed", "status", "metric", "value", "run_id"]


def _fit_columns(f: ShapeFit | None) -> dict[str, Any]:
    if f is None:
        return {}
    return {"fitted_lr": repr(f.lr_value), "fitted_log2_lr": f"{f.lr.x:.4f}", "log2_lr_spread": f"{f.lr.spread:.4f}",
            "fitted_momentum": repr(f.momentum_value), "fitted_value": repr(f.lr.value), "seeds": f.seeds,
            "edge": "+".join(f.lr.edges), "mean_curve_log2_lr": f"{f.mean_curve.x:.4f}" if f.mean_curve else ""}


def _trend_row(variant: str, t: VariantTrend, axis: str, v: analysis.AxisVerdict) -> dict[str, Any]:
    mean = t.mean_curve_lr
    return {"variant": variant, "axis": axis, "length_unit": t.length_unit, "slope_per_doubling": f"{v.slope:.4f}",
            "slope_error": f"{v.error:.4f}", "analytic_error": f"{t.lr.errors[axis]:.4f}",
            "bootstrap_error": f"{t.bootstrap_errors.get(axis, math.nan):.4f}",
            "mean_curve_slope": f"{mean.slopes[axis]:.4f}" if mean and axis in mean.slopes else "",
            "mean_curve_error": f"{mean.errors[axis]:.4f}" if mean and axis in mean.errors else "",
            "doublings": f"{v.doublings:g}", "drift_log2": f"{v.drift:.4f}", "outcome": v.outcome,
            "loss_slope_per_doubling": f"{t.loss.slopes[axis]:.4f}",
            "bigger_is_better": t.bigger_is_better.get(axis, ""), "edge_optima": t.edge_optima,
            "observations": t.observations}


def _trend_rows(trends: dict[str, VariantTrend]) -> list[dict[str, Any]]:
    return [_trend_row(variant, t, axis, v) for variant, t in trends.items() for axis, v in t.verdicts.items()]


def _heldout_rows(checks: dict[str, list[holdout.HeldOut]]) -> list[dict[str, Any]]:
    return [{"variant": variant, "axis": c.axis, "left_out": f"{c.size:g}", "width": c.shape.width,
             "depth": c.shape.depth, "batch_size": c.shape.batch_size, "steps": c.shape.steps,
             "observed_log2_lr": f"{c.observed:.4f}", "predicted_log2_lr": f"{c.predicted:.4f}",
             "miss": f"{c.miss:+.4f}", "interval_95": f"{c.interval:.4f}", "within": c.within}
            for variant, own in checks.items() for c in own]


def _optima_rows(optima: dict[Shape, Optimum], shift: dict[Shape, tuple[int, int]],
                 metric: str, fits: dict[Shape, ShapeFit]) -> list[dict[str, Any]]:
    rows = []
    for shape, opt in optima.items():
        reference = analysis.reference_shape(list(optima), shape.variant)
        rows.append({**_fit_columns(fits.get(shape)),
            "variant": shape.variant, "width": shape.width, "depth": shape.depth, "batch_size": shape.batch_size,
            "steps": shape.steps, "samples": shape.samples, "lr": repr(opt.lr),
            "log2_lr": f"{math.log2(opt.lr):.4g}", "momentum": repr(opt.momentum),
            "weight_decay": repr(opt.weight_decay), "metric": metric, "value": repr(opt.value),
            "finite_points": opt.trials, "lr_shift_steps": shift[shape][0],
            "momentum_shift_steps": shift[shape][1], "reference_width": reference.width,
            "reference_depth": reference.depth})
    return rows


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _markdown_table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _verdict_lines(trends: dict[str, VariantTrend]) -> list[str]:
    lines = []
    for trend in trends.values():
        lines.append(f"- **{analysis.summary_sentence(trend)}**")
        lines += [f"  - {analysis.axis_sentence(v, trend.sizes[a])}" for a, v in trend.verdicts.items()]
        lines += [f"  - momentum, {analysis.axis_sentence(v, trend.sizes[a], 'optimal momentum (log2(1 - m))')}"
                  for a, v in trend.momentum_verdicts.items()]
    return lines or ["- no shape has a finite optimum"]


def _heldout_lines(checks: dict[str, list[holdout.HeldOut]]) -> list[str]:
    lines = ["", "## Held-out check", "",
             "For each axis with three or more values, the shapes at its largest value are left out, the law is "
             "fitted to the rest and predicts them; a law that extrapolates puts about 95 % of them inside their "
             "95 % interval.", ""]
    lines += [f"- {variant}: {holdout.sentence(own)}" for variant, own in checks.items()]
    rows = _heldout_rows(checks)
    if rows:
        lines += [""] + _markdown_table(
            ["variant", "left out", "shape (w, d, batch, steps)", "observed", "predicted", "miss", "95 %"],
            [[r["variant"], f"{r['axis']} {r['left_out']}",
              f"{r['width']}, {r['depth']}, {r['batch_size']}, {r['steps']}", r["observed_log2_lr"],
              r["predicted_log2_lr"], r["miss"], f"+-{r['interval_95']}" + ("" if r["within"] else " **missed**")]
             for r in rows])
    return lines


def _write_markdown(path: Path, a: StudyAnalysis, extra: list[str] = ()) -> None:
    study, metric, fits, trends = a.name, a.metric, a.fits, a.trends
    lines = [f"# Study `{study}`: does the optimum transfer?", "",
             f"Metric `{metric}` ({'higher' if metric in MAXIMISED else 'lower'} is better). Each seed's optimum is "
             "the vertex of the parabola in log2(lr) through its best grid point and their neighbours; a best point "
             "on the grid's edge is kept as a bound and flagged. One law per variant, least squares over every "
             "shape and seed's optimum, in log2 units per doubling of each axis the study varied (width, depth, "
             "global batch, length); each slope's error is the larger of the analytic one and a bootstrap over seeds; "
             f"the bar is {analysis.TOLERANCE_PER_DOUBLING:.3f} per doubling (0.5 log2 over x8).", "", "## Verdict",
             ""]
    lines += _verdict_lines(trends)
    counts = Counter(t.status for t in a.trials)
    lines += ["", "Trials: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
              + ". Only finished trials have a value; the others count as diverged.", "", "## Fitted optima", ""]
    lines += _markdown_table(
        ["variant", "width", "depth", "batch", "steps", "lr", "log2 lr", "seed spread", "seed-mean curve",
         "momentum", metric, "seeds", "edge"],
        [[*s, f"{f.lr_value:.4g}", f"{f.lr.x:.2f}", f"{f.lr.spread:.2f}",
          f"{f.mean_curve.x:.2f}" if f.mean_curve else "-", f"{f.momentum_value:.4g}",
          f"{f.lr.value:.4f}", f.seeds, "+".join(f.lr.edges) or "-"] for s, f in fits.items()])
    lines += ["", "## Trends", ""]
    lines += _markdown_table(["variant", "axis", "slope / doubling", "drift over proxies", "verdict",
                              "loss slope / doubling"],
                             [[r["variant"], r["axis"], f"{float(r['slope_per_doubling']):+.3f} +- "
                               f"{float(r['slope_error']):.3f}", f"{float(r['drift_log2']):+.2f}", r["outcome"],
                               f"{float(r['loss_slope_per_doubling']):+.3f}"] for r in _trend_rows(trends)])
    if a.all_diverged:
        lines += ["", "Shapes where every trial diverged or failed: "
                  + ", ".join(f"{s.variant} width {s.width} depth {s.depth} batch {s.batch_size} steps {s.steps}"
                              for s in a.all_diverged)
                  + "."]
    lines += extra
    if a.targets:
        lines += ["", "## Target runs", ""]
        lines += _markdown_table(
            ["key", "variant", "width", "depth", "batch", "steps", "lr", "momentum", "status", metric],
            [[t.key, *t.shape, f"{t.spec.lr:.4g}", f"{t.spec.momentum:g}", t.status,
              f"{t.metrics[metric]:.4g}" if metric in t.metrics else ""] for t in a.targets])
    path.write_text("\n".join(lines) + "\n")


def _log_numbers(client, run_id: str, a: StudyAnalysis) -> None:
    """The fitted numbers as metrics of the study's parent run (MLflow names allow no '+': it becomes '_')."""
    from mlflow.entities import Metric

    fits, trends, checks = a.fits, a.trends, a.heldout

    def name(variant: str) -> str:
        return _file_name(variant.replace("+", "_"))

    values: dict[str, float] = {}
    for shape, f in fits.items():
        key = f"optimum/{name(shape.variant)}/{shape_name(shape, list(fits))}"
        values.update({f"{key}/log2_lr": f.lr.x, f"{key}/log2_lr_spread": f.lr.spread, f"{key}/value": f.lr.value,
                       f"{key}/on_edge": float(bool(f.lr.edges))})
    for variant, t in trends.items():
        for axis, v in t.verdicts.items():
            key = f"trend/{name(variant)}/{axis}"
            values.update({f"{key}_slope": v.slope, f"{key}_slope_error": v.error, f"{key}_drift": v.drift,
                           f"{key}_holds": float(v.outcome == "holds"), f"{key}_loss_slope": t.loss.slopes[axis]})
    values.update({f"heldout/{name(variant)}/coverage": holdout.coverage(own) for variant, own in checks.items() if own})
    metrics = [Metric(k, v if math.isfinite(v) else -1.0, 0, 0) for k, v in values.items()]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


# --------------------------------------------------------------------------------------------------------
# the report


def shape_name(shape: Shape, shapes: list[Shape]) -> str:
    """'w32_d8', with '_b64_t400' where the study varies the batch or the length (names stay as they were for
    studies that do not)."""
    name = f"w{shape.width}_d{shape.depth}"
    if len({(s.batch_size, s.steps) for s in shapes}) > 1:
        name += f"_b{shape.batch_size}_t{shape.steps}"
    return name


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def _write_figures(a: StudyAnalysis, out: Path) -> list[Path]:
    lr_grid, momentum_grid, wd_grid = analysis.grids(a.trials)
    # one y range for the lr curves and every heat map, so that shapes compare at a glance
    y_range = value_range([v for points in a.per_shape.values() for v in points.values()], a.metric, a.chance_loss)
    several = len(momentum_grid) > 1 or len(wd_grid) > 1
    files = [out / "lr_curves.png", out / "trend.png", out / "momentum_curves.png"]
    figures.transfer_curves({shape: lr_profile(points, a.metric) for shape, points in a.per_shape.items()}, a.fits,
                            (y_range.low, y_range.high), a.metric, f"{a.name}: {a.metric} vs learning rate"
                            + (" (best momentum and decay at each lr)" if several else ""), files[0])
    figures.trend_figure(a.fits, a.trends, a.metric, f"{a.name}: where the optimum goes as the proxies grow", files[1])
    momentum_curves = {shape: momentum_slice(a.per_shape[shape], opt) for shape, opt in a.optima.items()}
    curve_figure(
        momentum_curves, {shape: opt.momentum for shape, opt in a.optima.items()},
        value_range([v for curve in momentum_curves.values() for v in curve.values()], a.metric, a.chance_loss),
        a.metric, "momentum", float, f"{a.name}: {a.metric} vs momentum, at each shape's best lr"
        + ("" if len(momentum_grid) > 1 else " (the study used a single momentum)"), files[2])
    for shape, points in sorted(a.per_shape.items()) if several else ():
        files.append(out / f"heatmap_{_file_name(shape.variant)}_{shape_name(shape, list(a.per_shape))}.png")
        heatmap(shape, lr_momentum_grid(points, a.metric), a.optima.get(shape), lr_grid, momentum_grid, a.metric,
                 y_range, a.name, files[-1])
    return files


def _write_tables(a: StudyAnalysis, out: Path) -> list[Path]:
    files = [out / "optima.csv", out / "trends.csv", out / "optima.md", out / "trials.csv", out / "heldout.csv"]
    _write_csv(files[0], OPTIMA_COLUMNS, _optima_rows(a.optima, a.shifts, a.metric, a.fits))
    _write_csv(files[1], TREND_COLUMNS, _trend_rows(a.trends))
    _write_markdown(files[2], a, _heldout_lines(a.heldout))
    _write_csv(files[4], HELDOUT_COLUMNS, _heldout_rows(a.heldout))
    _write_csv(files[3], TRIAL_COLUMNS, [_trial_row(t, a.metric) for t in sorted(a.trials, key=grid_order)])
    return files


def _trial_row(trial: Trial, metric: str) -> dict[str, Any]:
    """One line of trials.csv."""
    spec = trial.spec
    return {
        "key": trial.key, "variant": spec.variant, "width": spec.width, "depth": spec.depth,
        "batch_size": spec.batch_size, "steps": spec.steps, "samples": spec.shape.samples,
        "lr": repr(spec.lr), "log2_lr": f"{math.log2(spec.lr):.4g}", "momentum": repr(spec.momentum),
        "weight_decay": repr(spec.weight_decay), "seed": spec.seed, "status": trial.status, "metric": metric,
        "value": repr(trial.metrics[metric]) if metric in trial.metrics else "", "run_id": trial.run_id,
    }


@dataclass(frozen=True)
class WrittenReport:
    """What `write_report` wrote: its files, and where they were logged (None when they were not)."""

    analysis: StudyAnalysis
    files: list[Path]
    artifact_uri: str | None


def write_report(client, a: StudyAnalysis, out_dir: str | Path, log_to_parent: bool = True) -> WrittenReport:
    """Write the analysis's plots and tables to `out_dir`; log them to the study's parent run (artifacts under
    `report/`, the fitted numbers as metrics) where the analysis was loaded from MLflow and `log_to_parent`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = _write_figures(a, out) + _write_tables(a, out)
    artifact_uri = None
    if log_to_parent and a.parent is not None:
        for file in files:
            client.log_artifact(a.parent.info.run_id, str(file), ARTIFACT_PATH)
        artifact_uri = f"{a.parent.info.artifact_uri.rstrip('/')}/{ARTIFACT_PATH}"
        _log_numbers(client, a.parent.info.run_id, a)
    return WrittenReport(a, files, artifact_uri)
