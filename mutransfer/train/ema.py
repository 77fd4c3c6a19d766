"""Weight EMA (run.ema_decay): timm's ModelEmaV3 semantics on a DeepSpeed engine at every ZeRO stage.

After optimizer step t (1-based, timm's `num_updates`), every parameter's average moves as
ema <- decay_t * ema + (1 - decay_t) * w, with decay_t = 0 at t = 1 (the average starts as the weights
after the first step) and, from t = 2, the constant run.ema_decay, or with run.ema_warmup
decay_t = min(run.ema_decay, 1 - (1 + (t - 1)) ** -2/3) (timm's warmup, gamma 1, power 2/3).

Where the average lives: in float32, beside each rank's own copy of the weights. At ZeRO 0-2 every rank holds
the full parameters, so every rank keeps the full average (the same on all ranks). At ZeRO-3 a rank holds
only its partition of each parameter (`param.ds_tensor`, the rank-th slice of the flattened, zero-padded
parameter), so the average is sharded the same way and costs no communication per step: it is gathered
only to be saved, and swapped into the partitions to be evaluated. The model has no buffers (ViT, residual
MLP), so, unlike timm, there are none to average or copy. Under bf16 the average is of the bf16 weights
the module holds (DeepSpeed keeps the fp32 master copy inside its optimizer).

Checkpoints hold it as `ema.safetensors` (full float32 tensors under the model's parameter names, written by
rank 0), which `mutransfer export --ema` writes out as the model's weights. A stack of trials
(`train.stacked`) keeps its members' averages as stacked [K, ...] tensors (`StackedEma`), updated alike.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .distributed import all_reduce_

log = logging.getLogger(__name__)

EMA_FILE = "ema.safetensors"
WARMUP_GAMMA, WARMUP_POWER = 1.0, 2 / 3  # timm's ModelEmaV3 defaults (train.py does not change them)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The decay used after optimizer step `step` (1-based), as timm's ModelEmaV3.get_decay(step)."""
    since_first = step - 1
    if since_first <= 0:
        return 0.0
    if not warmup:
        return decay
    return max(0.0, min(decay, 1 - (1 + since_first / WARMUP_GAMMA) ** -WARMUP_POWER))


class WeightEma:
    """The running average of a DeepSpeed engine's module parameters (sharded like them at ZeRO-3)."""

    def __init__(self, engine: Any, decay: float, warmup: bool, zero3: bool) -> None:
        self.decay, self.warmup, self.zero3 = decay, warmup, zero3
        self.device = engine.device  # where collectives run (partitions may live in host memory: offload)
        self.named = list(engine.module.named_parameters())
        self.averages = [self._local(p).detach().float().clone() for _, p in self.named]

    def _local(self, param: torch.nn.Parameter) -> torch.Tensor:
        """What this rank holds of `param`: its partition at ZeRO-3, the whole tensor below."""
        return param.ds_tensor if self.zero3 else param.data

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the weights after optimizer step `step` into the average."""
        weight = 1.0 - ema_decay_at(step, self.decay, self.warmup)
        for average, (_, param) in zip(self.averages, self.named):
            average.lerp_(self._local(param).float(), weight)

    @torch.no_grad()
    def full_state(self) -> dict[str, torch.Tensor]:
        """Every parameter's full average (collective at ZeRO-3: call on every rank)."""
        if not self.zero3:
            return {name: average.clone() for (name, _), average in zip(self.named, self.averages)}
        return dict(zip([name for name, _ in self.named], self._gathered(self.averages, [p for _, p in self.named])))

    def _gathered(self, shards: list[torch.Tensor], params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """Full tensors from every rank's partitions, in one all-reduce: each rank places its slices in a
        zeroed buffer, the sum is the whole."""
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        sizes = [shard.numel() for shard in shards]
        buffer = torch.zeros(world, sum(sizes), dtype=torch.float32, device=self.device)
        buffer[rank] = torch.cat([shard.to(self.device, torch.float32) for shard in shards])
        all_reduce_(buffer)
        full, offset = [], 0
        for size, param in zip(sizes, params):
            flat = buffer[:, offset:offset + size].reshape(-1)[:param.ds_numel]
            full.append(flat.reshape(param.ds_shape).clone())
            offset += size
        return full

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Set the average from full tensors (what `full_state` returned); at ZeRO-3 each rank keeps its slice."""
        missing = [name for name, _ in self.named if name not in state]
        if missing:
            raise ValueError(f"{where} holds no average of {', '.join(missing[:5])}")
        rank = _rank() if self.zero3 else 0
        for average, (name, _) in zip(self.averages, self.named):
            flat = state[name].to(average.device, torch.float32).reshape(-1)
            if self.zero3:
                flat = flat[rank * average.numel():(rank + 1) * average.numel()]
            average.zero_()  # the padding of the last partition stays zero, as DeepSpeed's does
            average.view(-1)[:flat.numel()].copy_(flat)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The engine's module holds the averages inside, its own weights again after (bit for bit)."""
        with torch.no_grad():
            kept = [self._local(p).clone() for _, p in self.named]
            self._write([a.to(k.dtype) for a, k in zip(self.averages, kept)])
        try:
            yield
        finally:
            with torch.no_grad():
                self._write(kept)

    def _write(self, values: list[torch.Tensor]) -> None:
        """Set each parameter's local copy; at ZeRO-3 also the full tensor of every parameter held gathered
        (persistent ones, below stage3_param_persistence_threshold, and those the last forward left gathered
        for reuse), which the next forward uses as it is. The others are gathered from the partitions."""
        for value, (_, param) in zip(values, self.named):
            self._local(param).copy_(value)
        if self.zero3:
            held = [(value, param) for value, (_, param) in zip(values, self.named) if param.data.numel() > 0]
            if not held:  # the same on every rank: ZeRO-3 gathers and releases in step everywhere
                return
            full = self._gathered([v for v, _ in held], [p for _, p in held])
            for tensor, (_, param) in zip(full, held):
                param.data.copy_(tensor)

    def save(self, folder: Path, rank: int) -> None:
        """`folder/ema.safetensors` (rank 0 writes; every rank takes part in the ZeRO-3 gather)."""
        state = self.full_state()
        if rank == 0:
            save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(folder / EMA_FILE))


class StackedEma:
    """The averages of a stack's members: one [K, ...] float32 tensor per stacked parameter, slice k for
    member k, updated after every optimizer step as `WeightEma` updates a lone run's."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float, warmup: bool) -> None:
        self.decay, self.warmup = decay, warmup
        self.averages = {name: p.detach().float().clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], step: int) -> None:
        weight = 1.0 - ema_decay_at(step, self.decay, self.warmup)
        for name, average in self.averages.items():
            average.lerp_(params[name].detach().float(), weight)

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the members at the positions in `index`."""
        self.averages = {name: average.index_select(0, index) for name, average in self.averages.items()}


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def build_ema(engine: Any, decay: float, warmup: bool, zero_stage: int, resume_from: Path | None,
              rank: int) -> WeightEma | None:
    """The weight EMA of run.ema_decay (None when 0), resumed from the checkpoint's `ema.safetensors`; a
    checkpoint without one (EMA turned on for a resumed run) starts it from the current weights."""
    if not decay:
        return None
    ema = WeightEma(engine, decay, warmup, zero3=zero_stage == 3)
    if resume_from is not None:
        path = resume_from / EMA_FILE
        if path.is_file():
            ema.load_full_state(load_file(str(path)), str(path))
        elif rank == 0:
            log.warning(f"mutransfer: {resume_from} holds no {EMA_FILE}; the weight EMA starts from its weights")
    return ema
