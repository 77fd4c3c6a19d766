"""GFLOP/s of one stacked training step against the machine's GEMM peak, and where the step's time goes.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/stacked_step.py                  # depth-16 width-32 proxy, K = 24
    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/stacked_step.py --depth 4 --width 128 --compile

The proxy of configs/demo_proxy.yaml at --width and --depth; K members (default the demo's 24 per stack: eight
learning rates x three seeds, so each seed's eight members share a batch) stepped as `train.stacked` steps them
(StackedModel's vmapped loss, backward, StackedOptimizer), against one member's lone step (the same model and
torch AdamW), interleaved round robin, medians. --compile adds the stacked loss under torch.compile, as a
study whose base config sets run.compile=model trains its stacks. A torch.profiler pass over a few eager
stacked steps then splits the step's CPU time into matrix products, the SDPA kernel and everything else
(elementwise ops, normalisation, copies, the optimizer); attention over at most 32 tokens runs as batched
matrix products and softmax (`train/stacked_attention.py`), so it counts under those.
Training FLOPs are what the model computes per image (`flops_per_image(performed=True)`) x images; the peak
is the median fp32 `torch.mm` of 2048 x 2048 (sweep_throughput.py's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_throughput import gemm_peak  # noqa: E402

from mutransfer.models import create_model  # noqa: E402
from mutransfer.models.optim import build_optimizer  # noqa: E402
from mutransfer.process import keep_freed_memory  # noqa: E402
from mutransfer.train.config import config_from_dict  # noqa: E402
from mutransfer.train.engine import COMPILE_KWARGS  # noqa: E402
from mutransfer.train.stacked_model import StackedModel  # noqa: E402
from mutransfer.train.stacked_optim import MemberHypers, StackedOptimizer, groups_of  # noqa: E402
from mutransfer.typed_config import read_yaml_mapping  # noqa: E402

PROXY = Path(__file__).resolve().parents[1] / "configs" / "demo_proxy.yaml"
MATMULS = ("aten::bmm", "aten::mm", "aten::addmm", "aten::baddbmm", "aten::matmul")
CLASSES = 10


def proxy_config(args: argparse.Namespace):
    raw = read_yaml_mapping(PROXY)
    raw["model"].update(width=args.width, depth=args.depth)
    raw["data"].update(num_classes=CLASSES)
    return config_from_dict(raw)


def members(cfg, count: int) -> list[torch.nn.Module]:
    models = []
    for index in range(count):
        model = create_model(cfg.model.name, **cfg.model.create_kwargs(cfg.data.img_size, CLASSES))
        torch.manual_seed(index)
        model.init_weights()
        models.append(model)
    return models


def stacked_step(cfg, models: list[torch.nn.Module], seeds: int, compiled: bool):
    """A function running one optimizer step of the stack as `train.stacked` runs it (eager, or its loss
    under torch.compile as run.compile=model compiles it)."""
    stack = StackedModel(models, torch.device("cpu"), COMPILE_KWARGS["model"] if compiled else None)
    hypers = [MemberHypers(cfg.optim.lr * 2.0 ** (i % 8 - 4), cfg.optim.beta1, 0.0) for i in range(len(models))]
    optimizer = StackedOptimizer(stack.params, groups_of(models[0], cfg.optim), cfg.optim, hypers)
    size = cfg.data.img_size
    batches = torch.randn(seeds, cfg.data.batch_size, 3, size, size)
    labels = torch.randint(0, CLASSES, (seeds, cfg.data.batch_size))
    slot = torch.arange(len(models)) % seeds
    images, targets = batches[slot], labels[slot]  # each member its seed's batch, as StackData.combine gives it
    criterion = torch.nn.CrossEntropyLoss()

    def step() -> None:
        stack.losses(images, targets, criterion, shared=False).sum().backward()
        optimizer.step(1.0)
        for param in stack.params.values():
            param.grad = None

    return step


def lone_step(cfg, model: torch.nn.Module):
    optimizer = build_optimizer(model, cfg.optim)
    size = cfg.data.img_size
    images = torch.randn(cfg.data.batch_size, 3, size, size)
    labels = torch.randint(0, CLASSES, (cfg.data.batch_size,))

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def time_split(step, steps: int = 3) -> dict[str, float]:
    """Self CPU seconds of `steps` steps: matrix products, attention, the rest."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            step()
    split = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        kind = "matmul" if event.key in MATMULS else "attention" if "scaled_dot_product" in event.key else "other"
        split[kind] += event.self_cpu_time_total / 1e6
    return split


def main() -> None:
    keep_freed_memory()  # as in the product's processes (mutransfer.process)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--members", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=3, help="distinct batches among the members")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    cfg = proxy_config(args)
    models = members(cfg, args.members)
    per_image = models[0].flops_per_image(performed=True)
    steps = {"lone": lone_step(cfg, members(cfg, 1)[0]),
             "stacked": stacked_step(cfg, models, args.seeds, compiled=False)}
    if args.compile:
        started = time.perf_counter()
        steps["stacked, compiled"] = stacked_step(cfg, members(cfg, args.members), args.seeds, compiled=True)
        steps["stacked, compiled"]()
        print(f"compiling the stacked loss: {time.perf_counter() - started:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(2 + args.steps):
        for name, step in steps.items():
            elapsed = timed(step)
            if index >= 2:
                times[name].append(elapsed)
    report(args, cfg, per_image, times, time_split(steps["stacked"]))


def report(args, cfg, per_image: float, times: dict[str, list[float]], split: dict[str, float]) -> None:
    peak = gemm_peak()
    print(f"ViT width {args.width} depth {args.depth}, batch {cfg.data.batch_size} of {cfg.data.img_size} px, "
          f"{args.members} members over {args.seeds} batches; torch threads {torch.get_num_threads()}; "
          f"fp32 GEMM peak {peak / 1e9:.0f} GFLOP/s")
    print("| step | ms (median) | ms per member | GFLOP/s | % of GEMM peak |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        count = 1 if name == "lone" else args.members
        seconds = statistics.median(values)
        rate = per_image * cfg.data.batch_size * count / seconds
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / count * 1e3:.2f} | {rate / 1e9:.1f} | {rate / peak:.1%} |")
    total = sum(split.values())
    print("eager stacked step, self CPU time: " + ", ".join(f"{kind} {share / total:.0%}" for kind, share in split.items()))


if __name__ == "__main__":
    main()
