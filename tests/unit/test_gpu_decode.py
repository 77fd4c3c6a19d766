"""data.decode=gpu, tested on the CPU (torchvision decodes JPEG batches there too): the crop sampler draws
the CPU transform's boxes, labels stay with their images, and full-image crops match the CPU path."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mutransfer.data import DataConfig, ImageFolderSource, build_train_loader, write_shards
from mutransfer.data.gpu_decode import CropSampler, EncodedImage, GpuDecoder
from mutransfer.train.config import ConfigError, load_config

CLASS_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (64, 64), (20, 300)])
def test_crop_sampler_draws_the_cpu_transforms_boxes(size, small_shards) -> None:
    cfg = DataConfig(shards_dir=str(small_shards.path), img_size=16, batch_size=4, num_workers=0,
                     scale=(0.25, 1.0), ratio=(0.5, 2.0))
    cpu_crop = build_train_loader(cfg).decoder.transform.transforms[0]  # timm's RandomResizedCropAndInterpolation
    sampler = CropSampler(cfg)
    image = Image.new("1", size)
    width, height = size
    for seed in range(200):
        random.seed(seed)
        expected = cpu_crop.get_params(image, cpu_crop.scale, cpu_crop.ratio)
        random.seed(seed)
        top, left, crop_h, crop_w = sampler.box(size)
        assert (top, left, crop_h, crop_w) == tuple(expected)
        assert 0 <= top <= top + crop_h <= height and 0 <= left <= left + crop_w <= width
    random.seed(0)
    flips = [sampler(EncodedImage(torch.empty(0), True, size))[2] for _ in range(4000)]  # hflip 0.5
    assert abs(np.mean(flips) - 0.5) < 0.04


def write_solid_colour_shards(root: Path) -> Path:
    """4 classes, 6 images each of varying size and aspect, one solid colour per class (a PNG among them)."""
    for label, colour in enumerate(CLASS_COLOURS):
        folder = root / "images" / f"class{label}"
        folder.mkdir(parents=True)
        for i, size in enumerate([(48, 36), (36, 48), (40, 40), (64, 30), (30, 64), (50, 50)]):
            suffix = "png" if i == 5 else "jpg"
            Image.new("RGB", size, colour).save(folder / f"{i}.{suffix}")
    out = root / "shards"
    write_shards(ImageFolderSource(str(root / "images")), str(out), "train", samples_per_shard=8, progress=False)
    return out


def test_gpu_path_keeps_labels_with_their_images(tmp_path) -> None:
    shards = write_solid_colour_shards(tmp_path)
    cfg = DataConfig(shards_dir=str(shards), img_size=16, batch_size=6, num_workers=1, decode="gpu",
                     scale=(0.1, 1.0), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), shuffle_buffer=24,
                     batches_per_epoch=8)
    loader = build_train_loader(cfg, device="cpu", with_keys=True)
    assert isinstance(loader.decoder, GpuDecoder)
    colours = torch.tensor(CLASS_COLOURS, dtype=torch.float32)
    seen = set()
    for images, labels, keys in loader:
        assert images.shape == (6, 3, 16, 16) and images.dtype == torch.float32
        mean_colour = images.mean(dim=(2, 3)) * 255  # normalise with mean 0, std 1 divides by 255
        nearest = torch.cdist(mean_colour, colours).argmin(dim=1)
        assert torch.equal(nearest, labels), (keys, mean_colour)
        assert (images.amax(dim=(2, 3)) * 255 - images.amin(dim=(2, 3)) * 255).max() < 8  # still solid
        seen.update(keys)
    assert len(seen) > 12


def test_full_image_crops_match_the_cpu_path(tmp_path, make_gradient) -> None:
    """With the crop fixed to the whole (square) image and no flip, the two paths differ only by decoder and
    resize kernels: within 2 grey levels on average (measured: 0.16)."""
    rng = np.random.default_rng(0)
    for label in range(2):
        folder = tmp_path / "images" / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(8):
            Image.fromarray(make_gradient(rng, 48, 48)).save(folder / f"{i}.jpg", quality=95)
    shards = tmp_path / "shards"
    write_shards(ImageFolderSource(str(tmp_path / "images")), str(shards), "train", samples_per_shard=8,
                 progress=False)
    batches = {}
    for decode in ("cpu", "gpu"):
        cfg = DataConfig(shards_dir=str(shards), img_size=32, batch_size=8, num_workers=1, decode=decode,
                         scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, interpolation="bilinear",
                         batches_per_epoch=2)
        batches[decode] = list(build_train_loader(cfg, device="cpu", with_keys=True))
    for (cpu_images, cpu_labels, cpu_keys), (gpu_images, gpu_labels, gpu_keys) in zip(batches["cpu"], batches["gpu"]):
        assert cpu_keys == gpu_keys and torch.equal(cpu_labels, gpu_labels)  # same order, same labels
        levels = (cpu_images - gpu_images).abs() * torch.tensor(cfg.std).view(1, 3, 1, 1) * 255
        assert levels.mean() < 2.0, levels.mean()


@pytest.mark.parametrize("override", ["data.auto_augment=rand-m9-mstd0.5", "data.mixup_alpha=0.8",
                                      "data.color_jitter=0.4", "data.decode=nvjpeg"])
def test_decode_gpu_refuses_cpu_only_augmentations(override, tmp_path) -> None:
    overrides = ["run.steps=1", override] if override.startswith("data.decode") else \
        ["run.steps=1", "data.decode=gpu", override]
    with pytest.raises(ConfigError, match=r"^data\.(decode|interpolation): "):
        load_config(None, overrides, check=False)
