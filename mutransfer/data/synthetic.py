"""Procedural images whose class a small model can learn: a shape of one colour and texture, at a random
position, size and rotation, on a noisy background of random tint (a nuisance, not a cue).

A class is the combination (colour, shape, texture) = (c mod 8, c mod 5, c mod 3). The moduli are pairwise
coprime, so by the Chinese remainder theorem each of the 8 * 5 * 3 = 120 classes has its own combination,
and neighbouring classes differ in every attribute at once. Colour, the easy linear cue, tells apart only
classes that differ mod 8; the rest need shape or texture, so a model has to learn features, and
learning-rate sweeps see a real optimum rather than a plateau. Each image is a pure function of
(seed, split, index).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from mutransfer.errors import UsageError

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 50),
    "magenta": (200, 60, 200),
    "cyan": (50, 200, 210),
    "orange": (240, 140, 30),
    "white": (235, 235, 235),
}
SHAPES = ("disc", "square", "triangle", "ring", "cross")
TEXTURES = ("solid", "stripes", "checks")
# Background tints (charcoal, brown, navy, olive, grey, plum, teal), drawn at random for every image.
_BACKGROUND_RGB = np.array(
    [(40, 40, 40), (95, 65, 40), (35, 50, 95), (70, 95, 55), (125, 125, 125), (95, 45, 80), (30, 85, 85)],
    dtype=np.float32,
)
MAX_CLASSES = len(COLOURS) * len(SHAPES) * len(TEXTURES)
_COLOUR_RGB = np.array(list(COLOURS.values()), dtype=np.float32)


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines a synthetic split's images."""

    classes: int
    image_size: int
    seed: int = 0
    split: str = "train"

    def __post_init__(self) -> None:
        if not 2 <= self.classes <= MAX_CLASSES:
            raise UsageError(f"classes={self.classes} must be between 2 and {MAX_CLASSES}")
        if not 8 <= self.image_size <= 4096:
            raise UsageError(f"image_size={self.image_size} must be between 8 and 4096")
        if self.seed < 0:
            raise UsageError(f"seed={self.seed} must be >= 0")


def class_attributes(label: int) -> tuple[str, str, str]:
    """(colour, shape, texture) of a class."""
    return list(COLOURS)[label % len(COLOURS)], SHAPES[label % len(SHAPES)], TEXTURES[label % len(TEXTURES)]


def class_name(label: int) -> str:
    return "-".join(class_attributes(label))


def label_of(index: int, classes: int) -> int:
    """Labels cycle through the classes, so every split is balanced to within one sample per class."""
    return index % classes


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = np.arange(size, dtype=np.float32) + 0.5
    return coords[None, :], coords[:, None]  # x varies along columns, y along rows


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape in its own frame, where the shape fits the unit disc."""
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == "triangle":  # apex at (0, 1), base at v = -0.5
        return (v >= -0.5) & (v <= 1.0 - 1.732 * np.abs(u))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.36)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    raise ValueError(f"unknown shape {shape!r}")


def _texture_mask(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    """Where the object is drawn in its darker shade; None for a solid object."""
    if texture == "solid":
        return None
    if texture == "stripes":
        return (np.floor(u * 2.5) % 2).astype(bool)
    if texture == "checks":
        return ((np.floor(u * 2.5) + np.floor(v * 2.5)) % 2).astype(bool)
    raise ValueError(f"unknown texture {texture!r}")


def render(spec: SyntheticSpec, index: int) -> tuple[np.ndarray, int]:
    """Image `index` of a split: (H x W x 3 uint8 array, label)."""
    label = label_of(index, spec.classes)
    colour, shape, texture = label % len(COLOURS), label % len(SHAPES), label % len(TEXTURES)
    # The split is part of the seed so that train and validation are independent draws.
    rng = np.random.default_rng([spec.seed, zlib.crc32(spec.split.encode()), index])
    size = spec.image_size
    x, y = _grid(size)

    centre = rng.uniform(0.3, 0.7, size=2) * size
    radius = rng.uniform(0.18, 0.34) * size
    angle = rng.uniform(0, 2 * np.pi)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    dx, dy = (x - centre[0]) / radius, (y - centre[1]) / radius
    u, v = cos * dx + sin * dy, cos * dy - sin * dx  # the object's rotated frame

    inside = _shape_mask(SHAPES[shape], u, v)
    base = _COLOUR_RGB[colour] + rng.uniform(-25, 25, size=3).astype(np.float32)
    back = _BACKGROUND_RGB[rng.integers(len(_BACKGROUND_RGB))] + rng.uniform(-25, 25, size=3).astype(np.float32)
    image = np.empty((size, size, 3), dtype=np.float32)
    image[...] = back
    dark = _texture_mask(TEXTURES[texture], u, v)
    if dark is None:
        image[inside] = base
    else:
        image[inside & ~dark] = base
        image[inside & dark] = base * 0.45
    image += rng.normal(0.0, 12.0, size=(size, size, 1)).astype(np.float32)  # luminance noise
    np.clip(image, 0, 255, out=image)
    return image.astype(np.uint8), label
