"""LR schedules that multiply each param group's own LR, so the parametrization's ratios survive.

DeepSpeed's WarmupLR / WarmupDecayLR write one absolute LR into every group and would erase the per-role
scales; torch's LambdaLR multiplies each group's `initial_lr` by the same factor.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from mutransfer.models.optim import Schedule


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: Schedule, min_lr_ratio: float) -> float:
    """Multiplier of every group's base LR after `step` optimizer steps (`schedule` was checked with the
    config's `optim.schedule`)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    schedule: Schedule = "cosine", min_lr_ratio: float = 0.0) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, schedule, min_lr_ratio))
