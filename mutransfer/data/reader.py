"""Train and eval loaders over webdataset shards, for one rank of a (DeepSpeed) job.

Rank and world size are given explicitly; nothing here calls torch.distributed. Each DataLoader worker of
each rank is one "global worker" g = rank * W + worker of G = world_size * W (W = max(num_workers, 1)).

Workers do the per-image work: read shards, shuffle raw samples in a buffer, decode with PIL, apply timm's
PIL-side transforms (RandomResizedCrop, flip, auto-augment) and batch into uint8 tensors, mixed with
timm's FastCollateMixup when mixup/cutmix is on. uint8 batches are a quarter of the size of float ones,
which matters: every batch crosses to the main process through fresh shared memory. The main process (or
the `device` given to the builder, e.g. the rank's GPU) then converts to float, normalises and applies
random erasing, as timm's prefetcher does.

Training: every global worker draws shards with replacement (or, with `resampled=False`, takes its part of
an epoch-seeded permutation of the shards and shuffles within each pass over it, so that an epoch that fits
in one pass, as when the shards divide evenly over ranks x workers, trains on every sample at most once;
resampled training can repeat samples within an epoch). Every rank yields exactly `batches_per_epoch`
batches of `(images, targets)`: images float [B, 3, S, S], normalised; targets class indices (int64, [B])
without mixup, mixed and smoothed probabilities (float, [B, num_classes]) with it. `train_loss(cfg)` is the
matching loss. With `with_keys=True` the batches are `(images, targets, keys)`, keys the samples' `__key__`s
(the trainer's `run.record_samples` logs them). Shard choice, shuffling and the workers' augmentation (crop,
flip, auto-augment, mixup) are seeded by (seed, epoch, rank, worker), so they repeat exactly when
num_workers >= 1; random erasing runs in the training process and draws from its global RNGs (which the
trainer seeds), as in timm's train.py.

Evaluation: every sample is read exactly once across ranks x workers: shards are dealt out to global
workers (shard s to worker s mod G) when there are at least G of them, otherwise every worker reads all
shards and keeps sample i when i mod G == g. Batches are `EvalBatch(images, targets, valid, keys)`, always
`eval_batch_size` rows: rows past the end of a worker's data are padding with `valid=False`, target -100
(cross_entropy's default ignore_index) and key ''. When `_info.json` gives shard lengths, every rank yields
the same number of batches (`len(loader)`), adding all-padding batches as needed, so ranks that must
step together (ZeRO-3 gathers parameters in every forward) never wait on one another.

Bad data never stops a run: undecodable images, samples missing `jpg`/`cls`, bad labels and unreadable or
truncated shards are skipped, counted by reason and warned about (naming shard and key; the first 10, then
every 1000th). Worker processes count into their own row of a shared-memory tensor, so the loader's
`skip_counts` is exact in the main process; a summary is logged after every epoch that skipped anything.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import random
import signal
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from timm.data import FastCollateMixup, create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybePILToTensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import Compose
from webdataset.tariterators import group_by_keys, tar_file_iterator

from mutransfer.data.config import DataConfig
from mutransfer.data.shards import ShardSet, open_url, shards_from_info, shards_from_pattern

log = logging.getLogger(__name__)

SKIP_REASONS = ("corrupt_image", "missing_field", "bad_label", "bad_shard")
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
WARN_FIRST = 10
WARN_EVERY = 1000
PAD_TARGET = -100  # torch.nn.functional.cross_entropy ignores this target by default
MAX_CONSECUTIVE_SKIPS = 10_000  # in training, this many bad samples in a row means the data is broken


class EvalBatch(NamedTuple):
    images: torch.Tensor  # [B, 3, H, W]
    targets: torch.Tensor  # [B] int64, PAD_TARGET on padding rows
    valid: torch.Tensor  # [B] bool, False on padding rows
    keys: list[str]  # sample keys, '' on padding rows


class SkipCounter:
    """Skipped-sample counts by reason, one row per DataLoader worker in shared memory (a worker only
    writes its own row, so no locks), summed in the main process."""

    def __init__(self, slots: int) -> None:
        self.counts = torch.zeros((slots, len(SKIP_REASONS)), dtype=torch.int64).share_memory_()

    def record(self, slot: int, reason: str, url: str | None, key: str | None, detail: object) -> None:
        self.counts[slot, SKIP_REASONS.index(reason)] += 1
        total = int(self.counts.sum())
        if total <= WARN_FIRST or total % WARN_EVERY == 0:
            where = f"sample {key!r} of shard {url}" if key else f"shard {url}" if url else "a malformed sample"
            log.warning("skipping %s (%s: %s); %d skipped so far", where, reason, detail, total)

    def totals(self) -> dict[str, int]:
        return dict(zip(SKIP_REASONS, (int(n) for n in self.counts.sum(0))))


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from several integers (seed, epoch, rank, ...), stable across processes."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _Assignment(NamedTuple):
    urls: list[str]
    stride: int  # keep sample i (counted over `urls` in order) when i % stride == offset
    offset: int


def assign_shards(urls: list[str], worker: int, workers: int) -> _Assignment:
    """What global worker `worker` of `workers` reads so that all of them together read each sample once."""
    if len(urls) >= workers:
        return _Assignment(urls[worker::workers], 1, 0)
    return _Assignment(urls, workers, worker)


def assigned_samples(shard_lengths: list[int] | tuple[int, ...], worker: int, workers: int) -> int:
    """How many samples `assign_shards` gives global worker `worker`."""
    if len(shard_lengths) >= workers:
        return sum(shard_lengths[worker::workers])
    return max(0, -(-(sum(shard_lengths) - worker) // workers))


def read_samples(
    urls: Iterable[str],
    counter: SkipCounter,
    slot: int,
    stride: int = 1,
    offset: int = 0,
    max_empty_shards: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Raw samples (dicts of bytes keyed by extension, plus __key__ and __url__) of each shard in turn.

    A shard that cannot be opened or breaks off (a truncated tar) is counted once as `bad_shard` and reading
    goes on with the next; the samples read before the break are kept. After `max_empty_shards` shards in a
    row without a sample, raise: the shard set is unusable and an endless resampling loop would hang.
    """
    empty_in_a_row = 0

    def files() -> Iterator[dict[str, Any]]:
        nonlocal empty_in_a_row
        for url in urls:
            error: Exception | None = None
            produced = False
            try:
                stream = open_url(url)
            except Exception as err:
                error, stream = err, None
            if stream is not None:
                try:
                    for entry in tar_file_iterator(stream):
                        entry["__url__"] = url
                        produced = True
                        yield entry
                except Exception as err:
                    error = err
                finally:
                    try:
                        stream.close()  # a pipe: command's exit status is checked here
                    except Exception as err:
                        error = error or err
            if error is not None:
                counter.record(slot, "bad_shard", url, None, f"{type(error).__name__}: {error}")
            empty_in_a_row = 0 if produced else empty_in_a_row + 1
            if max_empty_shards is not None and empty_in_a_row >= max_empty_shards:
                raise RuntimeError(f"{empty_in_a_row} shards in a row gave no sample (last: {url}); is the shard set readable?")
            yield {}  # end-of-shard marker: group_by_keys never joins files of different shards

    def bad_group(err: Exception) -> bool:
        counter.record(slot, "bad_shard", None, None, err)
        return True

    for index, sample in enumerate(group_by_keys(files(), handler=bad_group)):
        if index % stride == offset:
            yield sample


def decode_samples(
    samples: Iterable[dict[str, Any]],
    transform: Any,
    counter: SkipCounter,
    slot: int,
    num_classes: int | None,
    max_consecutive_skips: int | None = None,
    open_image: Any = None,
) -> Iterator[tuple[Image.Image, int, str]]:
    """(transformed image, label, key) per good sample; bad ones are counted by reason and skipped.
    `open_image(bytes)` replaces the PIL decode (data.decode=gpu reads only the header here)."""
    skips_in_a_row = 0
    for sample in samples:
        url, key = sample.get("__url__"), sample.get("__key__")
        reason, detail = None, None
        image_field = next((f for f in IMAGE_FIELDS if f in sample), None)
        label = -1
        if image_field is None or "cls" not in sample:
            reason, detail = "missing_field", f"has {sorted(k for k in sample if not k.startswith('__'))}"
        else:
            try:
                label = int(sample["cls"])
            except ValueError:
                reason, detail = "bad_label", repr(sample["cls"][:20])
            else:
                if label < 0 or (num_classes is not None and label >= num_classes):
                    reason, detail = "bad_label", f"{label} outside [0, {num_classes})"
        if reason is None:
            try:
                if open_image is not None:
                    image = open_image(sample[image_field])
                else:
                    image = Image.open(io.BytesIO(sample[image_field]))
                    image = image.convert("RGB") if image.mode != "RGB" else image
                    image.load()  # decode now, so that a bad image is caught here
            except Exception as err:  # PIL raises many types for bad data
                reason, detail = "corrupt_image", f"{type(err).__name__}: {err}"
        if reason is not None:
            counter.record(slot, reason, url, key, detail)
            skips_in_a_row += 1
            if max_consecutive_skips is not None and skips_in_a_row >= max_consecutive_skips:
                raise RuntimeError(f"{skips_in_a_row} bad samples in a row (last: {key!r} of {url})")
            continue
        skips_in_a_row = 0
        yield transform(image), label, key


def uint8_batch(images: list[Image.Image], rows: int) -> torch.Tensor:
    """[rows, 3, H, W] uint8 from PIL images (rows past the images are zero). Inside a DataLoader worker the
    batch is allocated in shared memory and filled in place, so it leaves the worker without another copy.
    It is laid out channels-last (a permuted view), the layout PIL gives; `normalize` makes it contiguous."""
    height, width = images[0].height, images[0].width
    batch = torch.zeros((rows, height, width, 3), dtype=torch.uint8)
    if get_worker_info() is not None:
        batch.share_memory_()
    pixels = batch.numpy()
    for row, image in enumerate(images):
        pixels[row] = np.asarray(image)
    return batch.permute(0, 3, 1, 2)


def _collate(items: list[tuple[Image.Image, int, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images = uint8_batch([image for image, _, _ in items], len(items))
    return images, torch.tensor([label for _, label, _ in items]), [key for _, _, key in items]


class _MixCollate:
    """Collate with timm's FastCollateMixup, which mixes uint8 images and returns soft targets."""

    def __init__(self, mixup: FastCollateMixup) -> None:
        self.mixup = mixup

    def __call__(self, items: list[tuple[Image.Image, int, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        images, targets = self.mixup([(np.asarray(image).transpose(2, 0, 1), label) for image, label, _ in items])
        return images, targets, [key for _, _, key in items]


class _PadEval:
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


def pil_side(transform: Compose) -> Compose:
    """timm's prefetcher-style transform without its final to-tensor step: the collate writes the PIL
    images straight into the batch, saving two copies per image."""
    steps = list(transform.transforms)
    if not steps or not isinstance(steps[-1], MaybePILToTensor):
        raise RuntimeError(f"expected timm's transform to end in MaybePILToTensor: {transform}")
    return Compose(steps[:-1])


class _TrainStream(IterableDataset):
    """One epoch of training batches for one rank; each worker yields `batches_per_worker` of them."""

    def __init__(self, loader: TrainLoader, epoch: int) -> None:
        super().__init__()
        self.loader = loader
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        owner, cfg = self.loader, self.loader.cfg
        worker, workers = _worker()
        global_worker = owner.rank * workers + worker
        global_workers = owner.world_size * workers
        urls = list(owner.shards.urls)
        shuffle = None
        if cfg.shuffle_buffer > 1:
            shuffle_rng = random.Random(derive_seed(cfg.seed, self.epoch, global_worker, 3))
            shuffle = wds.shuffle(cfg.shuffle_buffer, cfg.shuffle_buffer, rng=shuffle_rng)
        if cfg.resampled:
            rng = random.Random(derive_seed(cfg.seed, self.epoch, global_worker, 1))
            samples = read_samples(
                iter(lambda: rng.choice(urls), None),  # endless draws with replacement
                owner.counter, worker, max_empty_shards=max(2 * len(urls), 16),
            )
            samples = shuffle(samples) if shuffle else samples
        else:
            random.Random(derive_seed(cfg.seed, self.epoch, 2)).shuffle(urls)  # same permutation everywhere
            part = assign_shards(urls, global_worker, global_workers)
            samples = _cycle_passes(part, owner.counter, worker, shuffle)
        items = decode_samples(
            samples, owner.transform, owner.counter, worker, owner.num_classes, MAX_CONSECUTIVE_SKIPS,
            owner.open_image,
        )
        batches_per_worker = -(-owner.batches_per_epoch // workers)
        collate = owner.collate or (_collate if owner.mixup is None else _MixCollate(owner.mixup))
        batches = wds.batched(cfg.batch_size, collation_fn=collate, partial=False)(items)
        yield from itertools.islice(batches, batches_per_worker)


def _cycle_passes(part: _Assignment, counter: SkipCounter, slot: int, shuffle: Any = None) -> Iterator[dict[str, Any]]:
    """A worker's part of the shards, read again and again until its batch quota is met (with unequal
    shard sizes, the worker with less data re-reads its own shards rather than leave its rank short).

    The shuffle buffer is drained at the end of every pass: shuffling across the pass boundary would let
    samples of the next pass out before the last ones of this pass, and an epoch that fits in one pass
    would see some samples twice and miss others."""
    while True:
        produced = False
        one_pass = read_samples(part.urls, counter, slot, part.stride, part.offset)
        for sample in shuffle(one_pass) if shuffle else one_pass:
            produced = True
            yield sample
        if not produced:
            raise RuntimeError(f"no sample could be read from shards {part.urls[:3]}...")


class _EvalStream(IterableDataset):
    def __init__(self, loader: EvalLoader) -> None:
        super().__init__()
        self.loader = loader

    def __iter__(self) -> Iterator[EvalBatch]:
        owner = self.loader
        worker, workers = _worker()
        part = assign_shards(list(owner.shards.urls), owner.rank * workers + worker, owner.world_size * workers)
        samples = read_samples(part.urls, owner.counter, worker, part.stride, part.offset)
        items = decode_samples(samples, owner.transform, owner.counter, worker, owner.num_classes)
        pad = _PadEval(owner.batch_size)
        yield from wds.batched(owner.batch_size, collation_fn=pad, partial=True)(items)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")


def _resolve(cfg: DataConfig, pattern: str | None, split: str, field: str) -> ShardSet:
    if pattern is not None:
        return shards_from_pattern(pattern)
    if cfg.shards_dir is None:
        raise ValueError(f"DataConfig: set shards_dir (with {field.split('_')[0]}_split) or {field} to find the shards")
    return shards_from_info(cfg.shards_dir, split)


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGTERM / SIGINT to their trainer: SLURM and Ctrl-C signal every process of a job, and
    a worker dying first would break the batch the trainer needs to reach its preemption checkpoint. The
    DataLoader still stops its workers when the trainer is done with them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _LoaderBase:
    def __init__(
        self, cfg: DataConfig, rank: int, world_size: int, shards: ShardSet, device: torch.device | str | None
    ) -> None:
        _check_rank(rank, world_size)
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.shards = shards
        self.device = torch.device(device) if device is not None else None
        self.num_classes = cfg.num_classes or shards.num_classes
        self.counter = SkipCounter(max(1, cfg.num_workers))
        self.image_shape = (3, cfg.img_size, cfg.img_size)
        where = self.device or torch.device("cpu")
        self._mean = torch.tensor(cfg.mean, device=where).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(cfg.std, device=where).view(1, 3, 1, 1) * 255

    @property
    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far by reason, across all workers and epochs of this loader."""
        return self.counter.totals()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images from the workers -> contiguous float, normalised, on the loader's device."""
        images = self._to_device(images)
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
        return out.copy_(images).sub_(self._mean).div_(self._std)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True) if self.device is not None else tensor

    def _data_loader(self, dataset: IterableDataset, seed: int) -> DataLoader:
        cfg = self.cfg
        pin = cfg.pin_memory if cfg.pin_memory is not None else self.device is not None and self.device.type == "cuda"
        return DataLoader(
            dataset,
            batch_size=None,  # the workers batch
            num_workers=cfg.num_workers,
            pin_memory=pin,
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
            generator=torch.Generator().manual_seed(seed),  # seeds the workers' random, torch and numpy
            worker_init_fn=_ignore_stop_signals,
        )

    def _log_skips(self, what: str, before: dict[str, int]) -> None:
        after = self.skip_counts
        delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        if delta:
            detail = ", ".join(f"{k}={v}" for k, v in delta.items())
            log.warning("%s on rank %d skipped %d sample(s)/shard(s): %s", what, self.rank, sum(delta.values()), detail)


class TrainLoader(_LoaderBase):
    """Iterate for one epoch of exactly `batches_per_epoch` batches `(images, targets)`, or
    `(images, targets, keys)` with `with_keys`.

    Each iteration uses `epoch` and then advances it; `set_epoch(e)` chooses the next one (to resume).
    `mixup` is timm's FastCollateMixup (applied in the workers) or None. `open_image` and `collate` are the
    hooks of data.decode=gpu (`gpu_decode.GpuDecodeTrainLoader`); None here: PIL decode, uint8 batches.
    """

    open_image: Any = None
    collate: Any = None

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, device: torch.device | str | None = None,
                 with_keys: bool = False) -> None:
        shards = _resolve(cfg, cfg.train_shards, cfg.train_split, "train_shards")
        super().__init__(cfg, rank, world_size, shards, device)
        self.with_keys = with_keys
        self.batches_per_epoch = cfg.batches_per_epoch or self._derive_batches_per_epoch()
        self.transform = pil_side(create_transform(  # PIL images out; batched as uint8, normalised later
            cfg.img_size,
            is_training=True,
            scale=cfg.scale,
            ratio=cfg.ratio,
            hflip=cfg.hflip,
            color_jitter=cfg.color_jitter or None,
            auto_augment=cfg.auto_augment,
            interpolation=cfg.interpolation,
            use_prefetcher=True,
        ))
        self.random_erasing = None
        if cfg.re_prob > 0:
            self.random_erasing = RandomErasing(
                probability=cfg.re_prob, mode=cfg.re_mode, max_count=cfg.re_count, device=str(self._mean.device)
            )
        self.mixup: FastCollateMixup | None = None
        if cfg.mixup_active:
            if self.num_classes is None:
                raise ValueError("DataConfig.num_classes must be set for mixup/cutmix (no _info.json gives it)")
            self.mixup = FastCollateMixup(
                mixup_alpha=cfg.mixup_alpha,
                cutmix_alpha=cfg.cutmix_alpha,
                cutmix_minmax=cfg.cutmix_minmax,
                prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob,
                mode=cfg.mixup_mode,
                label_smoothing=cfg.label_smoothing,
                num_classes=self.num_classes,
            )
        self.epoch = 0

    def _derive_batches_per_epoch(self) -> int:
        num_samples = self.shards.num_samples or self.cfg.train_num_samples
        if num_samples is None:
            raise ValueError(
                f"DataConfig.batches_per_epoch is None and no _info.json gives the size of {self.shards.pattern!r}; "
                "set batches_per_epoch or train_num_samples"
            )
        return max(1, num_samples // (self.cfg.batch_size * self.world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, list[str]]]:
        epoch = self.epoch
        self.epoch += 1
        before = self.skip_counts
        loader = self._data_loader(_TrainStream(self, epoch), derive_seed(self.cfg.seed, epoch, self.rank, 4))
        batches = iter(loader)
        try:
            for count in range(self.batches_per_epoch):
                try:
                    images, targets, keys = next(batches)  # the workers always send keys: a few bytes
                except StopIteration:
                    raise RuntimeError(
                        f"train rank {self.rank} got {count} of {self.batches_per_epoch} batches from its workers"
                    ) from None
                images = self.normalize(images)
                if self.random_erasing is not None:
                    images = self.random_erasing(images)
                yield (images, self._to_device(targets), keys) if self.with_keys else (images, self._to_device(targets))
        finally:
            del batches  # shuts the workers down, also when the caller stops early
        self._log_skips(f"train epoch {epoch}", before)


class EvalLoader(_LoaderBase):
    """Iterate over `EvalBatch`es covering each eval sample exactly once across all ranks.

    `num_batches` (and len()) is the same on every rank when `_info.json` gives the shard lengths; it is
    None otherwise, and then ranks may yield different numbers of batches.
    """

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, device: torch.device | str | None = None) -> None:
        shards = _resolve(cfg, cfg.eval_shards, cfg.eval_split, "eval_shards")
        super().__init__(cfg, rank, world_size, shards, device)
        self.batch_size = cfg.eval_batch_size or cfg.batch_size
        self.transform = pil_side(create_transform(
            cfg.img_size,
            is_training=False,
            interpolation="bicubic" if cfg.interpolation == "random" else cfg.interpolation,
            crop_pct=cfg.crop_pct,
            use_prefetcher=True,
        ))
        self.num_samples = self.shards.num_samples
        self.num_batches = self._batches_on_slowest_rank()

    def _batches_on_slowest_rank(self) -> int | None:
        lengths = self.shards.shard_lengths
        if lengths is None:
            return None
        workers = max(1, self.cfg.num_workers)
        global_workers = self.world_size * workers
        per_rank = [
            sum(math.ceil(assigned_samples(lengths, r * workers + w, global_workers) / self.batch_size) for w in range(workers))
            for r in range(self.world_size)
        ]
        return max(per_rank)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError(f"the eval batch count of {self.shards.pattern!r} is unknown without an _info.json")
        return self.num_batches

    def _finish(self, batch: EvalBatch) -> EvalBatch:
        return EvalBatch(self.normalize(batch.images), self._to_device(batch.targets), self._to_device(batch.valid),
                         batch.keys)

    def __iter__(self) -> Iterator[EvalBatch]:
        before = self.skip_counts
        count = 0
        for batch in self._data_loader(_EvalStream(self), derive_seed(self.cfg.seed, self.rank, 5)):
            count += 1
            yield self._finish(batch)
        if self.num_batches is not None:
            if count > self.num_batches:
                log.warning(
                    "eval rank %d read %d batches but the index of %s predicts %d: it is out of date, and ranks "
                    "that step together may wait on each other", self.rank, count, self.shards.pattern, self.num_batches,
                )
            for _ in range(count, self.num_batches):
                yield self._finish(empty_eval_batch(self.batch_size, self.image_shape))
        self._log_skips("evaluation", before)


def build_train_loader(
    cfg: DataConfig, rank: int = 0, world_size: int = 1, device: torch.device | str | None = None,
    with_keys: bool = False,
) -> TrainLoader:
    """The training loader of one rank (see the module docstring for what it yields). With `device`, batches
    arrive there, normalised there (pinned, non-blocking copies of uint8 when it is a GPU). With `with_keys`,
    each batch also carries its samples' keys. With data.decode=gpu, decoding and cropping happen on
    `device` (see gpu_decode)."""
    if cfg.decode == "gpu":
        from mutransfer.data.gpu_decode import GpuDecodeTrainLoader

        return GpuDecodeTrainLoader(cfg, rank, world_size, device, with_keys)
    return TrainLoader(cfg, rank, world_size, device, with_keys)


def build_eval_loader(
    cfg: DataConfig, rank: int = 0, world_size: int = 1, device: torch.device | str | None = None
) -> EvalLoader:
    """The evaluation loader of one rank (see the module docstring for what it yields)."""
    return EvalLoader(cfg, rank, world_size, device)


def train_loss(cfg: DataConfig) -> torch.nn.Module:
    """The loss that matches the train loader's targets: cross-entropy on class indices with label
    smoothing, or on the soft targets that mixup already smoothed."""
    return torch.nn.CrossEntropyLoss(label_smoothing=0.0 if cfg.mixup_active else cfg.label_smoothing)
