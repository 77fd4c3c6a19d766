"""The step in the training process between the workers' batches and the model: pixels to the device,
then float and normalised there, as timm's prefetcher does.

Why not timm's `PrefetchLoader`: it wraps a whole DataLoader of (input, target) pairs and owns the copy, the
normalisation, random erasing and (on CUDA) a side stream. Our batches are not pairs (they carry sample keys,
and evaluation batches a validity mask), `data.decode=gpu` must decode and crop before normalising, and the
loaders must stop their workers on every way out of an iteration. So the loaders keep the iteration and call
this one small step, with timm's `RandomErasing` after it."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class DeviceNormalize:
    """[B, 3, H, W] pixels (uint8 or float in 0..255, any layout) -> contiguous float32, (x - mean) / std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | None) -> None:
        where = device or torch.device("cpu")
        self.mean = torch.tensor(mean, device=where).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=where).view(1, 3, 1, 1) * 255

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device)
        return out.copy_(pixels).sub_(self.mean).div_(self.std)
