"""The training loader of one rank: exactly `batches_per_epoch` batches `(images, targets)` per epoch.

Every global worker (see `partition`) draws shards with replacement (or, with `resampled=False`, takes its
part of an epoch-seeded permutation of the shards and shuffles within each pass over it, so that an epoch
that fits in one pass, as when the shards divide evenly over ranks x workers, trains on every sample at most
once; resampled training can repeat samples within an epoch). Images arrive float [B, 3, S, S], normalised
on the loader's device; targets are class indices (int64, [B]) without mixup, mixed and smoothed
probabilities (float, [B, num_classes]) with it; `train_loss(cfg)` is the matching loss. With
`with_keys=True` the batches are `(images, targets, keys)`. Shard choice, shuffling and the workers'
augmentation (crop, flip, auto-augment, mixup) are seeded by (seed, epoch, rank, worker), so they repeat
exactly when num_workers >= 1; random erasing runs in the training process and draws from its global RNGs
(which the trainer seeds), as in timm's train.py.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import torch
import webdataset as wds
from timm.data import FastCollateMixup, create_transform
from timm.data.random_erasing import RandomErasing
from torch.utils.data import IterableDataset

from mutransfer.data.collate import MixCollate, collate_uint8
from mutransfer.data.config import DataConfig
from mutransfer.data.decode import MAX_CONSECUTIVE_SKIPS, Decoder, PilDecoder, decode_samples, pil_side
from mutransfer.data.loader_base import LoaderBase, resolve_shards
from mutransfer.data.partition import assign_shards, derive_seed, worker_slot
from mutransfer.data.sample_cache import SampleCache, process_cache
from mutransfer.data.tars import cycle_passes, read_samples
from mutransfer.errors import UsageError


class TrainStream(IterableDataset):
    """One epoch of training batches for one rank; each worker yields `batches_per_worker` of them."""

    def __init__(self, loader: TrainLoader, epoch: int) -> None:
        super().__init__()
        self.loader = loader
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        owner, cfg = self.loader, self.loader.cfg
        worker, workers = worker_slot()
        global_worker = owner.rank * workers + worker
        cache = process_cache(cfg.cache_mb)
        items = decode_samples(self._samples(worker, global_worker, owner.world_size * workers, cache), owner.decoder,
                               owner.counter, worker, owner.num_classes, MAX_CONSECUTIVE_SKIPS, cache)
        batches = wds.batched(cfg.batch_size, collation_fn=owner.decoder.collate, partial=False)(items)
        yield from itertools.islice(batches, -(-owner.batches_per_epoch // workers))

    def _samples(self, worker: int, global_worker: int, global_workers: int, cache: SampleCache | None
                 ) -> Iterator[dict[str, Any]]:
        owner, cfg = self.loader, self.loader.cfg
        urls = list(owner.shards.urls)
        shuffle = None
        if cfg.shuffle_buffer > 1:
            shuffle_rng = random.Random(derive_seed(cfg.seed, self.epoch, global_worker, 3))
            shuffle = wds.shuffle(cfg.shuffle_buffer, cfg.shuffle_buffer, rng=shuffle_rng)
        if cfg.resampled:
            rng = random.Random(derive_seed(cfg.seed, self.epoch, global_worker, 1))
            samples = read_samples(
                iter(lambda: rng.choice(urls), None),  # endless draws with replacement
                owner.counter, worker, max_empty_shards=max(2 * len(urls), 16), lengths=owner.lengths, cache=cache,
            )
            return shuffle(samples) if shuffle else samples
        random.Random(derive_seed(cfg.seed, self.epoch, 2)).shuffle(urls)  # same permutation everywhere
        part = assign_shards(urls, global_worker, global_workers)
        return cycle_passes(part, owner.counter, worker, shuffle, owner.lengths, cache)


def cpu_train_decoder(cfg: DataConfig, num_classes: int | None) -> PilDecoder:
    """data.decode=cpu: PIL and timm's training transform in the workers, timm's FastCollateMixup there too
    when mixup / cutmix is on."""
    transform = pil_side(create_transform(  # PIL images out; batched as uint8, normalised later
        cfg.img_size, is_training=True, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
        color_jitter=cfg.color_jitter or None, auto_augment=cfg.auto_augment, interpolation=cfg.interpolation,
        use_prefetcher=True,
    ))
    if not cfg.mixup_active:
        return PilDecoder(transform, collate_uint8)
    if num_classes is None:
        raise UsageError("DataConfig.num_classes must be set for mixup/cutmix (no _info.json gives it)")
    mixup = FastCollateMixup(
        mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, cutmix_minmax=cfg.cutmix_minmax,
        prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
        label_smoothing=cfg.label_smoothing, num_classes=num_classes,
    )
    return PilDecoder(transform, MixCollate(mixup))


class TrainLoader(LoaderBase):
    """Iterate for one epoch of exactly `batches_per_epoch` batches `(images, targets)`, or
    `(images, targets, keys)` with `with_keys`.

    Each iteration uses `epoch` and then advances it; `set_epoch(e)` chooses the next one (to resume).
    `decoder` (None: `cpu_train_decoder`) decodes and augments; see `decode.Decoder`.
    """

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, device: torch.device | str | None = None,
                 with_keys: bool = False, decoder: Decoder | None = None) -> None:
        shards = resolve_shards(cfg, cfg.train_shards, cfg.train_split, "train_shards")
        super().__init__(cfg, rank, world_size, shards, device)
        self.with_keys = with_keys
        self.batches_per_epoch = cfg.batches_per_epoch or self._derive_batches_per_epoch()
        self.decoder = decoder or cpu_train_decoder(cfg, self.num_classes)
        self.random_erasing = None
        if cfg.re_prob > 0:
            self.random_erasing = RandomErasing(probability=cfg.re_prob, mode=cfg.re_mode, max_count=cfg.re_count,
                                                device=str(self.normalize_step.device))
        self.epoch = 0

    def _derive_batches_per_epoch(self) -> int:
        num_samples = self.shards.num_samples or self.cfg.train_num_samples
        if num_samples is None:
            raise UsageError(
                f"DataConfig.batches_per_epoch is None and no _info.json gives the size of {self.shards.pattern!r}; "
                "set batches_per_epoch or train_num_samples"
            )
        return max(1, num_samples // (self.cfg.batch_size * self.world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch = self.epoch
        self.epoch += 1
        before = self.skip_counts
        batches = self.worker_batches(TrainStream(self, epoch), derive_seed(self.cfg.seed, epoch, self.rank, 4))
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
                yield (images, self.to_device(targets), keys) if self.with_keys else (images, self.to_device(targets))
        finally:
            batches.close()  # stops the workers, also when the caller stops early
        self.log_skips(f"train epoch {epoch}", before)


def build_train_loader(
    cfg: DataConfig, rank: int = 0, world_size: int = 1, device: torch.device | str | None = None,
    with_keys: bool = False,
) -> TrainLoader:
    """The training loader of one rank (see the module docstring for what it yields). With `device`, batches
    arrive there, normalised there (pinned, non-blocking copies of uint8 when it is a GPU). With `with_keys`,
    each batch also carries its samples' keys. With data.decode=gpu, decoding and cropping happen on
    `device` (see gpu_decode)."""
    decoder = None
    if cfg.decode == "gpu":
        from mutransfer.data.gpu_decode import GpuDecoder

        decoder = GpuDecoder(cfg)
    return TrainLoader(cfg, rank, world_size, device, with_keys, decoder)
