"""Who reads what: each DataLoader worker of each rank is one "global worker" g = rank * W + worker of
G = world_size * W; evaluation deals shards (or, with fewer shards than workers, samples) out to them so that
every sample is read exactly once, and seeds are derived from (seed, epoch, rank, worker)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from torch.utils.data import get_worker_info


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from several integers (seed, epoch, rank, ...), stable across processes."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def worker_slot() -> tuple[int, int]:
    """(this DataLoader worker's id, the number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ShardAssignment(NamedTuple):
    """What one global worker reads."""

    urls: list[str]
    stride: int  # keep sample i (counted over `urls` in order) when i % stride == offset
    offset: int


def assign_shards(urls: list[str], worker: int, workers: int) -> ShardAssignment:
    """What global worker `worker` of `workers` reads so that all of them together read each sample once."""
    if len(urls) >= workers:
        return ShardAssignment(urls[worker::workers], 1, 0)
    return ShardAssignment(urls, workers, worker)


def assigned_samples(shard_lengths: list[int] | tuple[int, ...], worker: int, workers: int) -> int:
    """How many samples `assign_shards` gives global worker `worker`."""
    if len(shard_lengths) >= workers:
        return sum(shard_lengths[worker::workers])
    return max(0, -(-(sum(shard_lengths) - worker) // workers))


def congruent(low: int, high: int, stride: int, offset: int) -> int:
    """How many i in [low, high) have i % stride == offset."""
    return max(0, (high - 1 - offset) // stride - (low - 1 - offset) // stride)
