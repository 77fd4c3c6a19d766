"""Reading tar shards into raw samples (dicts of bytes keyed by extension, with __key__ and __url__), counting
what could not be read. A damaged tar header does not end its shard: tarfile skips ahead to the next intact
header, so damage costs the samples it covers; samples `_info.json` lists but a shard did not give are
counted as `unread_samples`."""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

from webdataset.tariterators import group_by_keys

from mutransfer.data.partition import ShardAssignment, congruent
from mutransfer.data.sample_cache import SampleCache, sample_bytes
from mutransfer.data.skips import SkipCounter
from mutransfer.data.urls import open_url
from mutransfer.errors import DataError

META_FILE = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, not sample files


def tar_members(stream: Any) -> Iterator[dict[str, Any]]:
    """{fname, data} of each regular file of a tar stream. Unlike webdataset's tar_file_iterator, a damaged
    header does not end the shard there and then without a word: tarfile (ignore_zeros) skips ahead to the
    next intact header, so a damaged region costs only the samples it covers."""
    archive = tarfile.open(fileobj=stream, mode="r|*", ignore_zeros=True)
    for member in archive:
        if member.isreg() and not META_FILE.match(member.name):
            yield {"fname": member.name, "data": archive.extractfile(member).read()}
        archive.members = []  # a stream: keep no index of what was read


def shard_samples(url: str, counter: SkipCounter, slot: int, cache: SampleCache | None = None
                  ) -> Iterator[dict[str, Any]]:
    """Raw samples (dicts of bytes keyed by extension, plus __key__ and __url__) of one shard, from `cache`
    when it holds them (and kept there when this read completes cleanly and they fit). A local shard that fits
    is read whole before its first sample is given, so that loaders reading it in step (a stack's seeds) find
    it kept. A shard that cannot be opened or breaks off (a truncated tar) is counted once as `bad_shard`;
    what was read before the break is kept."""
    kept = cache.shard(url) if cache is not None else None
    if kept is not None:
        yield from (dict(sample) for sample in kept)
        return
    if cache is not None and cache.room_for(local_size(url)):
        read = list(_read_shard(url, counter, slot))
        samples = [sample for sample in read if sample is not None]
        if len(samples) == len(read):  # no problem counted
            cache.keep_shard(url, [dict(sample) for sample in samples])
        yield from samples
        return
    yield from _stream_shard(url, counter, slot, cache)


def local_size(url: str) -> int:
    """The size of a local shard file; a size nothing fits for a pipe or a remote url."""
    try:
        return os.stat(url).st_size
    except (OSError, ValueError):
        return 1 << 62


def _stream_shard(url: str, counter: SkipCounter, slot: int, cache: SampleCache | None) -> Iterator[dict[str, Any]]:
    """`shard_samples` as the tar is read, kept at the end when it was clean and fits."""
    read: list[dict[str, Any]] | None = [] if cache is not None else None
    size = 0
    for sample in _read_shard(url, counter, slot):
        if sample is None:  # a problem was counted: read the shard again next time, and count it again
            read = None
            continue
        if read is not None:
            size += sample_bytes(sample)
            read = read if cache.room_for(size) else None  # too big to keep
        if read is not None:
            read.append(dict(sample))
        yield sample
    if read is not None:
        cache.keep_shard(url, read)


def _read_shard(url: str, counter: SkipCounter, slot: int) -> Iterator[dict[str, Any] | None]:
    """`shard_samples` from the tar itself, with a None after each problem it counted."""
    try:
        stream = open_url(url)
    except Exception as err:
        counter.record(slot, "bad_shard", url, None, f"{type(err).__name__}: {err}")
        yield None
        return
    problems: list[Exception] = []

    def bad_group(err: Exception) -> bool:
        counter.record(slot, "bad_shard", url, None, err)
        problems.append(err)
        return True

    error: Exception | None = None
    try:
        files = ({**entry, "__url__": url} for entry in tar_members(stream))
        yield from group_by_keys(files, handler=bad_group)
        if problems:
            yield None
    except Exception as err:
        error = err
    finally:
        try:
            stream.close()  # a pipe: command's exit status is checked here
        except Exception as err:
            error = error or err
    if error is not None:
        counter.record(slot, "bad_shard", url, None, f"{type(error).__name__}: {error}")
        yield None


def read_samples(
    urls: Iterable[str],
    counter: SkipCounter,
    slot: int,
    stride: int = 1,
    offset: int = 0,
    max_empty_shards: int | None = None,
    lengths: dict[str, int] | None = None,
    cache: SampleCache | None = None,
) -> Iterator[dict[str, Any]]:
    """Raw samples of each shard in turn (through `cache` when given), keeping sample i (counted over all shards read) when
    i % stride == offset.

    A shard that gives fewer samples than `lengths` (from `_info.json`) says it holds counts this worker's
    share of the difference as `unread_samples`, naming the shard. After `max_empty_shards` shards in a row
    without a sample, raise DataError: the shard set is unusable and an endless resampling loop would hang.
    """
    position = 0  # samples read so far, over all shards
    empty_in_a_row = 0
    for url in urls:
        read = 0
        for sample in shard_samples(url, counter, slot, cache):
            if (position + read) % stride == offset:
                yield sample
            read += 1
        expected = lengths.get(url) if lengths else None
        if expected is not None and read < expected:
            lost = congruent(position + read, position + expected, stride, offset)
            if lost:
                counter.record(slot, "unread_samples", url, None,
                               f"{expected - read} of its {expected} samples (per _info.json) could not be read",
                               amount=lost)
        position += read
        empty_in_a_row = 0 if read else empty_in_a_row + 1
        if max_empty_shards is not None and empty_in_a_row >= max_empty_shards:
            raise DataError(f"{empty_in_a_row} shards in a row gave no sample (last: {url}); are they tar files?")


def cycle_passes(part: ShardAssignment, counter: SkipCounter, slot: int, shuffle: Any = None,
                  lengths: dict[str, int] | None = None, cache: SampleCache | None = None
                  ) -> Iterator[dict[str, Any]]:
    """A worker's part of the shards, read again and again until its batch quota is met (with unequal
    shard sizes, the worker with less data re-reads its own shards rather than leave its rank short).

    The shuffle buffer is drained at the end of every pass: shuffling across the pass boundary would let
    samples of the next pass out before the last ones of this pass, and an epoch that fits in one pass
    would see some samples twice and miss others."""
    while True:
        produced = False
        one_pass = read_samples(part.urls, counter, slot, part.stride, part.offset, lengths=lengths, cache=cache)
        for sample in shuffle(one_pass) if shuffle else one_pass:
            produced = True
            yield sample
        if not produced:
            more = f" and {len(part.urls) - 1} more" if len(part.urls) > 1 else ""
            raise DataError(f"no sample could be read from shard {part.urls[0]}{more}; are they tar files?")
