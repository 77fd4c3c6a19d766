"""Trials per minute of a proxy sweep by this checkout against an older commit of mutransfer: the whole
`mutransfer sweep` command as a user runs it, one fresh process per sweep, interleaved round robin, medians.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/sweep_vs_baseline.py --rounds 2 --work /tmp/vs_baseline

The baseline (default a257090, the last commit before stacked trials and the sample cache: the sweep issue
17 measured) is exported with `git archive` into --work and run from there with this venv (PYTHONPATH puts
its package first); the repository itself is not touched. Three modes sweep the same trials, each into a
fresh MLflow store and output folder: the baseline, this checkout with `--stack 1` (one trial at a time) and
this checkout stacked (automatic K). The study is the demo's proxy at --widths x --depths for --variant,
the demo study's learning rates and seeds, --steps steps, written once per version in that version's
study format over the same synthetic shards. Each mode's time includes its process start and imports, as a
user's does; DeepSpeed's op build is done before the first timed sweep.

Printed: seconds per sweep, trials per minute and their ratios; then whether the modes agree: statuses,
each shape's best learning rate (lowest seed-mean final eval loss) and the median relative gap of the
trials' final eval losses (single trials at the demo's largest learning rates are chaotic in float32, see
docs/benchmarks.md, so a gap of a few percent in some trials is expected of any two runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from mutransfer import tags
from mutransfer.study.demo import ensure_shards

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "configs" / "demo_study.yaml"


def export(rev: str, where: Path) -> Path:
    """The tree of `rev` under `where` (git archive: no worktree, no change to the repository)."""
    if not (where / "mutransfer").is_dir():
        where.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def write_study(root: Path, args: argparse.Namespace, shards: Path, name: str) -> Path:
    """The benchmark's study in the format of the version at `root`, with its own demo proxy config."""
    proxy = yaml.safe_load((root / "configs" / "demo_proxy.yaml").read_text())
    proxy["data"]["shards_dir"] = str(shards)
    folder = Path(tempfile.mkdtemp(prefix="study_", dir=args.work))
    (folder / "proxy.yaml").write_text(yaml.safe_dump(proxy))
    demo = yaml.safe_load(STUDY.read_text())
    shape_key = "variants" if "variants:" in (root / "configs" / "demo_study.yaml").read_text() else "parametrizations"
    study = {
        "study": {"name": name, "experiment": "sweep-vs-baseline", "base_config": "proxy.yaml",
                  "output_dir": str(folder / "trials"), "steps": args.steps, "metric": "final/eval_loss"},
        "shapes": {shape_key: [args.variant], "widths": args.widths, "depths": args.depths},
        "grid": demo["grid"],
        "seeds": args.seeds or demo["seeds"],
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def sweep(root: Path, study: Path, store: Path, extra: list[str]) -> float:
    """Wall seconds of one `mutransfer sweep` process of the version at `root`."""
    env = {**os.environ, "PYTHONPATH": str(root), "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "mutransfer.cli", "sweep",  # the `mutransfer` console script's entry point
               "--config", str(study), "--tracking-uri", f"sqlite:///{store}", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"sweep of {root} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def trials(store: Path) -> dict[tuple[str, ...], tuple[str, float]]:
    """(status, final eval loss) of every proxy run in a store, by (width, depth, lr, seed) as tagged."""
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("sweep-vs-baseline")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{tags.ROLE}` = 'proxy'", max_results=10000)
    found = {}
    for run in runs:
        key = tuple(run.data.tags[t] for t in (tags.WIDTH, tags.DEPTH, tags.LR, tags.SEED))
        found[key] = (run.data.tags.get(tags.STATUS, "?"), run.data.metrics.get("final/eval_loss", float("nan")))
    return found


def best_lrs(found: dict[tuple[str, ...], tuple[str, float]]) -> dict[tuple[str, str], str]:
    """Each shape's learning rate of lowest seed-mean final eval loss."""
    losses: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (width, depth, lr, _), (_, loss) in found.items():
        losses[(width, depth)][lr].append(loss)
    return {shape: min(by_lr, key=lambda lr: statistics.fmean(by_lr[lr])) for shape, by_lr in losses.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="a257090", help="the commit to compare against")
    parser.add_argument("--variant", default="depth_mup+fle0.5")
    parser.add_argument("--widths", type=int, nargs="+", default=[32])
    parser.add_argument("--depths", type=int, nargs="+", default=[4])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the demo study's")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for the baseline's tree, shards and stores")
    args = parser.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="sweep_vs_baseline_")
    work = Path(args.work)
    shards = work / "shards"
    ensure_shards(shards)
    versions = {"baseline": export(args.baseline, work / "baseline"), "this": REPO}
    modes = {f"{args.baseline}": ("baseline", []), "--stack 1": ("this", ["--stack", "1"]), "stacked": ("this", [])}
    warm = argparse.Namespace(**{**vars(args), "steps": 1, "seeds": [0]})  # DeepSpeed's op build, once
    sweep(REPO, write_study(REPO, warm, shards, "warm"), work / "warm.db", ["--stack", "1"])
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    results = {}
    for round_index in range(args.rounds):
        order = list(modes) if round_index % 2 == 0 else list(modes)[::-1]
        for mode in order:
            version, extra = modes[mode]
            store = work / f"round{round_index}-{mode.replace(' ', '').replace('-', '')}.db"
            store.unlink(missing_ok=True)
            study = write_study(versions[version], args, shards, "bench")
            times[mode].append(sweep(versions[version], study, store, extra))
            results[mode] = trials(store)
            print(f"round {round_index}: {mode}: {times[mode][-1]:.1f} s", flush=True)
    report(args, times, results, load_before)


def report(args, times, results, load_before) -> None:
    count = len(next(iter(results.values())))
    base = args.baseline
    print(f"\n{count} trials ({args.variant}, widths {args.widths}, depths {args.depths}, {args.steps} steps), "
          f"{args.rounds} rounds; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"| mode | s per sweep (median) | runs | trials/min | vs {base} |")
    print("|---|---|---|---|---|")
    rate = {mode: count * 60 / statistics.median(values) for mode, values in times.items()}
    for mode, values in times.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {mode} | {statistics.median(values):.1f} | {runs} | {rate[mode]:.1f} | {rate[mode] / rate[base]:.2f}x |")
    reference = results[base]
    for mode, found in results.items():
        if mode == base:
            continue
        statuses = sum(found.get(k, ("missing",))[0] == v[0] for k, v in reference.items())
        gaps = [abs(found[k][1] / v[1] - 1) for k, v in reference.items() if k in found and v[1] == v[1]]
        same_best = best_lrs(found) == best_lrs(reference)
        print(f"{mode} against {base}: same status {statuses} of {len(reference)}; best lr per shape "
              f"{'the same' if same_best else 'differs'} ({best_lrs(found)} vs {best_lrs(reference)}); final eval loss "
              f"gap median {statistics.median(gaps):.1e}, largest {max(gaps):.1e}")


if __name__ == "__main__":
    main()
