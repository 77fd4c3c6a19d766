"""How often the demo's verdict comes out the same: every k-seed subset of pooled demo runs, judged as the demo
judges (`mutransfer.study.demo.compare`).

    .venv/bin/python benchmarks/verdict_stability.py demo/report/trials.csv demo_s3/report/trials.csv \\
        demo_s6/report/trials.csv                                    # three runs, seeds 0-2, 3-5, 6-8: 84 subsets

Three demo runs of one commit with seeds 0-2, 3-5 and 6-8 pool nine seeds; each 3-seed subset is a run the demo
could have made with other seeds. A change that only rounds the trials differently draws the same kind of
noise again (the trials are chaotic in float32: docs/demo.md), so the share of subsets with one verdict is what
to expect of three fresh runs, and of a CPU that rounds differently. Per axis the study varied, it prints how
many subsets end decisive for each variant and how many undecided, the margin between the variants in
standard errors (smallest, median), and what the steadier variant's own slope showed where decisive (the
qualifier of the verdict: holds, unclear or drifts, and whether the slope is within the bar). Deterministic;
writes nothing.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slope_errors import read_trials  # noqa: E402

from mutransfer.study import analysis  # noqa: E402
from mutransfer.study.demo import compare, verdicts_by_axis  # noqa: E402


def measure(trials, metric: str, seeds_per_run: int) -> dict[str, tuple[Counter, Counter, list[float]]]:
    """axis -> (verdicts over every subset, what the steadier variant's own slope showed in the decisive ones,
    each subset's margin in standard errors)."""
    seeds = sorted({t.spec.seed for t in trials})
    out: dict[str, tuple[Counter, Counter, list[float]]] = {}
    for subset in itertools.combinations(seeds, seeds_per_run):
        chosen = [t for t in trials if t.spec.seed in subset]
        trends = analysis.trends(analysis.fit_shapes(chosen, metric))
        for axis, verdicts in verdicts_by_axis(trends).items():
            counts, steadier, margins = out.setdefault(axis, (Counter(), Counter(), []))
            comparison = compare(verdicts)
            decisive = comparison is not None and comparison.decisive
            counts[f"tune {comparison.keep}" if decisive else "undecided"] += 1
            if decisive:
                keep = verdicts[comparison.keep]
                within = "within" if abs(keep.slope) <= analysis.TOLERANCE_PER_DOUBLING else "beyond"
                steadier[f"{keep.outcome}, slope {within} the bar"] += 1
            margins.append(comparison.errors if comparison else float("nan"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="trials.csv of demo runs of one commit, other seeds")
    parser.add_argument("--seeds-per-run", type=int, default=3)
    args = parser.parse_args()
    trials = [t for path in args.paths for t in read_trials(path)]
    metric = next(name for t in trials for name in t.metrics)
    seeds = sorted({t.spec.seed for t in trials})
    if len(seeds) < args.seeds_per_run:
        raise SystemExit(f"{len(seeds)} seeds in those files: fewer than --seeds-per-run {args.seeds_per_run}")
    print(f"{len(trials)} trials, seeds {seeds}, every {args.seeds_per_run}-seed subset judged as the demo judges")
    for axis, (counts, steadier, margins) in measure(trials, metric, args.seeds_per_run).items():
        total = sum(counts.values())
        shares = ", ".join(f"{name}: {n} ({n / total:.0%})" for name, n in counts.most_common())
        finite = np.array([m for m in margins if np.isfinite(m)])
        spread = (f"margin {finite.min():.1f} to {finite.max():.1f} standard errors, median {np.median(finite):.1f}"
                  if finite.size else "no variant drifts in any subset")
        print(f"{axis}: {total} subsets; {shares}; {spread}")
        if steadier:
            print("  the steadier variant's own slope where decisive: "
                  + ", ".join(f"{name} {n}" for name, n in steadier.most_common()))


if __name__ == "__main__":
    main()
