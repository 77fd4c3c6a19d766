"""Decoding samples in the DataLoader workers: checks each raw sample (image field, label), opens its image
with the loader's decoder and applies the decoder's per-image transform; bad samples are counted by reason
and skipped, and 10,000 in a row in training mean the data is broken (`DataError`).

A decoder is what differs between `data.decode=cpu` and `gpu`, passed to the loaders (see `Decoder`):
`PilDecoder` here decodes with PIL and applies timm's PIL-side transforms; `gpu_decode.GpuDecoder` reads
only the JPEG header in the worker and decodes on the device."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any, Protocol

import torch
from PIL import Image
from timm.data.transforms import MaybePILToTensor
from torchvision.transforms import Compose

from mutransfer.data.pil_steps import direct_steps
from mutransfer.data.sample_cache import SampleCache
from mutransfer.data.skips import SkipCounter
from mutransfer.errors import DataError

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
MAX_CONSECUTIVE_SKIPS = 10_000  # in training, this many bad samples in a row means the data is broken


class Decoder(Protocol):
    """How images go from bytes in a worker to pixels on the device."""

    def open(self, data: bytes) -> Any:
        """In the worker: bytes -> an image (raises on data that is no image)."""

    def transform(self, image: Any) -> Any:
        """In the worker: the per-image augmentation (or the parameters of one, drawn here)."""

    def collate(self, items: list[tuple[Any, int, str]]) -> Any:
        """In the worker: (transformed image, label, key) items -> (images, targets, keys)."""

    def to_pixels(self, images: Any, device: torch.device | None) -> torch.Tensor:
        """In the training process: a batch's images -> [B, 3, H, W] uint8 (or float 0..255) on `device`."""


def pil_side(transform: Compose) -> Compose:
    """timm's prefetcher-style transform without its final to-tensor step: the collate writes the PIL
    images straight into the batch, saving two copies per image. Its crop and flip run directly in PIL
    (`pil_steps`: the same draws and pixels, without torchvision's per-call dispatch)."""
    steps = list(transform.transforms)
    if not steps or not isinstance(steps[-1], MaybePILToTensor):
        raise RuntimeError(f"expected timm's transform to end in MaybePILToTensor: {transform}")
    return Compose(direct_steps(steps[:-1]))


def open_pil(data: bytes) -> Image.Image:
    """Decode now (RGB), so that a bad image is caught here rather than in the transform."""
    image = Image.open(io.BytesIO(data))
    image = image.convert("RGB") if image.mode != "RGB" else image
    image.load()
    return image


class PilDecoder:
    """data.decode=cpu: PIL decodes and timm's PIL-side transform augments in the worker; batches leave the
    worker as uint8 (a quarter the size of float: every batch crosses to the main process through fresh
    shared memory) and are copied to the device as they are."""

    def __init__(self, transform: Callable[[Any], Any], collate: Callable[[list[Any]], Any]) -> None:
        self.transform = transform
        self.collate = collate

    open = staticmethod(open_pil)

    @staticmethod
    def to_pixels(images: torch.Tensor, device: torch.device | None) -> torch.Tensor:
        return images.to(device, non_blocking=True) if device is not None else images


def _problem(sample: dict[str, Any], num_classes: int | None) -> tuple[str | None, Any, int, str | None]:
    """(skip reason or None, its detail, the label, the image field) of a raw sample."""
    image_field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if image_field is None or "cls" not in sample:
        return "missing_field", f"has {sorted(k for k in sample if not k.startswith('__'))}", -1, None
    try:
        label = int(sample["cls"])
    except ValueError:
        return "bad_label", repr(sample["cls"][:20]), -1, image_field
    if label < 0 or (num_classes is not None and label >= num_classes):
        return "bad_label", f"{label} outside [0, {num_classes})", label, image_field
    return None, None, label, image_field


def decode_samples(samples: Iterable[dict[str, Any]], decoder: Decoder, counter: SkipCounter, slot: int,
                   num_classes: int | None, max_consecutive_skips: int | None = None,
                   cache: SampleCache | None = None) -> Iterator[tuple[Any, int, str]]:
    """(transformed image, label, key) per good sample; bad ones are counted by reason and skipped. PIL's
    decoded images come from `cache` when it holds them, and are kept there."""
    cached = cache is not None and isinstance(decoder, PilDecoder)
    skips_in_a_row = 0
    for sample in samples:
        url, key = sample.get("__url__"), sample.get("__key__")
        reason, detail, label, image_field = _problem(sample, num_classes)
        if reason is None:
            try:
                data = sample[image_field]
                image = (cache.image(url, key, image_field, partial(decoder.open, data)) if cached
                         else decoder.open(data))
            except Exception as err:  # PIL raises many types for bad data
                reason, detail = "corrupt_image", f"{type(err).__name__}: {err}"
        if reason is not None:
            counter.record(slot, reason, url, key, detail)
            skips_in_a_row += 1
            if max_consecutive_skips is not None and skips_in_a_row >= max_consecutive_skips:
                raise DataError(f"{skips_in_a_row} bad samples in a row (last: {key!r} of {url})")
            continue
        skips_in_a_row = 0
        counter.count_good(slot, url)
        yield decoder.transform(image), label, key
