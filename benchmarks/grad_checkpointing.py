"""Memory that `model.grad_checkpointing` saves, and what it costs in time, for one forward + backward.

    .venv/bin/python benchmarks/grad_checkpointing.py                              # small ViT on CPU
    .venv/bin/python benchmarks/grad_checkpointing.py --preset vit_l16 --device cuda --dtype bf16

Two measures, each for checkpointing off and on:
- activations kept for the backward pass: the bytes of every tensor autograd saves (counted with
  torch.autograd.graph.saved_tensors_hooks; exact, and the same on any device);
- peak memory: on a GPU the peak allocated in a forward + backward; on CPU the peak resident set size of a
  fresh child process that builds the model and runs one step (RSS only grows, hence one process per
  measurement).
Time: median of --steps forward + backward steps, as a ratio on / off (recomputation costs about one more
forward).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

PRESETS = {
    "small": dict(width=256, depth=8, head_dim=64, patch_size=8, img_size=64, batch_size=32),
    "vit_l16": dict(width=1024, depth=24, head_dim=64, patch_size=16, img_size=224, batch_size=64),
}


def build(preset: str, checkpointing: bool, device: str, dtype: str):
    from mutransfer.models import create_model

    shape = dict(PRESETS[preset])
    batch = shape.pop("batch_size")
    torch.manual_seed(0)
    model = create_model("vit", num_classes=1000, parametrization="mup", base_width=shape["width"] // 2, **shape)
    model = model.to(device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    model.set_grad_checkpointing(checkpointing)
    images = torch.randn(batch, 3, shape["img_size"], shape["img_size"], device=device, dtype=next(model.parameters()).dtype)
    return model, images, torch.randint(0, 1000, (batch,), device=device)


def step(model, images, labels) -> None:
    F.cross_entropy(model(images).float(), labels).backward()
    model.zero_grad(set_to_none=True)


def saved_bytes(model, images, labels) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(model, images, labels)
    return total


def child(args) -> None:
    """One measurement in this (fresh) process: print JSON."""
    model, images, labels = build(args.preset, args.checkpointing == 1, args.device, args.dtype)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step(model, images, labels)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step(model, images, labels)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    print(json.dumps({"saved": saved_bytes(model, images, labels), "peak": peak, "step": statistics.median(times)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--checkpointing", type=int, default=None, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.checkpointing is not None:
        return child(args)
    results = {}
    for on in (0, 1):
        out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--device", args.device, "--dtype",
                              args.dtype, "--steps", str(args.steps), "--checkpointing", str(on)],
                             capture_output=True, text=True, check=True)
        results[on] = json.loads(out.stdout.strip().splitlines()[-1])
    peak_kind = "GPU peak allocated" if args.device == "cuda" else "CPU peak RSS growth in the step"
    print(f"ViT {args.preset} {PRESETS[args.preset]} {args.dtype} on {args.device}")
    for on, r in results.items():
        print(f"checkpointing {'on ' if on else 'off'}: activations saved {r['saved'] / 2**20:8.1f} MiB, "
              f"{peak_kind} {r['peak'] / 2**20:8.1f} MiB, step {r['step'] * 1000:7.1f} ms")
    off, on = results[0], results[1]
    print(f"on / off: activations {on['saved'] / off['saved']:.3f}, peak {on['peak'] / off['peak']:.3f}, "
          f"step time {on['step'] / off['step']:.2f}")


if __name__ == "__main__":
    main()
