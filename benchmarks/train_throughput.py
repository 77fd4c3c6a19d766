"""Training throughput (images/s) and MFU per ZeRO stage and precision, against a plain torch loop.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/train_throughput.py              # tiny ViT on CPU
    .venv/bin/python benchmarks/train_throughput.py --preset vit_b16 --stages 0,1 --precisions bf16 \
        --compile both --timm-baseline                                           # ViT-B/16 on a GPU

One process (world size 1; ZeRO's partitioning is then trivial, but its code paths and copies are real).
Every configuration trains the same model on the same random batch, so the data pipeline is out of the
picture (benchmarks/data_pipeline.py measures that). The baseline is a plain torch AdamW loop over the
same model in the same process (with --timm-baseline, timm's vit_base_patch16_224 as well); the printed
ratio is images/s of each row over the baseline's. MFU = training FLOPs per image (from the model's shapes)
x images/s / the GPU's dense bf16 peak; there is none on CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

PRESETS = {
    "tiny": dict(width=128, depth=4, head_dim=32, patch_size=8, img_size=32, batch_size=64),
    "vit_s16": dict(width=384, depth=12, head_dim=64, patch_size=16, img_size=224, batch_size=256),
    "vit_b16": dict(width=768, depth=12, head_dim=64, patch_size=16, img_size=224, batch_size=256),
}


def timed(step, warmup: int, steps: int, device: torch.device) -> float:
    """Median seconds per step after warmup."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off")
    parser.add_argument("--timm-baseline", action="store_true", help="also time timm's vit_base_patch16_224")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    from mutransfer.data import DataConfig
    from mutransfer.models import create_model
    from mutransfer.train.config import DeepSpeedSection, OptimSection, RunConfig
    from mutransfer.train.hardware import peak_flops
    from mutransfer.train.optim import build_optimizer
    from mutransfer.train.trainer import deepspeed_config, init_distributed, shutdown_distributed

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    init_distributed()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = dict(PRESETS[args.preset])
    batch = args.batch_size or preset.pop("batch_size")
    preset.pop("batch_size", None)
    images = torch.randn(batch, 3, preset["img_size"], preset["img_size"], device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    peak = peak_flops()

    def make_model():
        torch.manual_seed(0)
        return create_model("vit", num_classes=1000, parametrization="mup", base_width=preset["width"] // 2,
                            **preset).to(device)

    flops = make_model().flops_per_image()
    rows: list[tuple[str, float]] = []

    def plain_loop(model, precision: str, compiled: bool) -> float:
        optimizer = build_optimizer(model, "adamw", lr=1e-4, weight_decay=0.05)
        forward = torch.compile(model) if compiled else model
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

        def step():
            with autocast:
                loss = F.cross_entropy(forward(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return timed(step, args.warmup, args.steps, device)

    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for precision in args.precisions.split(","):
        for compiled in compile_modes:
            suffix = f"{precision}{' compiled' if compiled else ''}"
            rows.append((f"torch AdamW loop, {suffix}", batch / plain_loop(make_model(), precision, compiled)))
            if args.timm_baseline:
                import timm

                timm_model = timm.create_model("vit_base_patch16_224", num_classes=1000).to(device)
                rows.append((f"timm vit_base_patch16_224 AdamW loop, {suffix}",
                             batch / plain_loop(timm_model, precision, compiled)))
            for stage in [int(s) for s in args.stages.split(",")]:
                model = make_model()
                optimizer = build_optimizer(model, "adamw", lr=1e-4, weight_decay=0.05)
                # the trainer's own DeepSpeed config, so that the benchmark measures what training runs
                config = deepspeed_config(RunConfig(
                    data=DataConfig(batch_size=batch), optim=OptimSection(grad_clip=0.0, accumulation=1),
                    deepspeed=DeepSpeedSection(zero_stage=stage, bf16=precision == "bf16")), world_size=1)
                engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
                if compiled:
                    engine.compile()
                inputs = images.to(torch.bfloat16) if precision == "bf16" else images

                def step(engine=engine, inputs=inputs):
                    loss = F.cross_entropy(engine(inputs).float(), labels)
                    engine.backward(loss)
                    engine.step()

                rows.append((f"DeepSpeed ZeRO-{stage}, {suffix}", batch / timed(step, args.warmup, args.steps, device)))
                engine.destroy()

    print(f"\nViT {preset} batch {batch} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} "
          f"({torch.get_num_threads()} threads), median of {args.steps} steps; "
          f"{flops / 1e9:.2f} GFLOP per training image")
    print(f"{'configuration':<48} {'images/s':>10} {'vs torch loop':>14} {'MFU':>7}")
    baseline = {}
    for name, ips in rows:
        suffix = name.split(", ", 1)[1]
        if name.startswith("torch AdamW loop"):
            baseline[suffix] = ips
        mfu = f"{flops * ips / peak:.1%}" if peak else "-"
        print(f"{name:<48} {ips:>10.1f} {ips / baseline[suffix]:>14.3f} {mfu:>7}")
    shutdown_distributed()


if __name__ == "__main__":
    main()
