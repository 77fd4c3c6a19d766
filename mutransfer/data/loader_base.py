"""What the train and eval loaders share: one rank's shard set, skip counter, decoder and device step, and a
DataLoader iteration that releases and stops its workers however it ends. Rank and world size are given
explicitly; nothing here calls torch.distributed."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from mutransfer.data.config import DataConfig
from mutransfer.data.decode import Decoder
from mutransfer.data.device_step import DeviceNormalize
from mutransfer.data.shards import ShardSet, shards_from_info, shards_from_pattern
from mutransfer.data.skips import SkipCounter
from mutransfer.data.worker_signals import WorkerRelease, stop_workers, worker_error_message
from mutransfer.errors import DataError, UsageError

log = logging.getLogger(__name__)


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")


def resolve_shards(cfg: DataConfig, pattern: str | None, split: str, field: str) -> ShardSet:
    """A split's shards: the explicit pattern, or what `_info.json` in data.shards_dir lists."""
    if pattern is not None:
        return shards_from_pattern(pattern)
    if cfg.shards_dir is None:
        raise UsageError(f"DataConfig: set shards_dir (with {field.split('_')[0]}_split) or {field} to find the shards")
    return shards_from_info(cfg.shards_dir, split)


class LoaderBase:
    """One rank's loader over one shard set; `decoder` turns worker batches into pixels on `device`."""

    decoder: Decoder

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, shards: ShardSet,
                 device: torch.device | str | None) -> None:
        check_rank(rank, world_size)
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.shards = shards
        self.device = torch.device(device) if device is not None else None
        self.num_classes = cfg.num_classes or shards.num_classes
        self.counter = SkipCounter(max(1, cfg.num_workers), shards.urls)
        self.lengths = dict(zip(shards.urls, shards.shard_lengths)) if shards.shard_lengths is not None else None
        self.image_shape = (3, cfg.img_size, cfg.img_size)
        self.normalize_step = DeviceNormalize(cfg.mean, cfg.std, self.device)

    @property
    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far by reason, across all workers and epochs of this loader."""
        return self.counter.totals()

    def normalize(self, images: Any) -> torch.Tensor:
        """A worker batch's images -> contiguous float, normalised, on the loader's device."""
        return self.normalize_step(self.decoder.to_pixels(images, self.device))

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True) if self.device is not None else tensor

    def worker_batches(self, dataset: IterableDataset, seed: int) -> Iterator[Any]:
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

    def log_skips(self, what: str, before: dict[str, int]) -> None:
        after = self.skip_counts
        delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        if delta:
            detail = ", ".join(f"{k}={v}" for k, v in delta.items())
            log.warning("%s on rank %d skipped %d sample(s)/shard(s): %s", what, self.rank, sum(delta.values()), detail)
