"""`mutransfer demo` (what `make demo` runs): the whole proxy-to-target workflow on CPU.

1. synthetic, learnable shards (10 classes of shape x colour x texture);
2. a proxy study over width (32 -> 128 at depth 2) comparing the standard parametrization, whose optimal lr
   falls as the model widens, against the recommended variant (configs/demo_study.yaml): the comparison with
   the largest effect, so that three seeds settle it on every run;
3. the report: fitted optima, the trend of each variant, plots;
4. transfer by the fitted trend to a wider and deeper target, trained for real, and its eval loss against the
   best proxy of its variant;
5. the verdict, from the demo's own numbers: which variant to tune proxies under, the one whose optimum moves
   least when the other drifts and moves more by two standard errors or more.
Everything is recorded in the local MLflow store (sqlite:///mlflow.db unless told otherwise).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from mutransfer.data import read_info, write_synthetic_shards
from mutransfer.errors import ConfigError
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


TARGET_WORD = {"width": "wider", "depth": "deeper", "batch": "larger-batch", "length": "longer-trained"}


@dataclass(frozen=True)
class Comparison:
    """Two variants along one axis: the one whose optimum moves least (`keep`) against the one that moves most
    among those that drift (`move`); `margin` is how much less `keep` moves (in magnitude: drifting the other
    way is no steadier), in log2 per doubling, with its standard error."""

    keep: str
    move: str
    margin: float
    error: float

    @property
    def errors(self) -> float:
        """The margin in standard errors."""
        if self.error > 0:
            return self.margin / self.error
        return math.copysign(math.inf, self.margin) if self.margin else 0.0

    @property
    def decisive(self) -> bool:
        return self.margin > 0 and self.margin >= 2 * self.error  # equal drifts never decide, however exact


def compare(verdicts: dict) -> Comparison | None:
    """The comparison the demo's verdict rests on; None when fewer than two variants or none drifts."""
    if len(verdicts) < 2:
        return None
    keep = min(verdicts, key=lambda variant: abs(verdicts[variant].slope))
    movers = [variant for variant in verdicts if variant != keep and verdicts[variant].outcome == "drifts"]
    if not movers:
        return None
    move = max(movers, key=lambda variant: abs(verdicts[variant].slope))
    return Comparison(keep, move, abs(verdicts[move].slope) - abs(verdicts[keep].slope),
                      math.hypot(verdicts[move].error, verdicts[keep].error))


def _axis_verdict(axis: str, verdicts: dict) -> str:
    """Which variant to tune proxies under, from the slopes along one axis. The demo's question is comparative,
    so its answer is too (`compare`): decisive when a variant that drifts moves more than the steadiest one by
    two standard errors or more. Whether the steadier slope is measured within the bar by itself follows as a
    qualifier; with three seeds that part is what seeds and float32 rounding move from run to run
    (docs/demo.md), the comparison is not."""
    from .analysis import TOLERANCE_PER_DOUBLING

    if len(verdicts) < 2:
        return f"one variant only ({', '.join(verdicts)}), nothing to compare it with: see its slope above."
    comparison = compare(verdicts)
    if comparison is None:
        if all(v.outcome == "holds" for v in verdicts.values()):
            return f"every variant keeps its optimal lr across {axis}: this axis does not choose between them."
        return "this run does not separate them: no variant's optimum drifts significantly (see the slopes above)."
    keep, move = verdicts[comparison.keep], verdicts[comparison.move]
    compared = (f"across {axis} the optimal lr of {comparison.keep} moves {keep.slope:+.2f} +- {keep.error:.2f} log2 "
                f"per doubling and that of {comparison.move} {move.slope:+.2f} +- {move.error:.2f}: "
                f"{comparison.margin:.2f} +- {comparison.error:.2f} less, {comparison.errors:.1f} standard errors")
    if not comparison.decisive:
        return f"this run does not separate them ({compared}, under two): more seeds would."
    bar = f"the {TOLERANCE_PER_DOUBLING:.2f} bar"
    qualifier = {"holds": f"its slope is measured within {bar}",
                 "unclear": f"whether its own slope is within {bar} needs more seeds",
                 "drifts": "it drifts too, less, and `transfer` carries its fitted slope"}[keep.outcome]
    return (f"tune {comparison.keep} proxies, not {comparison.move}, for {TARGET_WORD.get(axis, 'larger')} targets: "
            f"{compared}; {qualifier}.")


def verdicts_by_axis(trends: dict) -> dict[str, dict]:
    """axis -> {variant: AxisVerdict}, for every axis some variant's law varies along (in `AXES` order)."""
    from .analysis import AXES

    return {axis: {variant: t.verdicts[axis] for variant, t in trends.items() if axis in t.verdicts}
            for axis in AXES if any(axis in t.verdicts for t in trends.values())}


def verdict_lines(trends: dict) -> list[str]:
    """The demo's last word, from its own fits: each variant's slope along each axis the study varied, then per
    axis which variant to tune proxies under (`_axis_verdict`)."""
    from .analysis import summary_sentence

    lines = [f"[demo] {summary_sentence(t)}" for t in trends.values()]
    by_axis = verdicts_by_axis(trends)
    for axis, verdicts in by_axis.items():
        for variant, v in verdicts.items():
            small, large = trends[variant].sizes[axis]
            lines.append(f"[demo]   {variant}: optimal lr {v.slope:+.2f} +- {v.error:.2f} log2 per {axis} doubling, "
                         f"{v.drift:+.2f} log2 from {axis} {small:g} to {large:g}: {v.outcome}")
    lines += [f"[demo] verdict{f' ({axis})' if len(by_axis) > 1 else ''}: " + _axis_verdict(axis, verdicts)
              for axis, verdicts in by_axis.items()]
    return lines


def _sweep(cfg, shards: Path, uri: str):
    from .sweep import run_sweep

    print(f"[demo] study {cfg.study.name}: {len(cfg.trials())} proxy trials "
          f"({', '.join(sorted(set(cfg.shapes.variants)))}; widths {cfg.shapes.widths}, depths "
          f"{cfg.shapes.depths}; {len(cfg.lrs())} learning rates; seeds {cfg.seeds}), {cfg.study.steps} steps each",
          flush=True)
    return run_sweep(cfg, tracking_uri=uri)


def target_config(cfg) -> str:
    """The study's target run config (study.target, found as its base config is), else the shipped one."""
    from .config import resolve_path
    from .transfer import check_target_exists

    target = resolve_path(cfg.study.target, cfg.source) if cfg.study.target else str(CONFIGS / "demo_target.yaml")
    try:
        check_target_exists(target)
    except ConfigError as err:
        raise ConfigError("study.target", f"no such run config: {cfg.study.target!r}") from err
    return target


def _train_target(study, target: str, out_dir: Path, shards: Path, uri: str) -> tuple[int, dict, str]:
    """Transfer by the fitted trend of the study's analysis to the target run config, and train it."""
    from .transfer import describe, launch_target, plan_transfer

    target_dir = out_dir / "target"
    plan = plan_transfer(study, target, out=str(target_dir / "target.yaml"),
                         tracking_uri=uri, num_gpus=2, ranks=1,
                         overrides=[f"data.shards_dir={shards}", f"run.output_dir={target_dir}", "run.resume=never"])
    print(describe(plan), flush=True)
    for old in (target_dir / "checkpoints").glob("step_*"):  # a rerun of the demo trains the target afresh
        shutil.rmtree(old)
    print("[demo] training the target with the transferred settings", flush=True)
    code = launch_target(plan, "inprocess")
    return code, json.loads((target_dir / "result.json").read_text()), plan.prediction.variant


def target_line(study, variant: str, result: dict) -> str:
    """The target's eval loss against the best seed-averaged proxy of its own variant: the transferred lr at
    work on a bigger model should beat every smaller one it was tuned on."""
    optima = [optimum for shape, optimum in study.optima.items() if shape.variant == variant]
    loss = result["eval"].get("eval/loss", float("nan"))
    if not optima:
        return f"[demo] target eval loss {loss:.3f}; no finished {variant} proxy to compare it with"
    best = min(optima, key=lambda optimum: optimum.value)  # each shape's best grid point, averaged over seeds
    side = "below" if loss < best.value else "NOT below"
    return (f"[demo] target eval loss {loss:.3f}, {side} the best {variant} proxy's {best.value:.3f} (width "
            f"{best.shape.width}, depth {best.shape.depth}, mean over seeds)")


def run_demo(out: str = "demo", study_config: str | None = None, tracking_uri: str | None = None,
             seeds: list[int] | None = None) -> int:
    """The whole workflow; `seeds` replaces the study's seeds and makes it a study of its own (its name
    carries them), so that runs with other seeds in one MLflow store stay apart."""
    from .config import load_study
    from .report import write_report
    from .store import client_for
    from .study_analysis import StudyAnalysis

    start = time.perf_counter()
    out_dir = Path(out)
    uri = resolve_tracking_uri(tracking_uri)
    shards = out_dir / "shards"
    config = study_config or str(CONFIGS / "demo_study.yaml")
    overrides = [f"study.output_dir={out_dir / 'trials'}"]
    if seeds:
        name = load_study(config, overrides).study.name
        overrides += [f"seeds=[{','.join(map(str, seeds))}]", f"study.name={name}-seeds-{'-'.join(map(str, seeds))}"]
    cfg = load_study(config, overrides)
    cfg.base = with_values(cfg.base, {"data.shards_dir": str(shards)})
    target = target_config(cfg)  # a missing target is said before anything runs, not after the sweep
    ensure_shards(shards)
    summary = _sweep(cfg, shards, uri)
    print(f"[demo] sweep done after {time.perf_counter() - start:.0f} s", flush=True)
    report_dir = out_dir / "report"
    client = client_for(uri)
    study = StudyAnalysis.load(client, cfg.study.name, cfg.study.metric, cfg.study.experiment)
    write_report(client, study, report_dir)  # the report, the transfer and the verdict read this one analysis
    code, result, variant = _train_target(study, target, out_dir, shards, uri)
    minutes = (time.perf_counter() - start) / 60
    ui = "mutransfer ui --study " + cfg.study.name + ("" if tracking_uri is None else f" --tracking-uri {uri}")
    print(f"\n[demo] done in {minutes:.1f} min: {len(summary.ran)} trials run, {len(summary.skipped)} reused; "
          f"target {result['status']} with eval loss {result['eval'].get('eval/loss', float('nan')):.3f}, "
          f"top-1 {result['eval'].get('eval/top1', float('nan')):.3f}")
    print(f"[demo] plots and tables: {report_dir.resolve()} (lr_curves.png, trend.png, optima.md)")
    print(f"[demo] MLflow store: {uri}; open the UI with:  {ui}")
    print(target_line(study, variant, result))
    print("\n".join(verdict_lines(study.trends)))
    return code
