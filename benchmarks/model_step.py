"""Forward + backward + AdamW step time of our ViT under each parametrization vs timm's ViT (SP).

    .venv/bin/python benchmarks/model_step.py                      # CPU default: ViT-Ti-like, 64 px
    .venv/bin/python benchmarks/model_step.py --device cuda --width 768 --depth 12 --img-size 224 \
        --patch-size 16 --batch-size 64                               # ViT-B/16 on a GPU

The models run interleaved in one process (round-robin, one step each), so machine noise hits them alike;
the median step times are compared as ratios ours / timm. Goal: <= 1.03 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT

from mutransfer.models import create_model
from mutransfer.models.optim import OptimSection, build_optimizer


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images, labels, device: str):
    def step() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parametrizations", default="sp,mup,depth_mup,completep")
    args = parser.parse_args()

    torch.manual_seed(0)
    dims = dict(img_size=args.img_size, patch_size=args.patch_size, num_classes=1000)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=args.device)
    steps = {}
    timm_model = TimmViT(embed_dim=args.width, depth=args.depth, num_heads=args.width // 64, **dims).to(args.device)
    timm_opt = torch.optim.AdamW(timm_model.parameters(), lr=1e-4, weight_decay=0.05)
    steps["timm"] = make_step(timm_model, timm_opt, images, labels, args.device)
    for name in args.parametrizations.split(","):
        model = create_model("vit", width=args.width, depth=args.depth, parametrization=name,
                             base_width=args.width // 2, base_depth=max(1, args.depth // 2), **dims).to(args.device)
        opt = build_optimizer(model, OptimSection(lr=1e-4, weight_decay=0.05))
        steps[name] = make_step(model, opt, images, labels, args.device)

    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            elapsed = step()
            if i >= args.warmup:
                times[name].append(elapsed)

    baseline = statistics.median(times["timm"])
    print(f"ViT width {args.width} depth {args.depth} img {args.img_size}/{args.patch_size} batch "
          f"{args.batch_size} on {args.device} ({torch.get_num_threads()} threads), {args.steps} interleaved steps")
    print(f"{'model':<12} {'median ms':>10} {'ratio vs timm':>14}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<12} {median * 1e3:>10.1f} {median / baseline:>14.3f}")


if __name__ == "__main__":
    main()
