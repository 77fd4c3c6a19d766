"""`mutransfer demo` (what `make demo` runs): the whole proxy-to-target workflow on CPU.

1. synthetic, learnable shards (10 classes of shape x colour x texture);
2. a proxy study comparing mup and depth_mup ViTs over 2 widths x 3 depths x 5 learning rates;
3. the report: where the optimum sits per proxy shape, and how far it moves;
4. transfer of the best settings to a wider and deeper target, trained for real.
Everything is recorded in the local MLflow store (sqlite:///mlflow.db unless told otherwise).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from mutransfer.data import read_info, write_synthetic_shards
from mutransfer.train.tracking import resolve_tracking_uri

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TRAIN_SAMPLES, EVAL_SAMPLES, IMAGE_SIZE, CLASSES = 6000, 500, 32, 10


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
                           samples_per_shard=250, progress=True)


def run_demo(out: str = "demo", study_config: str | None = None, tracking_uri: str | None = None) -> int:
    from .study import load_study
    from .sweep import run_sweep
    from .transfer import describe, launch_target, plan_transfer

    start = time.perf_counter()
    out_dir = Path(out)
    uri = resolve_tracking_uri(tracking_uri)
    shards = out_dir / "shards"
    ensure_shards(shards)

    study_path = study_config or str(CONFIGS / "demo_study.yaml")
    cfg = load_study(study_path, [f"study.output_dir={out_dir / 'trials'}"])
    cfg.study.overrides = [*cfg.study.overrides, f"data.shards_dir={shards}"]
    print(f"[demo] study {cfg.study.name}: {len(cfg.trials())} proxy trials "
          f"({', '.join(sorted(set(cfg.shapes.parametrizations)))}; widths {cfg.shapes.widths}, depths "
          f"{cfg.shapes.depths}; {len(cfg.lrs())} learning rates), {cfg.study.steps} steps each", flush=True)
    summary = run_sweep(cfg, tracking_uri=uri)
    print(f"[demo] sweep done after {time.perf_counter() - start:.0f} s", flush=True)

    report_dir = out_dir / "report"
    try:
        from .report import write_report
        from .store import client_for

        write_report(client_for(uri), cfg.study.name, report_dir, metric=cfg.study.metric,
                     experiment=cfg.study.experiment)
    except ImportError:
        report_dir = None

    target = str(CONFIGS / "demo_target.yaml")
    plan = plan_transfer(cfg.study.name, target, out=str(out_dir / "target" / "target.yaml"), metric=cfg.study.metric,
                         tracking_uri=uri, experiment=cfg.study.experiment, num_gpus=2,
                         overrides=[f"data.shards_dir={shards}", f"run.output_dir={out_dir / 'target'}",
                                    "run.resume=never"])
    print(describe(plan, cfg.study.metric), flush=True)
    target_dir = out_dir / "target"
    for old in (target_dir / "checkpoints").glob("step_*"):  # a rerun of the demo trains the target afresh
        shutil.rmtree(old)
    print("[demo] training the target with the transferred settings", flush=True)
    code = launch_target(plan, "inprocess")
    result = json.loads((target_dir / "result.json").read_text())
    minutes = (time.perf_counter() - start) / 60
    ui = "mutransfer ui --study " + cfg.study.name + ("" if tracking_uri is None else f" --tracking-uri {uri}")
    print(f"\n[demo] done in {minutes:.1f} min: {len(summary.ran)} trials run, {len(summary.skipped)} reused; "
          f"target {result['status']} with eval top-1 {result['eval'].get('eval/top1', float('nan')):.3f}")
    if report_dir is not None:
        print(f"[demo] plots and optimum table: {report_dir.resolve()}")
    print(f"[demo] MLflow store: {uri}")
    print(f"[demo] open the UI with:  {ui}")
    return code
