"""timm's PIL training crop and flip without torchvision's per-call dispatch: the same random draws from the same
RNGs, the same PIL operations, the same pixels.

A proxy trial's images are tiny (32 px), so the pixels are cheap and the Python around them is not: drawing
a stacked sweep's batches was a fifth of its step loop, and torchvision's functional layer (API-usage logging,
type checks, size arithmetic) a quarter of each draw (120 draws of three seeds' batches 3.10 -> 2.35 s without
it, docs/benchmarks.md). `direct_steps` replaces those two steps of a transform
by `PilRandomResizedCrop` and `PilHorizontalFlip`, which draw with timm's own `get_params` (Python's
`random`) and `torch.rand(1)` as before, then call PIL's crop, resize and transpose as torchvision does. Every
other step is kept as it is. `tests/unit/test_pil_steps.py` checks pixels and RNG states against the originals.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import RandomHorizontalFlip
from torchvision.transforms.functional import pil_modes_mapping


class PilRandomResizedCrop:
    """timm's RandomResizedCropAndInterpolation on a PIL image: crop box from its `get_params`, the
    interpolation drawn with `random.choice` when it is random, then PIL crop and resize."""

    get_params = staticmethod(RandomResizedCropAndInterpolation.get_params)

    def __init__(self, step: RandomResizedCropAndInterpolation) -> None:
        self.height, self.width = step.size
        self.scale, self.ratio = step.scale, step.ratio
        modes = step.interpolation if isinstance(step.interpolation, (tuple, list)) else None
        self.modes = [pil_modes_mapping[mode] for mode in modes] if modes else None
        self.mode = None if modes else pil_modes_mapping[step.interpolation]

    def __call__(self, image: Image.Image) -> Image.Image:
        top, left, height, width = self.get_params(image, self.scale, self.ratio)
        mode = random.choice(self.modes) if self.modes else self.mode
        crop = image.crop((left, top, left + width, top + height))
        if (height, width) == (self.height, self.width):
            return crop  # torchvision's resize returns an image already of the size as it is
        return crop.resize((self.width, self.height), mode)


class PilHorizontalFlip:
    """torchvision's RandomHorizontalFlip on a PIL image: flips when torch.rand(1) < p (p rounded to float32, as
    torch rounds it to compare)."""

    def __init__(self, step: RandomHorizontalFlip) -> None:
        self.p = torch.tensor(step.p, dtype=torch.float32).item()  # torch compares the float32 draw in float32

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(1).item() < self.p:
            return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


DIRECT: dict[type, Callable[[Any], Callable[[Image.Image], Image.Image]]] = {
    RandomResizedCropAndInterpolation: PilRandomResizedCrop,
    RandomHorizontalFlip: PilHorizontalFlip,
}


def direct_steps(steps: list[Any]) -> list[Any]:
    """`steps` with the crop and flip done directly in PIL; the others (colour jitter, auto-augment, eval
    resizes) unchanged. Exact types only: a subclass may draw differently."""
    return [DIRECT[type(step)](step) if type(step) in DIRECT else step for step in steps]
