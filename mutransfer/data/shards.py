"""Finding shards: the shard set of a split from `_info.json` or from a brace pattern, checked to exist."""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass

from webdataset.shardlists import expand_urls

from mutransfer.data.info import MissingData, read_info, shard_pattern
from mutransfer.data.urls import fsspec_knows, scheme_of, url_dirname, url_join
from mutransfer.errors import DataError

log = logging.getLogger(__name__)


def check_shards_exist(pattern: str, urls: list[str]) -> None:
    """Fail at once, naming the pattern, when shards are missing. Local shards are all checked; for an
    fsspec URL the first shard is; `pipe:` and curl-style URLs can only fail when read."""
    scheme = scheme_of(urls[0])
    if scheme in ("", "file"):
        paths = [u[len("file://") :] if scheme == "file" else u for u in urls]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise MissingData(f"shard set {pattern!r}: {len(missing)} of {len(urls)} shards missing: {missing[0]}{more}")
    elif scheme != "pipe" and fsspec_knows(scheme):
        import fsspec

        fs, path = fsspec.core.url_to_fs(urls[0])
        if not fs.exists(path):
            raise MissingData(f"shard set {pattern!r}: first shard {urls[0]} does not exist")


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split, in order, with their sample counts when an `_info.json` gives them."""

    pattern: str
    urls: tuple[str, ...]
    shard_lengths: tuple[int, ...] | None = None
    num_classes: int | None = None

    @property
    def num_samples(self) -> int | None:
        return sum(self.shard_lengths) if self.shard_lengths is not None else None


def shards_from_info(shards_dir: str, split: str) -> ShardSet:
    """The shards `_info.json` in `shards_dir` lists for `split`."""
    info = read_info(shards_dir)
    try:
        split_info = info.split(split, where=url_join(shards_dir, "_info.json"))
    except ValueError as err:
        raise DataError(str(err)) from err
    if not split_info.filenames:
        raise DataError(f"split {split!r} of {shards_dir} lists no shards")
    urls = [url_join(shards_dir, f) for f in split_info.filenames]
    pattern = url_join(shards_dir, shard_pattern(split, len(urls)))
    check_shards_exist(pattern, urls)
    return ShardSet(pattern, tuple(urls), tuple(split_info.shard_lengths), split_info.num_classes)


def shards_from_pattern(pattern: str) -> ShardSet:
    """Expand a brace pattern ('::' joins several). Sample counts come from an `_info.json` beside the
    shards when it lists every one of them (as timm does); otherwise they stay unknown."""
    urls = expand_urls(pattern)
    if not urls or not all(urls):
        raise DataError(f"shard pattern {pattern!r} names no shards")
    check_shards_exist(pattern, urls)
    lengths, num_classes = _lengths_from_neighbour_info(urls)
    return ShardSet(pattern, tuple(urls), lengths, num_classes)


def _lengths_from_neighbour_info(urls: list[str]) -> tuple[tuple[int, ...] | None, int | None]:
    if scheme_of(urls[0]) == "pipe":
        return None, None
    folder = url_dirname(urls[0])
    try:
        info = read_info(folder or ".")
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as err:
        log.warning("ignoring the shard index in %s: %s", folder, err)
        return None, None
    lengths: dict[str, int] = {}
    classes: set[int | None] = set()
    for split in info.splits.values():
        lengths.update(zip(split.filenames, split.shard_lengths))
        classes.add(split.num_classes)
    names = [posixpath.basename(u) for u in urls]
    if not all(n in lengths for n in names):
        return None, None
    num_classes = classes.pop() if len(classes) == 1 else None
    return tuple(lengths[n] for n in names), num_classes
