"""What the training loop measures between logging points: each step's loss, kept on the device until the
next sync point reduces it, the host's wait for data, the wall time, and the metrics logged from them
(loss, each group's LR, grad norm, images/s, MFU, peak memory)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .hardware import peak_memory_bytes


class StepWindow:
    """The steps since the last logging point.

    `add_step` keeps the step's loss as a device tensor (no host sync); `take_pending` hands the losses not
    yet reduced to the sync point, which gives back the ranks' mean per step through `record`. Time spent
    in evaluation and checkpoints is left out of the step time (`exclude`).
    """

    def __init__(self) -> None:
        self.pending: list[torch.Tensor] = []  # this rank's per-step losses, on the device
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []  # the ranks' mean loss of each step since the last log
        self.data_s = 0.0
        self.excluded_s = 0.0
        self.started = time.perf_counter()

    def add_step(self, loss: torch.Tensor, data_s: float) -> None:
        self.pending.append(loss)
        self.data_s += data_s

    def take_pending(self) -> torch.Tensor:
        losses = torch.stack(self.pending).double()
        self.pending = []
        return losses

    def record(self, losses: list[float]) -> None:
        self.losses.extend(losses)

    def exclude(self, seconds: float) -> None:
        self.excluded_s += seconds

    def metrics(self, groups: list[dict[str, Any]], grad_norm: float | None, global_batch: int, flops: float | None,
                peak: float | None, world_size: int) -> dict[str, float]:
        """The logged metrics of the window (call right after a sync point, so that the GPU is done)."""
        metrics = {"train/loss": sum(self.losses) / max(1, len(self.losses)),
                   **self.perf_metrics(len(self.losses), global_batch, flops, peak, world_size)}
        for group in groups:
            metrics[f"lr/{group.get('group', 'all')}"] = group["lr"]
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            metrics["train/grad_norm"] = float(grad_norm)
        return metrics

    def perf_metrics(self, steps: int, global_batch: int, flops: float | None, peak: float | None,
                     world_size: int) -> dict[str, float]:
        """Step time, images/s, the host's wait for data, peak memory and MFU over the window's `steps`."""
        steps = max(1, steps)
        elapsed = max(time.perf_counter() - self.started - self.excluded_s, 1e-9)
        images_per_s = global_batch * steps / elapsed
        metrics = {
            "perf/step_time_s": elapsed / steps,
            "perf/images_per_s": images_per_s,
            "perf/data_wait_frac": min(1.0, self.data_s / elapsed),
            "perf/peak_mem_gb": peak_memory_bytes() / 2**30,
        }
        if flops and peak:
            metrics["perf/mfu"] = flops * images_per_s / (peak * world_size)
        return metrics
