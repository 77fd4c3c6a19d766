"""Batching in the workers: PIL images into uint8 batches (written in place into shared memory), timm's
FastCollateMixup for mixup / cutmix (soft targets), and evaluation batches padded to a fixed size; and the
loss that matches the targets a training batch carries."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from timm.data import FastCollateMixup
from torch.utils.data import get_worker_info

from mutransfer.data.config import DataConfig

PAD_TARGET = -100  # torch.nn.functional.cross_entropy ignores this target by default


class EvalBatch(NamedTuple):
    images: torch.Tensor  # [B, 3, H, W]
    targets: torch.Tensor  # [B] int64, PAD_TARGET on padding rows
    valid: torch.Tensor  # [B] bool, False on padding rows
    keys: list[str]  # sample keys, '' on padding rows


def uint8_batch(images: list[Image.Image], rows: int) -> torch.Tensor:
    """[rows, 3, H, W] uint8 from PIL images (rows past the images are zero). Inside a DataLoader worker the
    batch is allocated in shared memory and filled in place, so it leaves the worker without another copy.
    It is laid out channels-last (a permuted view), the layout PIL gives; `DeviceNormalize` makes it contiguous."""
    height, width = images[0].height, images[0].width
    batch = torch.zeros((rows, height, width, 3), dtype=torch.uint8)
    if get_worker_info() is not None:
        batch.share_memory_()
    pixels = batch.numpy()
    for row, image in enumerate(images):
        pixels[row] = np.asarray(image)
    return batch.permute(0, 3, 1, 2)


def collate_uint8(items: list[tuple[Image.Image, int, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Worker-side collate of PIL images: (uint8 images, class indices, keys)."""
    images = uint8_batch([image for image, _, _ in items], len(items))
    return images, torch.tensor([label for _, label, _ in items]), [key for _, _, key in items]


class MixCollate:
    """Collate with timm's FastCollateMixup, which mixes uint8 images and returns soft targets."""

    def __init__(self, mixup: FastCollateMixup) -> None:
        self.mixup = mixup

    def __call__(self, items: list[tuple[Image.Image, int, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        images, targets = self.mixup([(np.asarray(image).transpose(2, 0, 1), label) for image, label, _ in items])
        return images, targets, [key for _, _, key in items]


class PadEval:
    """Collate an eval batch, padding it to `batch_size` rows."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def __call__(self, items: list[tuple[Image.Image, int, str]]) -> EvalBatch:
        padding = self.batch_size - len(items)
        return EvalBatch(
            images=uint8_batch([image for image, _, _ in items], self.batch_size),
            targets=torch.tensor([label for _, label, _ in items] + [PAD_TARGET] * padding),
            valid=torch.arange(self.batch_size) < len(items),
            keys=[key for _, _, key in items] + [""] * padding,
        )


def empty_eval_batch(batch_size: int, image_shape: tuple[int, int, int]) -> EvalBatch:
    """An all-padding uint8 batch (normalised like any other before it reaches the caller)."""
    return EvalBatch(
        images=torch.zeros((batch_size, *image_shape), dtype=torch.uint8),
        targets=torch.full((batch_size,), PAD_TARGET, dtype=torch.int64),
        valid=torch.zeros(batch_size, dtype=torch.bool),
        keys=[""] * batch_size,
    )


def train_loss(cfg: DataConfig) -> torch.nn.Module:
    """The loss that matches the train loader's targets: cross-entropy on class indices with label
    smoothing, or on the soft targets that mixup already smoothed."""
    return torch.nn.CrossEntropyLoss(label_smoothing=0.0 if cfg.mixup_active else cfg.label_smoothing)
