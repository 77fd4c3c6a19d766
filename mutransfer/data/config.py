"""`DataConfig`: every knob of the input pipeline, with defaults and checks that raise ConfigError naming the field."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from mutransfer.errors import ConfigError
from mutransfer.typed_config import Section

# Interpolation names timm's transforms understand ('random' picks one per image, train only).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "hamming", "box", "random")
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class DataConfig(Section):
    """Where the shards are and how they become batches. Per-rank values unless a field says otherwise.

    Shards are found either through `shards_dir` (a folder or URL prefix holding `_info.json`, which names
    each split's shard files and sample counts) or through explicit patterns (`train_shards`, `eval_shards`):
    a local path, a brace pattern (`train-{000000..000127}.tar`), a `pipe:` command or an fsspec URL.
    """

    shards_dir: str | None = None
    """Folder or URL prefix with `_info.json` and the shards it lists (as written by `mutransfer shards write`)."""
    train_split: str = "train"
    """Split of `_info.json` to train on."""
    eval_split: str = "validation"
    """Split of `_info.json` to evaluate on."""
    train_shards: str | None = None
    """Explicit training shard pattern; overrides `shards_dir` + `train_split`."""
    eval_shards: str | None = None
    """Explicit evaluation shard pattern; overrides `shards_dir` + `eval_split`."""
    train_num_samples: int | None = None
    """Samples in the training shards, for patterns that no `_info.json` describes."""

    img_size: int = 224
    """Side of the square images the model sees."""
    batch_size: int = 64
    """Training batch size per rank."""
    eval_batch_size: int | None = None
    """Evaluation batch size per rank; None means `batch_size`."""
    num_workers: int = 4
    """DataLoader worker processes per rank (0 reads in the calling process)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    pin_memory: bool | None = None
    """Pin host memory for faster copies to the GPU; None pins when CUDA is available."""
    shuffle_buffer: int = 2000
    """Raw (undecoded) samples held per worker for shuffling; 0 or 1 disables shuffling."""
    seed: int = 0
    """Seed of shard sampling, shuffling and (with workers) augmentation; same seed and epoch, same data."""
    resampled: bool = True
    """Train on shards drawn with replacement (endless, the usual choice at scale). False: each epoch
    partitions the shards over ranks x workers by an epoch-seeded permutation."""
    batches_per_epoch: int | None = None
    """Training batches per rank per epoch; None derives num_samples / (batch_size * world_size)."""

    scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    color_jitter: float = 0.0
    """Colour-jitter strength (timm ignores it when `auto_augment` is set)."""
    auto_augment: str | None = None
    """timm auto-augment policy string, e.g. 'rand-m9-mstd0.5-inc1' (RandAugment) or 'augmix-m5-w4-d2'."""
    interpolation: str = "bicubic"
    """Resize interpolation; 'random' (training only) picks bilinear or bicubic per image."""
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    """Per-channel normalisation mean."""
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    """Per-channel normalisation standard deviation."""
    crop_pct: float = 0.875
    """Evaluation centre crop: resize the short side to img_size / crop_pct, then crop img_size."""
    re_prob: float = 0.0
    """Random-erasing probability."""
    re_mode: str = "pixel"
    """Random-erasing fill: 'const', 'rand' or 'pixel'."""
    re_count: int = 1
    """Random-erasing boxes per image."""

    mixup_alpha: float = 0.0
    """Mixup Beta(alpha, alpha); 0 turns mixup off."""
    cutmix_alpha: float = 0.0
    """CutMix Beta(alpha, alpha); 0 turns cutmix off."""
    cutmix_minmax: tuple[float, float] | None = None
    """CutMix box size as a fraction of the image, overrides cutmix_alpha when set."""
    mixup_prob: float = 1.0
    """Probability that a batch (or element) is mixed at all."""
    mixup_switch_prob: float = 0.5
    """Probability of cutmix instead of mixup when both are on."""
    mixup_mode: str = "batch"
    """How mixing parameters are drawn: 'batch', 'pair' or 'elem'."""
    label_smoothing: float = 0.0
    """Label smoothing; folded into the soft targets when mixup/cutmix is on."""
    num_classes: int | None = None
    """Number of classes; None reads it from `_info.json` (needed for mixup and label checks)."""
    cache_mb: int = 1024
    """Memory (MiB) a process may keep the shards it read in, raw and decoded, so that the next trial or pass
    reads none of them again (`data/sample_cache.py`); only where the loader runs in the training process
    (num_workers=0, as proxy sweeps run); 0: none. The data is the same either way."""
    decode: str = "cpu"
    """Where training images are decoded and cropped: 'cpu' (PIL in the loader workers) or 'gpu' (the
    workers send JPEG bytes; nvJPEG decodes them on the rank's GPU, which also crops, flips and normalises;
    see `mutransfer/data/gpu_decode.py`). 'gpu' takes no auto_augment, color_jitter or mixup / cutmix."""

    @property
    def mixup_active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.cutmix_minmax is not None

    def check(self) -> None:
        """Raise ConfigError naming the first field whose value cannot work (types are already checked)."""
        for name in ("train_split", "eval_split"):
            if not SPLIT_NAME.match(getattr(self, name)):
                _bad(name, getattr(self, name), "must be letters, digits, '_' or '-'")
        for name in ("shards_dir", "train_shards", "eval_shards"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                _bad(name, value, "must be a non-empty string or null")
        for name in ("img_size", "batch_size", "prefetch_factor", "re_count", "eval_batch_size",
                     "batches_per_epoch", "train_num_samples", "num_classes"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("num_workers", "shuffle_buffer", "seed", "cache_mb"):
            _check_int(name, getattr(self, name), minimum=0)
        self._check_augmentation()
        self._check_mixup()
        self._check_decode()

    def _check_augmentation(self) -> None:
        _check_range("scale", self.scale, low=0.0, high=1.0)
        _check_range("ratio", self.ratio, low=0.0, high=math.inf)
        for name in ("hflip", "re_prob"):
            _check_probability(name, getattr(self, name))
        if not self.color_jitter >= 0:
            _bad("color_jitter", self.color_jitter, "must be a number >= 0")
        if not 0 <= self.label_smoothing < 1:
            _bad("label_smoothing", self.label_smoothing, "must be in [0, 1)")
        if not 0 < self.crop_pct <= 1:
            _bad("crop_pct", self.crop_pct, "must be in (0, 1]")
        if self.interpolation not in INTERPOLATIONS:
            _bad("interpolation", self.interpolation, f"must be one of {', '.join(INTERPOLATIONS)}")
        if not all(v > 0 for v in self.std):
            _bad("std", self.std, "must be positive")
        if self.re_mode not in ("const", "rand", "pixel"):
            _bad("re_mode", self.re_mode, "must be 'const', 'rand' or 'pixel'")
        if self.auto_augment is not None:
            self._check_auto_augment()

    def _check_mixup(self) -> None:
        for name in ("mixup_prob", "mixup_switch_prob"):
            _check_probability(name, getattr(self, name))
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not getattr(self, name) >= 0:
                _bad(name, getattr(self, name), "must be a number >= 0")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            _bad("mixup_mode", self.mixup_mode, "must be 'batch', 'pair' or 'elem'")
        if self.cutmix_minmax is not None:
            _check_range("cutmix_minmax", self.cutmix_minmax, low=0.0, high=1.0)
        if self.mixup_active and self.batch_size % 2:
            _bad("batch_size", self.batch_size, "must be even when mixup or cutmix is on (timm mixes pairs)")

    def _check_decode(self) -> None:
        if self.decode not in ("cpu", "gpu"):
            _bad("decode", self.decode, "must be 'cpu' or 'gpu'")
        if self.decode == "gpu":
            cpu_only = [name for name in ("auto_augment", "color_jitter") if getattr(self, name)]
            cpu_only += ["mixup/cutmix"] if self.mixup_active else []
            if cpu_only:
                _bad("decode", self.decode, f"cannot be combined with {', '.join(cpu_only)} (CPU-side augmentations)")
            if self.interpolation not in ("bilinear", "bicubic", "nearest", "random"):
                _bad("interpolation", self.interpolation, "must be bilinear, bicubic, nearest or random with decode='gpu'")

    def _check_auto_augment(self) -> None:
        from timm.data import create_transform

        if not self.auto_augment:
            _bad("auto_augment", self.auto_augment, "must be a timm policy string such as 'rand-m9-mstd0.5-inc1'")
        try:  # timm parses the policy string while building the transform
            create_transform(self.img_size, is_training=True, auto_augment=self.auto_augment)
        except Exception as err:
            raise ConfigError("auto_augment", f"{self.auto_augment!r} is not a timm policy: {err}") from None


def _bad(name: str, value: object, why: str) -> None:
    raise ConfigError(name, f"{why}, got {value!r}")


def _check_int(name: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        _bad(name, value, f"must be an integer >= {minimum}")


def _check_probability(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        _bad(name, value, "must be a probability in [0, 1]")


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> None:
    if not low < value[0] <= value[1] <= high:
        _bad(name, value, f"must be a pair (lo, hi) with {low} < lo <= hi <= {high}")
