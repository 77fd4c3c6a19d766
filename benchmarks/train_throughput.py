"""Training throughput of our trainer's engine against timm's ViT in a plain AdamW loop, in one process.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/train_throughput.py --preset tiny --precisions fp32 \
        --compile both --data-fed                                                  # CPU, a few minutes
    .venv/bin/python benchmarks/train_throughput.py --preset vit_b16 --compile both --data-fed   # one GPU
    .venv/bin/python benchmarks/train_throughput.py --preset vit_s16 --compile both

Rows, for each precision and compile mode: the baseline, timm's VisionTransformer with the preset's shape
(for vit_b16 that is vit_base_patch16_224) in a plain loop (autocast, torch AdamW: fused on a GPU, foreach
on CPU; `torch.compile` when compiled); then our ViT (mup) through the trainer's own `build_engine` at each
ZeRO stage (the DeepSpeed config, optimizer groups and `run.compile` that training uses; ZeRO-3 has no
compile). All configurations of a precision and compile mode are built first and then timed interleaved:
round robin, one block of --block steps each per round, for --rounds rounds; a row's time is the median
block, so machine noise (other processes, thermal drift) hits every row alike. Each row: images/s, its ratio
to the timm loop of the same precision and compile mode, MFU (training FLOPs per image from the shapes x
images/s / the GPU's dense bf16 peak; none on CPU) and peak memory over its warmup (GPU: max allocated;
CPU: not measured per row, RSS only grows).

--data-fed: the first ZeRO stage again, fed by the real train loader over shards written here (synthetic
images at 1.15x the crop size, --workers loader processes, --decode cpu or gpu) against the same engine fed a
fixed tensor, interleaved the same way: the data stall ratio (goal on a GPU node: >= 0.95).

World size 1: ZeRO's partitioning is trivial, but its code paths and copies are real.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mutransfer.typed_config import with_values

PRESETS = {
    "tiny": dict(width=128, depth=4, head_dim=32, patch_size=8, img_size=32, batch_size=64),
    "vit_s16": dict(width=384, depth=12, head_dim=64, patch_size=16, img_size=224, batch_size=256),
    "vit_b16": dict(width=768, depth=12, head_dim=64, patch_size=16, img_size=224, batch_size=256),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def warm(step, warmup: int, device: torch.device) -> float | None:
    """Run the first steps (they compile, allocate); the peak memory they reached (GPU only)."""
    reset_peak(device)
    for _ in range(warmup):
        step()
    _sync(device)
    return peak_gb(device)


def interleaved(steps: dict[str, object], rounds: int, block: int, device: torch.device) -> dict[str, float]:
    """Median seconds per step of each named step function, timed round robin: every round runs one block of
    `block` steps of each, in turn."""
    blocks: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(block):
                step()
            _sync(device)
            blocks[name].append((time.perf_counter() - start) / block)
    return {name: statistics.median(times) for name, times in blocks.items()}


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timm_step(shape: dict, batch: tuple, precision: str, compiled: bool, device):
    """One step of timm's ViT in a plain AdamW loop."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=shape["img_size"], patch_size=shape["patch_size"], embed_dim=shape["width"],
                              depth=shape["depth"], num_heads=shape["width"] // shape["head_dim"],
                              num_classes=1000).to(device)
    kernels = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **kernels)
    forward = torch.compile(model) if compiled else model
    images, labels = batch

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(forward(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def run_config(shape: dict, batch_size: int, stage: int, precision: str, compiled: bool, args):
    from mutransfer.data import DataConfig
    from mutransfer.train.config import DeepSpeedSection, ModelSection, OptimSection, RunConfig, RunSection

    model = ModelSection(name="vit", width=shape["width"], depth=shape["depth"], head_dim=shape["head_dim"],
                         patch_size=shape["patch_size"], parametrization="mup", base_width=shape["width"] // 2)
    return RunConfig(model=model, data=DataConfig(batch_size=batch_size, img_size=shape["img_size"],
                                                  num_workers=args.workers, decode=args.decode),
                     optim=OptimSection(lr=1e-4, weight_decay=0.05),
                     deepspeed=DeepSpeedSection(zero_stage=stage, bf16=precision == "bf16"),
                     run=RunSection(steps=1, compile="model" if compiled else "off"))


def our_engine(cfg):
    """The trainer's engine for `cfg` (world size 1), and the model's FLOPs per training image."""
    from mutransfer.train.engine import build_engine, build_model, deepspeed_config

    ds_config = deepspeed_config(cfg, world_size=1)
    model = build_model(cfg, ds_config, num_classes=1000)
    return build_engine(cfg, model, ds_config, total_steps=1000, warmup_steps=0), model.flops_per_image()


def engine_step(engine, cfg, next_batch):
    def step():
        images, labels = next_batch()[:2]
        if cfg.deepspeed.bf16:
            images = images.to(torch.bfloat16)
        loss = F.cross_entropy(engine(images).float(), labels)
        engine.backward(loss)
        engine.step()

    return step


def benchmark_rows(args, shape: dict, batch_size: int, device: torch.device) -> tuple[list, float]:
    """(name, images/s, baseline images/s, peak GB) per configuration, and FLOPs per image."""
    images = torch.randn(batch_size, 3, shape["img_size"], shape["img_size"], device=device)
    labels = torch.randint(0, 1000, (batch_size,), device=device)
    rows, flops = [], 0.0
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for precision in args.precisions.split(","):
        for compiled in modes:
            suffix = f"{precision}{', compiled' if compiled else ''}"
            steps = {f"timm ViT, plain AdamW loop, {suffix}": timm_step(shape, (images, labels), precision, compiled,
                                                                      device)}
            engines = []
            for stage in [int(s) for s in args.stages.split(",")]:
                if compiled and stage == 3:
                    continue  # run.compile refuses ZeRO-3 (see RunSection.compile)
                cfg = run_config(shape, batch_size, stage, precision, compiled, args)
                engine, flops = our_engine(cfg)
                engines.append(engine)
                steps[f"ours, ZeRO-{stage}, {suffix}"] = engine_step(engine, cfg, lambda: (images, labels))
            peaks = {name: warm(step, args.warmup, device) for name, step in steps.items()}
            seconds = interleaved(steps, args.rounds, args.block, device)
            base = batch_size / next(iter(seconds.values()))
            rows += [(name, batch_size / s, base, peaks[name]) for name, s in seconds.items()]
            for engine in engines:
                engine.destroy()
    return rows, flops


def data_stall(args, shape: dict, batch_size: int, device: torch.device) -> tuple[float, float]:
    """(data-fed, synthetic-fed) images/s of the first stage's engine, compiled if asked, interleaved."""
    from mutransfer.data import build_train_loader, write_synthetic_shards

    precision = args.precisions.split(",")[0]
    cfg = run_config(shape, batch_size, int(args.stages.split(",")[0]), precision, args.compile != "off", args)
    with tempfile.TemporaryDirectory(prefix="mutransfer-bench-") as tmp:
        samples = batch_size * (args.warmup + args.rounds * args.block + 2) * 2
        write_synthetic_shards(tmp, "train", 100, samples, image_size=int(shape["img_size"] * 1.15), seed=0,
                               samples_per_shard=max(64, samples // 8), workers=2)
        cfg = with_values(cfg, {"data.shards_dir": tmp})
        batches = iter(build_train_loader(cfg.data, device=device))
        images, labels = next(batches)[:2]
        engine, _ = our_engine(cfg)
        steps = {"fed": engine_step(engine, cfg, lambda: next(batches)),
                 "fixed": engine_step(engine, cfg, lambda: (images, labels))}
        for step in steps.values():
            warm(step, args.warmup, device)
        seconds = interleaved(steps, args.rounds, args.block, device)
        engine.destroy()
    return batch_size / seconds["fed"], batch_size / seconds["fixed"]


def print_table(args, shape: dict, batch_size: int, device: torch.device, where: str) -> list[dict]:
    """Measure and print the table; its rows as dicts (name, images/s, ratio to timm, MFU, peak GB)."""
    from mutransfer.train.hardware import peak_flops

    rows, flops = benchmark_rows(args, shape, batch_size, device)
    peak = peak_flops()
    print(f"\n{args.preset} {shape}, batch {batch_size}, on {where}; interleaved, median of {args.rounds} blocks "
          f"of {args.block} steps after {args.warmup}; {flops / 1e9:.2f} GFLOP per training image")
    print(f"{'configuration':<44} {'images/s':>10} {'vs timm':>8} {'MFU':>7} {'peak GB':>8}")
    table = []
    for name, ips, base, memory in rows:
        mfu = flops * ips / peak if peak else None
        table.append(dict(name=name, images_per_s=ips, vs_timm=ips / base, mfu=mfu, peak_gb=memory))
        print(f"{name:<44} {ips:>10.1f} {ips / base:>8.3f} {f'{mfu:.1%}' if mfu else '-':>7} "
              f"{f'{memory:.2f}' if memory else '-':>8}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--precisions", default="bf16", help="comma-separated: bf16, fp32")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=7, help="round-robin rounds (the median is over them)")
    parser.add_argument("--block", type=int, default=3, help="steps per configuration per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--data-fed", action="store_true", help="also measure the data stall ratio")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--decode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--data-fed-only", action="store_true", help="skip the table: only the data stall ratio")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    from mutransfer.process import exit_process
    from mutransfer.train.distributed import init_distributed, shutdown_distributed

    init_distributed()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = dict(PRESETS[args.preset])
    preset_batch = shape.pop("batch_size")
    batch_size = args.batch_size or preset_batch
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    figures: dict = {"preset": args.preset, "batch_size": batch_size, "device": where, "rows": []}
    if not args.data_fed_only:
        figures["rows"] = print_table(args, shape, batch_size, device, where)
    if args.data_fed or args.data_fed_only:
        fed, fixed = data_stall(args, shape, batch_size, device)
        figures["data_fed"] = dict(fed=fed, fixed=fixed, decode=args.decode, workers=args.workers)
        print(f"data-fed {fed:.1f} images/s vs synthetic-fed {fixed:.1f}: ratio {fed / fixed:.3f} "
              f"({args.workers} loader workers, decode={args.decode}; goal >= 0.95)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    shutdown_distributed()
    exit_process(0)


if __name__ == "__main__":
    main()
