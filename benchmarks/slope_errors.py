"""How much each way of estimating the law shrinks the slope errors, on the shipped studies' recorded trials.

    .venv/bin/python benchmarks/slope_errors.py                    # every docs/results/*/trials.csv
    .venv/bin/python benchmarks/slope_errors.py docs/results/vit_depth/trials.csv --resamples 400

For each study, parametrization and axis the study varied, four estimates of the optimum's slope per doubling:

- seeds: every seed's fitted optimum one observation of one law over all shapes (what `report` fits), with
  its analytic standard error and the spread of the slope over bootstrap resamples of the seeds;
- mean curve: one optimum per shape, fitted to the seed-averaged curve, one law through them, with its
  analytic error (from shape-level residuals) and its bootstrap over seeds (curves re-averaged per resample).

The bootstrap over seeds is the honest error of both: a seed is one draw of the whole study (init and data
order of every shape), so seeds, not single optima, are the independent units. Deterministic (seeded).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np

from mutransfer.study import analysis, fit
from mutransfer.study.store import Trial
from mutransfer.study.trial import TrialSpec


def read_trials(path: Path) -> list[Trial]:
    """A report's trials.csv as Trials (studies recorded before the batch and length axes: one of each)."""
    trials = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            variant = row["variant"] if "variant" in row else row["parametrization"]  # reports before the rename
            spec = TrialSpec(variant, int(row["width"]), int(row["depth"]),
                             int(row.get("batch_size") or 1), int(row.get("steps") or 1), float(row["lr"]),
                             float(row["momentum"]), float(row["weight_decay"]), int(row["seed"]))
            metrics = {row["metric"]: float(row["value"])} if row["value"] else {}
            trials.append(Trial(row["run_id"], row["key"], "proxy", spec, row["status"], metrics))
    return trials


def laws(trials: list[Trial], metric: str) -> dict[str, tuple[fit.Trend, fit.Trend | None]]:
    """Per label: (law over every seed's optimum, law over the seed-averaged curves' optima)."""
    out = {}
    for label, trend in analysis.trends(analysis.fit_shapes(trials, metric)).items():
        out[label] = (trend.lr, trend.mean_curve_lr)
    return out


def resample(trials: list[Trial], rng: np.random.Generator) -> list[Trial]:
    """The trials of seeds drawn with replacement; a seed drawn twice enters twice, as two seeds."""
    seeds = sorted({t.spec.seed for t in trials})
    out = []
    for new_seed, seed in enumerate(int(s) for s in rng.choice(seeds, size=len(seeds))):
        for t in trials:
            if t.spec.seed == seed:
                spec = TrialSpec(*t.spec.shape, lr=t.spec.lr, momentum=t.spec.momentum,
                                 weight_decay=t.spec.weight_decay, seed=new_seed)
                out.append(Trial(t.run_id, f"{t.key}#{new_seed}", t.role, spec, t.status, t.metrics))
    return out


def measure(path: Path, resamples: int) -> list[dict[str, str]]:
    trials = read_trials(path)
    metric = next(name for t in trials for name in t.metrics)
    base = laws(trials, metric)
    rng = np.random.default_rng(0)
    boot: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(resamples):
        for label, pair in laws(resample(trials, rng), metric).items():
            for which, law in enumerate(pair):
                for axis, slope in (law.slopes.items() if law else ()):
                    boot.setdefault((label, axis, which), []).append(slope)
    rows = []
    for label, (seeds, mean) in base.items():
        for axis in seeds.axes:
            rows.append({"study": path.parent.name, "variant": label, "axis": axis,
                         "seeds_slope": f"{seeds.slopes[axis]:+.3f}", "seeds_analytic": f"{seeds.errors[axis]:.3f}",
                         "seeds_bootstrap": f"{_spread(boot.get((label, axis, 0), [])):.3f}",
                         "mean_slope": f"{mean.slopes[axis]:+.3f}" if mean else "",
                         "mean_analytic": f"{mean.errors[axis]:.3f}" if mean else "",
                         "mean_bootstrap": f"{_spread(boot.get((label, axis, 1), [])):.3f}"})
    return rows


def _spread(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="trials.csv files (default: docs/results/*/trials.csv)")
    parser.add_argument("--resamples", type=int, default=200)
    args = parser.parse_args()
    paths = args.paths or sorted(Path("docs/results").glob("*/trials.csv"))
    columns = ["study", "variant", "axis", "seeds_slope", "seeds_analytic", "seeds_bootstrap", "mean_slope",
               "mean_analytic", "mean_bootstrap"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    ratios = []
    for path in paths:
        for row in measure(path, args.resamples):
            print("| " + " | ".join(row[c] for c in columns) + " |")
            if row["mean_bootstrap"] != "nan" and float(row["seeds_bootstrap"]) > 0:
                ratios.append(float(row["mean_bootstrap"]) / float(row["seeds_bootstrap"]))
    if ratios:
        print(f"\nmean-curve bootstrap error / per-seed bootstrap error: median {np.median(ratios):.2f} "
              f"(range {min(ratios):.2f}-{max(ratios):.2f}) over {len(ratios)} slopes")


if __name__ == "__main__":
    main()
