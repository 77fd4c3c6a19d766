"""The direct PIL crop and flip (`data/pil_steps.py`) against timm's and torchvision's own steps: the same pixels
and the same RNG states after, over image sizes that exercise the fallback crop and every interpolation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from torchvision.transforms import ColorJitter, Compose

from mutransfer.data.decode import pil_side
from mutransfer.data.pil_steps import PilHorizontalFlip, PilRandomResizedCrop, direct_steps

SIZES = [(32, 32), (48, 20), (20, 48), (300, 7), (33, 31), (64, 64)]  # (300, 7): no box fits the ratio


def random_image(size: tuple[int, int], seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def run_seeded(transform, image: Image.Image, seed: int) -> tuple[np.ndarray, object, torch.Tensor]:
    """The transformed pixels and both RNGs' states after, from a seeded start."""
    random.seed(seed)
    torch.manual_seed(seed)
    out = np.asarray(transform(image))
    return out, random.getstate(), torch.get_rng_state()


def timm_steps(interpolation: str, color_jitter: float | None = None, **kwargs) -> list:
    transform = create_transform(16, is_training=True, interpolation=interpolation, color_jitter=color_jitter,
                                 use_prefetcher=True, **kwargs)
    return list(transform.transforms)[:-1]  # without the final MaybePILToTensor, as pil_side does


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "random"])
@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.9, 1.0)])
def test_direct_crop_and_flip_match_timms_pixels_and_draws(interpolation, scale) -> None:
    original = timm_steps(interpolation, scale=scale, ratio=(3 / 4, 4 / 3), hflip=0.5)
    direct = direct_steps(original)
    assert [type(step) for step in direct] == [PilRandomResizedCrop, PilHorizontalFlip]
    for index, size in enumerate(SIZES):
        image = random_image(size, index)
        for seed in range(40):
            want_pixels, want_random, want_torch = run_seeded(Compose(original), image, seed)
            got_pixels, got_random, got_torch = run_seeded(Compose(direct), image, seed)
            assert got_pixels.shape == want_pixels.shape == (16, 16, 3)
            assert np.array_equal(got_pixels, want_pixels), (size, seed)
            assert got_random == want_random and torch.equal(got_torch, want_torch)


def test_other_steps_are_kept_and_the_whole_transform_matches() -> None:
    original = timm_steps("bilinear", color_jitter=0.4, hflip=0.5)
    direct = direct_steps(original)
    assert isinstance(direct[-1], ColorJitter) and direct[-1] is original[-1]
    image = random_image((40, 30), 7)
    for seed in range(20):
        want = run_seeded(Compose(original), image, seed)
        got = run_seeded(pil_side(create_transform(16, is_training=True, interpolation="bilinear", color_jitter=0.4,
                                                   hflip=0.5, use_prefetcher=True)), image, seed)
        assert np.array_equal(got[0], want[0]) and got[1] == want[1] and torch.equal(got[2], want[2])


def test_eval_steps_are_untouched() -> None:
    steps = list(create_transform(16, is_training=False, use_prefetcher=True).transforms)[:-1]
    assert direct_steps(steps) == steps
