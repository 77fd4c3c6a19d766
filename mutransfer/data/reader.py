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
every 1000th). A damaged tar header does not end its shard: tarfile skips ahead to the next intact header,
so damage costs the samples it covers. Samples that `_info.json` lists but a damaged or truncated shard did
not give are counted as `unread_samples`, naming the shard. Worker processes count into their own row of a
shared-memory tensor, so the loader's `skip_counts` (and the eval loader's `good_per_shard`, the coverage
of each shard) are exact in the main process; a summary is logged after every epoch that skipped anything.
Data that cannot work at all (no readable sample, 10000 bad samples in a row) raises `DataError`.

Workers ignore SIGTERM / SIGINT until their loader lets them go (see `WorkerRelease`), and every way out of
an iteration (exhausted, stopped early, an error) stops them, so a failing run exits instead of waiting on
its workers.
"""

from __future__ import annotations

import atexit
import io
import itertools
import logging
import math
import os
import random
import re
import signal
import tarfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
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
from webdataset.tariterators import group_by_keys

from mutransfer.data.config import DataConfig
from mutransfer.data.info import DataError
from mutransfer.data.shards import ShardSet, open_url, shards_from_info, shards_from_pattern

log = logging.getLogger(__name__)

SKIP_REASONS = ("corrupt_image", "missing_field", "bad_label", "bad_shard", "unread_samples")
META_FILE = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, not sample files
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
    """Skipped samples by reason, and good samples per shard, one row per DataLoader worker in shared memory
    (a worker only writes its own row, so no locks), summed in the main process."""

    def __init__(self, slots: int, urls: Sequence[str] = ()) -> None:
        self.counts = torch.zeros((slots, len(SKIP_REASONS)), dtype=torch.int64).share_memory_()
        self.shard_index = {url: i for i, url in enumerate(urls)}
        self.good = torch.zeros((slots, max(1, len(urls))), dtype=torch.int64).share_memory_()

    def record(self, slot: int, reason: str, url: str | None, key: str | None, detail: object,
               amount: int = 1) -> None:
        before = int(self.counts.sum())
        self.counts[slot, SKIP_REASONS.index(reason)] += amount
        total = before + amount
        if before < WARN_FIRST or before // WARN_EVERY != total // WARN_EVERY:
            where = f"sample {key!r} of shard {url}" if key else f"shard {url}" if url else "a malformed sample"
            log.warning("skipping %s (%s: %s); %d skipped so far", where, reason, detail, total)

    def count_good(self, slot: int, url: str | None) -> None:
        index = self.shard_index.get(url)
        if index is not None:
            self.good[slot, index] += 1

    def totals(self) -> dict[str, int]:
        return dict(zip(SKIP_REASONS, (int(n) for n in self.counts.sum(0))))

    def good_per_shard(self) -> list[int]:
        return [int(n) for n in self.good.sum(0)[: len(self.shard_index)]]


_RELEASES: weakref.WeakSet[WorkerRelease] = weakref.WeakSet()


class WorkerRelease:
    """Whether one DataLoader's workers may be stopped by a signal (a flag in shared memory).

    SLURM and Ctrl-C signal every process of a job, workers included: a worker that died first would break
    the batch its trainer needs to reach its preemption checkpoint, and torch turns a worker's death into an
    error raised in the trainer at an arbitrary point. So workers ignore SIGTERM / SIGINT until released,
    and then either signal ends them at once. The loader releases them when it stops them, and every loader
    is released at interpreter exit, where multiprocessing terminates its daemonic children (our workers)
    and then waits for them: an ignored SIGTERM would make that wait endless.
    """

    def __init__(self) -> None:
        self.flag = torch.zeros(1, dtype=torch.uint8).share_memory_()
        _RELEASES.add(self)

    def install(self, _worker_id: int) -> None:
        """The DataLoader's worker_init_fn."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, _signum: int, _frame: Any) -> None:
        if int(self.flag[0]):
            os._exit(0)  # a clean exit status: torch reports workers that die of a signal as failures

    def release(self) -> None:
        self.flag[0] = 1


@atexit.register  # registered after multiprocessing's exit hook (torch imports it first), so it runs before
def _release_all_workers() -> None:
    for release in list(_RELEASES):
        release.release()


def stop_workers(batches: Iterator[Any]) -> None:
    """Stop a DataLoader iterator's workers now. Dropping the iterator is not enough: a traceback that
    passed through it keeps it alive, and its workers with it, until interpreter exit."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own orderly stop; absent without workers
    if shutdown is not None:
        shutdown()


def worker_error_message(err: BaseException) -> str:
    """The message of an error raised in a DataLoader worker, without the worker's traceback that torch
    puts in front of it when it raises the error again in the main process."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    last = lines[-1]
    name = f"{type(err).__name__}: "
    return last.split(name, 1)[1] if name in last else last


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


def tar_members(stream: Any) -> Iterator[dict[str, Any]]:
    """{fname, data} of each regular file of a tar stream. Unlike webdataset's tar_file_iterator, a damaged
    header does not end the shard there and then without a word: tarfile (ignore_zeros) skips ahead to the
    next intact header, so a damaged region costs only the samples it covers."""
    archive = tarfile.open(fileobj=stream, mode="r|*", ignore_zeros=True)
    for member in archive:
        if member.isreg() and not META_FILE.match(member.name):
            yield {"fname": member.name, "data": archive.extractfile(member).read()}
        archive.members = []  # a stream: keep no index of what was read


def shard_samples(url: str, counter: SkipCounter, slot: int) -> Iterator[dict[str, Any]]:
    """Raw samples (dicts of bytes keyed by extension, plus __key__ and __url__) of one shard. A shard that
    cannot be opened or breaks off (a truncated tar) is counted once as `bad_shard`; what was read before the
    break is kept."""
    try:
        stream = open_url(url)
    except Exception as err:
        counter.record(slot, "bad_shard", url, None, f"{type(err).__name__}: {err}")
        return

    def bad_group(err: Exception) -> bool:
        counter.record(slot, "bad_shard", url, None, err)
        return True

    error: Exception | None = None
    try:
        files = ({**entry, "__url__": url} for entry in tar_members(stream))
        yield from group_by_keys(files, handler=bad_group)
    except Exception as err:
        error = err
    finally:
        try:
            stream.close()  # a pipe: command's exit status is checked here
        except Exception as err:
            error = error or err
    if error is not None:
        counter.record(slot, "bad_shard", url, None, f"{type(error).__name__}: {error}")


def _congruent(low: int, high: int, stride: int, offset: int) -> int:
    """How many i in [low, high) have i % stride == offset."""
    return max(0, (high - 1 - offset) // stride - (low - 1 - offset) // stride)


def read_samples(
    urls: Iterable[str],
    counter: SkipCounter,
    slot: int,
    stride: int = 1,
    offset: int = 0,
    max_empty_shards: int | None = None,
    lengths: dict[str, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Raw samples of each shard in turn, keeping sample i (counted over all shards read) when
    i % stride == offset.

    A shard that gives fewer samples than `lengths` (from `_info.json`) says it holds counts this worker's
    share of the difference as `unread_samples`, naming the shard. After `max_empty_shards` shards in a row
    without a sample, raise DataError: the shard set is unusable and an endless resampling loop would hang.
    """
    position = 0  # samples read so far, over all shards
    empty_in_a_row = 0
    for url in urls:
        read = 0
        for sample in shard_samples(url, counter, slot):
            if (position + read) % stride == offset:
                yield sample
            read += 1
        expected = lengths.get(url) if lengths else None
        if expected is not None and read < expected:
            lost = _congruent(position + read, position + expected, stride, offset)
            if lost:
                counter.record(slot, "unread_samples", url, None,
                               f"{expected - read} of its {expected} samples (per _info.json) could not be read",
                               amount=lost)
        position += read
        empty_in_a_row = 0 if read else empty_in_a_row + 1
        if max_empty_shards is not None and empty_in_a_row >= max_empty_shards:
            raise DataError(f"{empty_in_a_row} shards in a row gave no sample (last: {url}); are they tar files?")


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
                raise DataError(f"{skips_in_a_row} bad samples in a row (last: {key!r} of {url})")
            continue
        skips_in_a_row = 0
        counter.count_good(slot, url)
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
                owner.counter, worker, max_empty_shards=max(2 * len(urls), 16), lengths=owner.lengths,
            )
            samples = shuffle(samples) if shuffle else samples
        else:
            random.Random(derive_seed(cfg.seed, self.epoch, 2)).shuffle(urls)  # same permutation everywhere
            part = assign_shards(urls, global_worker, global_workers)
            samples = _cycle_passes(part, owner.counter, worker, shuffle, owner.lengths)
        items = decode_samples(
            samples, owner.transform, owner.counter, worker, owner.num_classes, MAX_CONSECUTIVE_SKIPS,
            owner.open_image,
        )
        batches_per_worker = -(-owner.batches_per_epoch // workers)
        collate = owner.collate or (_collate if owner.mixup is None else _MixCollate(owner.mixup))
        batches = wds.batched(cfg.batch_size, collation_fn=collate, partial=False)(items)
        yield from itertools.islice(batches, batches_per_worker)


def _cycle_passes(part: _Assignment, counter: SkipCounter, slot: int, shuffle: Any = None,
                  lengths: dict[str, int] | None = None) -> Iterator[dict[str, Any]]:
    """A worker's part of the shards, read again and again until its batch quota is met (with unequal
    shard sizes, the worker with less data re-reads its own shards rather than leave its rank short).

    The shuffle buffer is drained at the end of every pass: shuffling across the pass boundary would let
    samples of the next pass out before the last ones of this pass, and an epoch that fits in one pass
    would see some samples twice and miss others."""
    while True:
        produced = False
        one_pass = read_samples(part.urls, counter, slot, part.stride, part.offset, lengths=lengths)
        for sample in shuffle(one_pass) if shuffle else one_pass:
            produced = True
            yield sample
        if not produced:
            more = f" and {len(part.urls) - 1} more" if len(part.urls) > 1 else ""
            raise DataError(f"no sample could be read from shard {part.urls[0]}{more}; are they tar files?")


class _EvalStream(IterableDataset):
    def __init__(self, loader: EvalLoader) -> None:
        super().__init__()
        self.loader = loader

    def __iter__(self) -> Iterator[EvalBatch]:
        owner = self.loader
        worker, workers = _worker()
        part = assign_shards(list(owner.shards.urls), owner.rank * workers + worker, owner.world_size * workers)
        samples = read_samples(part.urls, owner.counter, worker, part.stride, part.offset, lengths=owner.lengths)
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
        self.counter = SkipCounter(max(1, cfg.num_workers), shards.urls)
        self.lengths = dict(zip(shards.urls, shards.shard_lengths)) if shards.shard_lengths is not None else None
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

    def _batches(self, dataset: IterableDataset, seed: int) -> Iterator[Any]:
        """The batches of a DataLoader over `dataset`. However iteration ends (exhausted, closed early, an
        error), its workers are released and stopped."""
        cfg = self.cfg
        pin = cfg.pin_memory if cfg.pin_memory is not None else self.device is not None and self.device.type == "cuda"
        release = WorkerRelease()
        batches = iter(DataLoader(
            dataset,
            batch_size=None,  # the workers batch
            num_workers=cfg.num_workers,
            pin_memory=pin,
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
            generator=torch.Generator().manual_seed(seed),  # seeds the workers' random, torch and numpy
            worker_init_fn=release.install,
        ))
        try:
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except DataError as err:  # from a worker, with the worker's traceback in its message
                    raise DataError(f"{worker_error_message(err)} (rank {self.rank})") from None
                yield batch
        finally:
            release.release()
            stop_workers(batches)

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
        batches = self._batches(_TrainStream(self, epoch), derive_seed(self.cfg.seed, epoch, self.rank, 4))
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
            batches.close()  # stops the workers, also when the caller stops early
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

    def good_per_shard(self) -> list[int]:
        """Samples of each shard (in `shards.urls` order) this rank has yielded as valid rows so far."""
        return self.counter.good_per_shard()

    def __iter__(self) -> Iterator[EvalBatch]:
        before = self.skip_counts
        count = 0
        batches = self._batches(_EvalStream(self), derive_seed(self.cfg.seed, self.rank, 5))
        try:
            for batch in batches:
                count += 1
                yield self._finish(batch)
        finally:
            batches.close()
        if self.num_batches is not None:
            if count > self.num_batches:
                log.warning(
                    "eval rank %d read %d batches but the index of %s predicts %d: it is out of date, and ranks "
                    "that step together may wait on each other", self.rank, count, self.shards.pattern, self.num_batches,
                )
            for _ in range(count, self.num_batches):
                yield self._finish(empty_eval_batch(self.batch_size, self.image_shape))
        self._log_skips("evaluation", before)


def coverage_shortfall(shards: ShardSet, good_per_shard: Sequence[float], limit: int = 8) -> str | None:
    """None when every shard gave every sample its `_info.json` lists (or when none gives lengths); else a
    warning naming the shards that fell short. `good_per_shard` is summed over all ranks."""
    if shards.shard_lengths is None:
        return None
    short = [(url, int(good), expected) for url, good, expected in zip(shards.urls, good_per_shard, shards.shard_lengths)
             if good < expected]
    if not short:
        return None
    total = int(sum(good_per_shard))
    names = ", ".join(f"{os.path.basename(url)} {good} of {expected}" for url, good, expected in short[:limit])
    more = f" and {len(short) - limit} more" if len(short) > limit else ""
    return (f"evaluated {total} of the {shards.num_samples} samples _info.json lists for {shards.pattern}; "
            f"short: {names}{more}")


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
