"""The evaluation loader of one rank: every sample is read exactly once across ranks x workers (see
`partition`). Batches are `EvalBatch(images, targets, valid, keys)`, always `eval_batch_size` rows: rows past
the end of a worker's data are padding with `valid=False`, target -100 (cross_entropy's default
ignore_index) and key ''. When `_info.json` gives shard lengths, every rank yields the same number of batches
(`len(loader)`), adding all-padding batches as needed, so ranks that must step together (ZeRO-3 gathers
parameters in every forward) never wait on one another."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence

import torch
import webdataset as wds
from timm.data import create_transform
from torch.utils.data import IterableDataset

from mutransfer.data.collate import EvalBatch, PadEval, empty_eval_batch
from mutransfer.data.config import DataConfig
from mutransfer.data.decode import PilDecoder, decode_samples, pil_side
from mutransfer.data.loader_base import LoaderBase, resolve_shards
from mutransfer.data.partition import assign_shards, assigned_samples, derive_seed, worker_slot
from mutransfer.data.sample_cache import process_cache
from mutransfer.data.shards import ShardSet
from mutransfer.data.tars import read_samples

log = logging.getLogger(__name__)


class EvalStream(IterableDataset):
    def __init__(self, loader: EvalLoader) -> None:
        super().__init__()
        self.loader = loader

    def __iter__(self) -> Iterator[EvalBatch]:
        owner = self.loader
        worker, workers = worker_slot()
        part = assign_shards(list(owner.shards.urls), owner.rank * workers + worker, owner.world_size * workers)
        cache = process_cache(owner.cfg.cache_mb)
        samples = read_samples(part.urls, owner.counter, worker, part.stride, part.offset, lengths=owner.lengths,
                               cache=cache)
        items = decode_samples(samples, owner.decoder, owner.counter, worker, owner.num_classes, cache=cache)
        yield from wds.batched(owner.batch_size, collation_fn=owner.decoder.collate, partial=True)(items)


class EvalLoader(LoaderBase):
    """Iterate over `EvalBatch`es covering each eval sample exactly once across all ranks.

    `num_batches` (and len()) is the same on every rank when `_info.json` gives the shard lengths; it is
    None otherwise, and then ranks may yield different numbers of batches. Evaluation decodes with PIL.
    """

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, device: torch.device | str | None = None) -> None:
        shards = resolve_shards(cfg, cfg.eval_shards, cfg.eval_split, "eval_shards")
        super().__init__(cfg, rank, world_size, shards, device)
        self.batch_size = cfg.eval_batch_size or cfg.batch_size
        transform = pil_side(create_transform(
            cfg.img_size,
            is_training=False,
            interpolation="bicubic" if cfg.interpolation == "random" else cfg.interpolation,
            crop_pct=cfg.crop_pct,
            use_prefetcher=True,
        ))
        self.decoder = PilDecoder(transform, PadEval(self.batch_size))
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
        return EvalBatch(self.normalize(batch.images), self.to_device(batch.targets), self.to_device(batch.valid),
                         batch.keys)

    def good_per_shard(self) -> list[int]:
        """Samples of each shard (in `shards.urls` order) this rank has yielded as valid rows so far."""
        return self.counter.good_per_shard()

    def __iter__(self) -> Iterator[EvalBatch]:
        before = self.skip_counts
        count = 0
        batches = self.worker_batches(EvalStream(self), derive_seed(self.cfg.seed, self.rank, 5))
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
        self.log_skips("evaluation", before)


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


def build_eval_loader(
    cfg: DataConfig, rank: int = 0, world_size: int = 1, device: torch.device | str | None = None
) -> EvalLoader:
    """The evaluation loader of one rank (see the module docstring for what it yields)."""
    return EvalLoader(cfg, rank, world_size, device)
