"""`data.decode=gpu`: JPEG decoding and the training crop on the GPU, so that a node with few cores per GPU
keeps its GPUs fed.

Split of the work (`GpuDecoder`, the train loader's decoder; see `decode.Decoder`):
- DataLoader workers read, shuffle and check samples as on the CPU path, but decode only the JPEG header
  (PIL, lazily: the image size) and draw each image's random parameters there, seeded as the CPU path's
  augmentation is: the crop box with timm's own `RandomResizedCropAndInterpolation.get_params` (same
  `data.scale` / `data.ratio`, the same distribution), the flip (`data.hflip`), and for
  `interpolation=random` bilinear or bicubic. A batch leaves the worker as `EncodedBatch`: the JPEG bytes,
  boxes, flips and interpolations. Images that are not plain RGB / greyscale JPEGs (PNG, CMYK) are decoded
  by PIL in the worker and travel as pixels.
- The training process decodes the whole batch with `torchvision.io.decode_jpeg(device=...)` (nvJPEG on a
  GPU), crops and resizes each image on the device (antialiased, as PIL's resize is), flips, rounds to
  the uint8 levels the CPU path makes, and normalises. Random erasing follows, as on the CPU path.

What differs from the CPU path: the resize kernels (torch's antialiased bilinear / bicubic vs PIL's; a few
grey levels apart), nvJPEG vs libjpeg (a level or two), and that auto-augment, colour jitter and
mixup / cutmix are not available (DataConfig refuses them with decode=gpu). Evaluation decodes on the CPU.
A JPEG whose header reads but whose data does not decode becomes a mid-grey image (zero after
normalisation), counted as corrupt_image and warned about, so that the batch keeps its rows and labels.

With device='cpu' every step runs on the CPU too (torchvision decodes batches there); the tests use that.
"""

from __future__ import annotations

import io
import logging
import random
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_jpeg

from mutransfer.data.config import DataConfig

log = logging.getLogger(__name__)

INTERPOLATION_CODES = {"bilinear": 0, "bicubic": 1, "nearest": 2}
MODES = {code: name for name, code in INTERPOLATION_CODES.items()}


class EncodedImage(NamedTuple):
    """A checked sample in a worker: `data` is the JPEG bytes (uint8, 1-D) when `encoded`, else decoded
    pixels (uint8 [3, H, W]); `size` is (width, height)."""

    data: torch.Tensor
    encoded: bool
    size: tuple[int, int]


class EncodedBatch(NamedTuple):
    """A training batch before decoding: per image its data (see EncodedImage), and the augmentation drawn in
    the worker: crop `boxes` [B, 4] (top, left, height, width in the source image), `flips` [B] and
    `interpolations` [B] (INTERPOLATION_CODES)."""

    data: list[torch.Tensor]
    encoded: list[bool]
    boxes: torch.Tensor
    flips: torch.Tensor
    interpolations: torch.Tensor


def open_encoded(data: bytes) -> EncodedImage:
    """Read the header only (raises on data that is no image); decode just the images nvJPEG cannot."""
    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG" and image.mode in ("RGB", "L"):
        return EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), True, image.size)
    image = image.convert("RGB")
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()
    return EncodedImage(pixels, False, image.size)


class CropSampler:
    """The worker-side 'transform' of decode=gpu: draws crop box, flip and interpolation per image, as timm's
    RandomResizedCropAndInterpolation and RandomHorizontalFlip do on the CPU path."""

    def __init__(self, cfg: DataConfig) -> None:
        self.scale, self.ratio, self.hflip = tuple(cfg.scale), tuple(cfg.ratio), cfg.hflip
        self.interpolation = cfg.interpolation

    def box(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, left, height, width) for an image of `size` (width, height), from the global `random`."""
        width, height = size
        shape_only = torch.empty((0, height, width))  # get_params reads only the size; this holds no pixels
        return tuple(RandomResizedCropAndInterpolation.get_params(shape_only, self.scale, self.ratio))

    def __call__(self, image: EncodedImage) -> tuple[EncodedImage, tuple[int, int, int, int], bool, int]:
        box = self.box(image.size)
        if self.interpolation == "random":
            code = random.choice((INTERPOLATION_CODES["bilinear"], INTERPOLATION_CODES["bicubic"]))
        else:
            code = INTERPOLATION_CODES[self.interpolation]
        return image, box, random.random() < self.hflip, code


def collate_encoded(items: list[tuple[Any, int, str]]) -> tuple[EncodedBatch, torch.Tensor, list[str]]:
    """Worker-side collate of CropSampler outputs: (EncodedBatch, labels, keys)."""
    drawn = [drawn for drawn, _, _ in items]
    batch = EncodedBatch(
        data=[image.data for image, _, _, _ in drawn],
        encoded=[image.encoded for image, _, _, _ in drawn],
        boxes=torch.tensor([box for _, box, _, _ in drawn], dtype=torch.int64),
        flips=torch.tensor([flip for _, _, flip, _ in drawn], dtype=torch.bool),
        interpolations=torch.tensor([code for _, _, _, code in drawn], dtype=torch.int64),
    )
    return batch, torch.tensor([label for _, label, _ in items]), [key for _, _, key in items]


def decode_images(batch: EncodedBatch, device: torch.device) -> list[torch.Tensor | None]:
    """Each image as uint8 [3, H, W] on `device` (None: it did not decode), the JPEGs in one batched
    decode_jpeg call."""
    jpegs = [data for data, encoded in zip(batch.data, batch.encoded) if encoded]
    decoded: list[torch.Tensor | None] = []
    if jpegs:
        try:
            decoded = list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad image fails the batch call: decode one by one to find it
            decoded = [_decode_one(data, device) for data in jpegs]
    images, next_jpeg = [], iter(decoded)
    for data, encoded in zip(batch.data, batch.encoded):
        images.append(next(next_jpeg) if encoded else data.to(device, non_blocking=True))
    return images


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as err:
        log.warning("corrupt_image: a JPEG whose header reads does not decode (%s); trained on as mid-grey", err)
        return None


def crop_batch(batch: EncodedBatch, size: int, device: torch.device) -> torch.Tensor:
    """float [B, 3, size, size] in 0..255 (uint8 levels): decoded, cropped, resized and flipped."""
    images = decode_images(batch, device)
    out = torch.full((len(images), 3, size, size), 128.0, dtype=torch.float32, device=device)
    for row, (image, box, code) in enumerate(zip(images, batch.boxes.tolist(), batch.interpolations.tolist())):
        if image is None:
            continue
        top, left, height, width = box
        crop = image[:, top:top + height, left:left + width].unsqueeze(0).float()
        mode = MODES[code]
        if mode == "nearest":
            out[row] = F.interpolate(crop, size=(size, size), mode=mode)[0]
        else:
            out[row] = F.interpolate(crop, size=(size, size), mode=mode, antialias=True, align_corners=False)[0]
    flips = batch.flips.to(device, non_blocking=True)
    out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out.round_().clamp_(0, 255)


class GpuDecoder:
    """The train loader's decoder for data.decode=gpu: workers read headers, draw crops and send
    EncodedBatches; the training process decodes and crops them on the loader's device."""

    def __init__(self, cfg: DataConfig) -> None:
        self.size = cfg.img_size
        self.transform = CropSampler(cfg)

    open = staticmethod(open_encoded)
    collate = staticmethod(collate_encoded)

    def to_pixels(self, images: EncodedBatch | torch.Tensor, device: torch.device | None) -> torch.Tensor:
        if isinstance(images, torch.Tensor):  # already pixels (an all-padding batch)
            return images.to(device, non_blocking=True) if device is not None else images
        return crop_batch(images, self.size, device or torch.device("cpu"))
