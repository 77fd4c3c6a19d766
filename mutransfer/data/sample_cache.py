"""Shards kept in memory for the rest of the process (data.cache_mb): a sweep trains many trials of one proxy
study on the same small shards, and each trial's loaders would otherwise read and decode every shard again.

Only a process that iterates its loaders itself (data.num_workers=0, as proxy studies and stacks run) keeps
a cache: loader workers start anew for every pass, and a cache in one would die with it.

What is kept: a shard's raw samples once it has been read whole with nothing wrong (a local shard that fits is
read whole when first opened, so that a stack's loaders, which read in step, parse it once; a shard that broke off,
could not be opened or had a damaged entry is read again every time, so that its problems are counted every
time), and each image as PIL decoded it (RGB; the transforms make new images and never change it). Both count
against one bound, the largest data.cache_mb of the loaders that used it; once it is reached nothing more is
kept, and nothing is evicted. A loader gets the same samples in the same order either way, so a trial's data
does not depend on what ran before it in the process. A local shard is known by its path, size and
modification time, so a shard rewritten in place is read again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from PIL import Image
from torch.utils.data import get_worker_info

MiB = 2**20


def sample_bytes(sample: dict[str, Any]) -> int:
    return sum(len(value) for value in sample.values() if isinstance(value, bytes))


def image_bytes(image: Image.Image) -> int:
    return image.width * image.height * len(image.getbands())


def shard_version(url: str) -> tuple:
    """What tells two reads of `url` apart: a local file's size and modification time."""
    try:
        stat = os.stat(url)
    except (OSError, ValueError):  # a pipe: or remote url
        return (url,)
    return (url, stat.st_size, stat.st_mtime_ns)


class SampleCache:
    """Raw samples by shard and decoded images by (shard, key, field), within `limit` bytes in all."""

    def __init__(self) -> None:
        self.limit = 0
        self.used = 0
        self.shards: dict[tuple, list[dict[str, Any]]] = {}
        self.images: dict[tuple, Image.Image] = {}
        self.versions: dict[str, tuple] = {}  # each shard's version when it was last opened (`shard`)
        self.hits = 0  # shards and images served from memory

    def room_for(self, size: int) -> bool:
        return self.used + size <= self.limit

    def shard(self, url: str) -> list[dict[str, Any]] | None:
        """The kept samples of `url`, or None. Called as a shard is opened: its version is read here, once per
        opening, and its images are known by it until it is opened again."""
        version = self.versions[url] = shard_version(url)
        samples = self.shards.get(version)
        if samples is not None:
            self.hits += 1
        return samples

    def keep_shard(self, url: str, samples: list[dict[str, Any]]) -> None:
        size = sum(sample_bytes(sample) for sample in samples)
        if self.room_for(size):
            self.shards[shard_version(url)] = samples
            self.used += size

    def image(self, url: str | None, key: str | None, field: str, decode: Callable[[], Image.Image]) -> Image.Image:
        """The decoded image of sample `key` of `url`, decoded by `decode` the first time (its errors pass)."""
        index = (self.versions.get(url) or shard_version(url or ""), key, field)
        image = self.images.get(index)
        if image is not None:
            self.hits += 1
            return image
        image = decode()
        size = image_bytes(image)
        if url is not None and key is not None and self.room_for(size):
            self.images[index] = image
            self.used += size
        return image

    def clear(self) -> None:
        self.shards.clear()
        self.images.clear()
        self.versions.clear()
        self.used = self.hits = 0


PROCESS_CACHE = SampleCache()


def process_cache(cache_mb: int) -> SampleCache | None:
    """The process's cache, bound raised to `cache_mb` MiB, for a loader iterated here; None in a loader worker
    or when `cache_mb` is 0."""
    if cache_mb <= 0 or get_worker_info() is not None:
        return None
    PROCESS_CACHE.limit = max(PROCESS_CACHE.limit, cache_mb * MiB)
    return PROCESS_CACHE
