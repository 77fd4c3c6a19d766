"""Counting what the data skipped: bad samples by reason and good samples per shard, one row per DataLoader
worker in shared memory, so that the main process reads exact totals (and the eval loader each shard's
coverage) while workers run. Warns about the first skips and then every thousandth."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

SKIP_REASONS = ("corrupt_image", "missing_field", "bad_label", "bad_shard", "unread_samples")
WARN_FIRST = 10
WARN_EVERY = 1000


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
            self._good_view()[slot, index] += 1

    def _good_view(self):
        """`good` as a numpy array over the same shared memory: once per sample, a tensor's indexing costs
        ~30 us, a numpy element's well under 1. Made where it is used (a worker has its own, over the
        memory it shares with the main process), never pickled."""
        view = self.__dict__.get("_good_numpy")
        if view is None:
            view = self._good_numpy = self.good.numpy()
        return view

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_good_numpy", None)
        return state

    def totals(self) -> dict[str, int]:
        return dict(zip(SKIP_REASONS, (int(n) for n in self.counts.sum(0))))

    def good_per_shard(self) -> list[int]:
        return [int(n) for n in self.good.sum(0)[: len(self.shard_index)]]
