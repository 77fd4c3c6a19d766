"""Coordinate checks: do activations keep their size as width (or depth) grows while training?

For each size, one model is trained for a few steps on one fixed batch with a large LR, and the mean
|activation| of every layer's output is recorded before each step, together with the mean |change| since
step 0. Under muP the curves are flat in width; under SP they grow with width from the second step on. With
depth on the x-axis, the last block's output grows like sqrt(L) without a residual multiplier (sp, mup) and
stays flat under depth_mup (alpha = 1/2) and completep (alpha = 1).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mutransfer.errors import UsageError

from .parametrization import Optimizer, resolve_parametrization
from .zoo import create_model

Vary = Literal["width", "depth"]
VARY: tuple[Vary, ...] = get_args(Vary)
# large on purpose: the check is about what a big step does to each layer
DEFAULT_LR: dict[Optimizer, float] = {"adamw": 1e-2, "sgd": 0.5}
CSV_FIELDS = ("layer", "step", "size", "mean_abs", "mean_abs_change")


@dataclass(frozen=True)
class CoordRecord:
    layer: str
    step: int
    size: int
    mean_abs: float
    mean_abs_change: float  # mean |a_t - a_0|: how far training has moved this layer's output


def first_layer_of(block: nn.Module) -> nn.Module | None:
    """The first layer inside a two-layer branch (fc1 of the MLP), where the NFD paper sees learning collapse."""
    mlp = getattr(block, "mlp", None)
    return getattr(mlp, "fc1", None)


def coordinate_modules(model: nn.Module, first_layers: bool = False) -> dict[str, nn.Module]:
    """The modules whose outputs are the network's coordinates, in forward order.

    With `first_layers`, also each block's fc1 as `first_layer.<i>`, whose "change" is its own update
    (W_t - W_0) x: the NFD paper predicts it shrinks like 1/sqrt(L) under alpha = 1/2 unless corrected.
    """
    embed = getattr(model, "patch_embed", None) or model.stem
    modules = {"embed": embed}
    for i, block in enumerate(model.blocks):
        if first_layers and first_layer_of(block) is not None:
            modules[f"first_layer.{i}"] = first_layer_of(block)
        modules[f"block.{i}"] = block
    modules["final_norm"] = model.norm
    modules["logits"] = model.head
    return modules


def _recorder(outputs: dict[str, torch.Tensor], name: str):
    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        outputs[name] = output.detach()

    return hook


def _own_update_recorder(own_updates: dict[str, torch.Tensor], name: str, layer: nn.Linear):
    """(W_t - W_0) x + (b_t - b_0): what the layer's own training did to its output. Its plain output
    change also moves with its input (the residual stream), which hides whether the layer itself learns."""
    weight0, bias0 = layer.weight.detach().clone(), layer.bias.detach().clone()

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        own_updates[name] = F.linear(inputs[0].detach(), layer.weight.detach() - weight0,
                                     layer.bias.detach() - bias0)

    return hook


def _fixed_batch(model: nn.Module, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, model.img_size, model.img_size, generator=generator)
    labels = torch.randint(0, model.num_classes, (batch_size,), generator=generator)
    return images, labels


def run_coord_check(
    model: str = "vit",
    parametrization: str = "mup",
    vary: Vary = "width",
    values: Sequence[int] = (64, 128, 256, 512),
    steps: int = 4,
    optimizer: Optimizer = "adamw",
    lr: float | None = None,
    momentum: float = 0.9,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    first_layers: bool = False,
    **model_kwargs: Any,
) -> list[CoordRecord]:
    """Train one model per size for `steps` steps on one batch; record each layer's coordinates per step."""
    from .optim import OptimSection, build_optimizer

    resolve_parametrization(parametrization)  # a bad name fails before any work
    values = [int(v) for v in values]
    if len(values) < 2 or any(v < 1 for v in values):
        raise UsageError(f"--values needs at least two positive sizes, got {values}")
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    optim = OptimSection(name=optimizer, lr=DEFAULT_LR[optimizer] if lr is None else lr, momentum=momentum)
    records: list[CoordRecord] = []
    for size in tqdm(values, desc=f"coord-check {parametrization} over {vary}", disable=not progress):
        torch.manual_seed(seed)
        net = create_model(model, parametrization=parametrization, **{**model_kwargs, vary: size})
        opt = build_optimizer(net, optim)
        records += _train_and_record(net, opt, size, steps, batch_size, seed, first_layers)
    return records


def _train_and_record(net: torch.nn.Module, opt: torch.optim.Optimizer, size: int, steps: int, batch_size: int,
                      seed: int, first_layers: bool) -> list[CoordRecord]:
    """`steps` optimizer steps of one model on one fixed batch, recording every coordinate module per step."""
    images, labels = _fixed_batch(net, batch_size, seed)
    if hasattr(net, "skip_unread_tokens"):
        net.skip_unread_tokens = False  # the coordinates are every token's, the last block's included
    outputs: dict[str, torch.Tensor] = {}
    own_updates: dict[str, torch.Tensor] = {}
    modules = coordinate_modules(net, first_layers)
    hooks = [module.register_forward_hook(_recorder(outputs, name)) for name, module in modules.items()]
    hooks += [module.register_forward_hook(_own_update_recorder(own_updates, name, module))
              for name, module in modules.items() if name.startswith("first_layer.")]
    first: dict[str, torch.Tensor] = {}
    records: list[CoordRecord] = []
    try:
        for step in range(steps):
            loss = F.cross_entropy(net(images), labels)
            for name, out in outputs.items():
                first.setdefault(name, out)
                change = own_updates[name] if name in own_updates else out - first[name]
                records.append(CoordRecord(layer=name, step=step, size=size, mean_abs=out.abs().mean().item(),
                                           mean_abs_change=change.abs().mean().item()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for hook in hooks:
            hook.remove()
    return records


def last_block_growth(records: Sequence[CoordRecord], step: int, field: str = "mean_abs",
                      prefix: str = "block.") -> float:
    """Growth of the LAST block's output across sizes (for depth sweeps the last block's index differs);
    `prefix="first_layer."` reads the first layer inside the last block instead."""
    sizes = sorted({r.size for r in records})

    def last_block_value(size: int) -> float:
        rows = [r for r in records if r.size == size and r.step == step and r.layer.startswith(prefix)]
        return getattr(max(rows, key=lambda r: int(r.layer.split(".")[1])), field)

    low = last_block_value(sizes[0])
    return last_block_value(sizes[-1]) / low if low > 0 else math.inf


def write_csv(records: Sequence[CoordRecord], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_FIELDS)
        for r in records:
            writer.writerow([r.layer, r.step, r.size, f"{r.mean_abs:.6g}", f"{r.mean_abs_change:.6g}"])


def _plotted_layers(records: Sequence[CoordRecord], vary: str) -> dict[str, dict[int, str]]:
    """Line label -> {size: layer name}. Over depth, blocks are matched by relative position."""
    sizes = sorted({r.size for r in records})
    blocks = {s: sorted({int(r.layer.split(".")[1]) for r in records if r.size == s and r.layer.startswith("block.")})
              for s in sizes}
    if vary == "width":
        names = sorted({r.layer for r in records}, key=lambda n: [r.layer for r in records].index(n))
        return {name: {s: name for s in sizes} for name in names}
    lines = {"embed": {s: "embed" for s in sizes}}
    lines["first block"] = {s: f"block.{blocks[s][0]}" for s in sizes}
    lines["middle block"] = {s: f"block.{blocks[s][len(blocks[s]) // 2]}" for s in sizes}
    lines["last block"] = {s: f"block.{blocks[s][-1]}" for s in sizes}
    if any(r.layer.startswith("first_layer.") for r in records):
        lines["fc1 of last block"] = {s: f"first_layer.{blocks[s][-1]}" for s in sizes}
    lines["final_norm"] = {s: "final_norm" for s in sizes}
    lines["logits"] = {s: "logits" for s in sizes}
    return lines


def plot(records: Sequence[CoordRecord], path: Path, title: str, vary: str) -> None:
    """One panel per step; top row mean |activation|, bottom row mean |change since step 0|; log2 axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r.step for r in records})
    sizes = sorted({r.size for r in records})
    lookup = {(r.layer, r.step, r.size): r for r in records}
    lines = _plotted_layers(records, vary)
    fig, axes = plt.subplots(2, len(steps), figsize=(3.2 * len(steps), 6.4), squeeze=False, sharex=True)
    cmap = plt.get_cmap("viridis")
    for col, step in enumerate(steps):
        for row, field in enumerate(("mean_abs", "mean_abs_change")):
            ax = axes[row][col]
            if field == "mean_abs_change" and step == 0:
                ax.axis("off")  # nothing has moved before the first update
                continue
            for i, (label, per_size) in enumerate(lines.items()):
                ys = [getattr(lookup[(per_size[s], step, s)], field) for s in sizes]
                ax.plot(sizes, ys, marker="o", ms=3, lw=1, color=cmap(i / max(1, len(lines) - 1)), label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"step {step}" if row == 0 else f"change since step 0, step {step}", fontsize=9)
            if row == 1:
                ax.set_xlabel(vary)
        axes[0][col].set_xticks(sizes, [str(s) for s in sizes])
    axes[0][0].set_ylabel("mean |activation|")
    axes[1][0].set_ylabel("mean |a_t - a_0|")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.88, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
