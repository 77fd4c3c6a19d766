"""`mutransfer demo` (what `make demo` runs): the whole proxy-to-target workflow on CPU.

1. synthetic, learnable shards (10 classes of shape x colour x texture);
2. a proxy study over depth (2 -> 16 at width 32) comparing mup, whose optimal lr drifts with depth, against
   the recommended parametrization (configs/demo_study.yaml);
3. the report: fitted optima, the trend of each parametrization, plots;
4. transfer by the fitted trend to a wider and deeper target, trained for real;
5. the verdict, from the demo's own numbers: which parametrization transfers, and by how much the other drifts.
Everything is recorded in the local MLflow store (sqlite:///mlflow.db unless told otherwise).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from mutransfer.data import read_info, write_synthetic_shards
from mutransfer.train.tracking import resolve_tracking_uri
from mutransfer.typed_config import with_values

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TRAIN_SAMPLES, EVAL_SAMPLES, IMAGE_SIZE, CLASSES = 6000, 2000, 32, 10


def ensure_shards(folder: Path) -> None:
    """Write the demo's shards unless a complete set is already there."""
    try:
        info = read_info(str(folder))
        if info.split("train").num_samples == TRAIN_SAMPLES and info.split("validation").num_samples == EVAL_SAMPLES:
            print(f"[demo] shards already in {folder}", flush=True)
            return
    except (FileNotFoundError, ValueError, OSError):
        pass
    print(f"[demo] writing synthetic shards to {folder}", flush=True)
    write_synthetic_shards(str(folder), "train", CLASSES, TRAIN_SAMPLES, IMAGE_SIZE, seed=0, samples_per_shard=1000,
                           force=True, progress=True)
    write_synthetic_shards(str(folder), "validation", CLASSES, EVAL_SAMPLES, IMAGE_SIZE, seed=0,
                           samples_per_shard=500, progress=True)


def _depth_verdict(depth: dict) -> str:
    """Which parametrization to tune proxies under, from the depth slopes: one within the bar beside one that
    drifts; else one that does not drift (its slope within two standard errors of zero) and whose slope is
    two standard errors or more away from the drifting one's; else no separation."""
    from .analysis import TOLERANCE_PER_DOUBLING

    drifting = [label for label, v in depth.items() if v.outcome == "drifts"]
    others = [label for label, v in depth.items() if v.outcome != "drifts"]
    if not drifting or not others:
        return "this run does not separate them (see the slopes above): more seeds would."
    move_label, move = drifting[0], depth[drifting[0]]
    moves = (f"{move_label} does not ({move.slope:+.2f} +- {move.error:.2f}, {abs(move.slope) / move.error:.1f} "
             "standard errors from zero)")
    steady = [label for label in others if abs(depth[label].slope) <= TOLERANCE_PER_DOUBLING]
    if steady:
        keep = depth[steady[0]]
        return (f"{steady[0]} keeps its optimal lr across depth ({keep.slope:+.2f} +- {keep.error:.2f} log2 per "
                f"doubling, within the {TOLERANCE_PER_DOUBLING:.2f} bar); {moves}. Tune {steady[0]} proxies and reuse "
                "their lr on deeper targets.")
    keep_label = min(others, key=lambda label: abs(depth[label].slope))
    keep = depth[keep_label]
    gap, gap_error = move.slope - keep.slope, math.hypot(move.error, keep.error)
    if abs(gap) < 2 * gap_error:
        return (f"this run does not separate them (their depth slopes differ by {gap:+.2f} +- {gap_error:.2f}, "
                "under two standard errors): more seeds would.")
    return (f"{keep_label} shows no significant drift with depth ({keep.slope:+.2f} +- {keep.error:.2f} log2 per "
            f"doubling), though it is not yet measured within the {TOLERANCE_PER_DOUBLING:.2f} bar; {moves}. The "
            f"two slopes differ by {gap:+.2f} +- {gap_error:.2f} ({abs(gap) / gap_error:.1f} standard errors). Prefer "
            f"{keep_label} proxies; more seeds would show whether it holds.")


def verdict_lines(trends: dict) -> list[str]:
    """The demo's last word, from its own fits: which parametrization keeps its optimal lr across depth (its
    slope within the bar, whether or not the error is small enough to call it proven), which one drifts."""
    from .analysis import summary_sentence

    lines = [f"[demo] {summary_sentence(t)}" for t in trends.values()]
    depth = {label: t.verdicts["depth"] for label, t in trends.items() if "depth" in t.verdicts}
    for label, v in depth.items():
        small, large = trends[label].sizes["depth"]
        lines.append(f"[demo]   {label}: optimal lr {v.slope:+.2f} +- {v.error:.2f} log2 per depth doubling, "
                     f"{v.drift:+.2f} log2 from depth {small:g} to {large:g}: {v.outcome}")
    lines.append("[demo] verdict: " + _depth_verdict(depth))
    return lines


def _sweep(cfg, shards: Path, uri: str):
    from .sweep import run_sweep

    print(f"[demo] study {cfg.study.name}: {len(cfg.trials())} proxy trials "
          f"({', '.join(sorted(set(cfg.shapes.variants)))}; widths {cfg.shapes.widths}, depths "
          f"{cfg.shapes.depths}; {len(cfg.lrs())} learning rates; seeds {cfg.seeds}), {cfg.study.steps} steps each",
          flush=True)
    return run_sweep(cfg, tracking_uri=uri)


def _train_target(study, out_dir: Path, shards: Path, uri: str) -> tuple[int, dict]:
    """Transfer by the fitted trend of the study's analysis to the recommended target, and train it."""
    from .transfer import describe, launch_target, plan_transfer

    target_dir = out_dir / "target"
    plan = plan_transfer(study, str(CONFIGS / "demo_target.yaml"), out=str(target_dir / "target.yaml"),
                         tracking_uri=uri, num_gpus=2, ranks=1,
                         overrides=[f"data.shards_dir={shards}", f"run.output_dir={target_dir}", "run.resume=never"])
    print(describe(plan), flush=True)
    for old in (target_dir / "checkpoints").glob("step_*"):  # a rerun of the demo trains the target afresh
        shutil.rmtree(old)
    print("[demo] training the target with the transferred settings", flush=True)
    code = launch_target(plan, "inprocess")
    return code, json.loads((target_dir / "result.json").read_text())


def run_demo(out: str = "demo", study_config: str | None = None, tracking_uri: str | None = None) -> int:
    from .config import load_study
    from .report import write_report
    from .store import client_for
    from .study_analysis import StudyAnalysis

    start = time.perf_counter()
    out_dir = Path(out)
    uri = resolve_tracking_uri(tracking_uri)
    shards = out_dir / "shards"
    ensure_shards(shards)
    cfg = load_study(study_config or str(CONFIGS / "demo_study.yaml"), [f"study.output_dir={out_dir / 'trials'}"])
    cfg.base = with_values(cfg.base, {"data.shards_dir": str(shards)})
    summary = _sweep(cfg, shards, uri)
    print(f"[demo] sweep done after {time.perf_counter() - start:.0f} s", flush=True)
    report_dir = out_dir / "report"
    client = client_for(uri)
    study = StudyAnalysis.load(client, cfg.study.name, cfg.study.metric, cfg.study.experiment)
    write_report(client, study, report_dir)  # the report, the transfer and the verdict read this one analysis
    code, result = _train_target(study, out_dir, shards, uri)
    minutes = (time.perf_counter() - start) / 60
    ui = "mutransfer ui --study " + cfg.study.name + ("" if tracking_uri is None else f" --tracking-uri {uri}")
    print(f"\n[demo] done in {minutes:.1f} min: {len(summary.ran)} trials run, {len(summary.skipped)} reused; "
          f"target {result['status']} with eval loss {result['eval'].get('eval/loss', float('nan')):.3f}, "
          f"top-1 {result['eval'].get('eval/top1', float('nan')):.3f}")
    print(f"[demo] plots and tables: {report_dir.resolve()} (lr_curves.png, trend.png, optima.md)")
    print(f"[demo] MLflow store: {uri}; open the UI with:  {ui}")
    print("\n".join(verdict_lines(study.trends)))
    return code
