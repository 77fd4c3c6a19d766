"""Write a source of images into webdataset tar shards in timm's layout, plus `_info.json`.

Every sample is `<key>.cls` (label as text), `<key>.jpg` and `<key>.json` (where it came from). The same
input gives the same bytes: samples keep the source's sorted order, shard i holds items
[i * samples_per_shard, (i + 1) * samples_per_shard), and tar headers carry a fixed mtime, owner and mode.
JPEG sources pass through byte for byte unless they are resized; anything else is encoded as JPEG.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mutransfer.data import synthetic
from mutransfer.data.info import INFO_FILENAME, DatasetInfo, SplitInfo, read_info, shard_filename, write_info
from mutransfer.data.sources import ImageSource, RawSample, SyntheticSource
from mutransfer.errors import UsageError

log = logging.getLogger(__name__)

# Fixed tar header fields, so that the bytes depend on the content only.
TAR_MTIME = 0
TAR_OWNER = "mutransfer"
DEFAULT_QUALITY = 90


class UndecodableImage(Exception):
    """An image the writer could not decode; it is skipped and reported by origin."""


@dataclass
class ShardResult:
    filename: str
    length: int
    skipped: list[tuple[str, str]]  # (origin, reason)


@dataclass
class WriteSummary:
    """What one `write_shards` call wrote."""

    out_dir: str
    split: str
    filenames: list[str]
    shard_lengths: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    info_path: str = ""

    @property
    def num_samples(self) -> int:
        return sum(self.shard_lengths)

    def describe(self) -> str:
        text = (
            f"wrote {self.num_samples} samples of split {self.split!r} into {len(self.filenames)} shards "
            f"in {self.out_dir} (index: {self.info_path})"
        )
        if self.skipped:
            text += f"; skipped {len(self.skipped)} undecodable image(s), each named above"
        return text


def sample_key(split: str, index: int) -> str:
    # no dots: webdataset splits a member name at its first dot into key and extension
    return f"{split}-{index:09d}"


def encode_image(image: bytes | np.ndarray, resize_short: int | None, quality: int) -> bytes:
    """JPEG bytes for an image given as encoded bytes or an RGB uint8 array. Raises UndecodableImage."""
    if isinstance(image, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(image)) as opened:
                opened.load()  # a full decode: truncated or garbled files fail here, not in training
                if opened.format == "JPEG" and (not resize_short or min(opened.size) <= resize_short):
                    return bytes(image)
                pil = opened.copy()
        except Exception as err:  # PIL raises many types for bad data
            raise UndecodableImage(f"{type(err).__name__}: {err}") from err
    else:
        pil = Image.fromarray(image)
    if pil.mode != "RGB":
        pil = pil.convert("RGB")
    if resize_short and min(pil.size) > resize_short:
        scale = resize_short / min(pil.size)
        size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
        pil = pil.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    pil.save(out, format="JPEG", quality=quality)
    return out.getvalue()


@dataclass(frozen=True)
class _ShardJob:
    out_dir: str
    split: str
    resize_short: int | None
    quality: int
    samples_per_shard: int
    total: int


def _write_one_shard(
    source: ImageSource, job: _ShardJob, shard_index: int, on_item: Callable[[], None] | None = None
) -> ShardResult:
    filename = shard_filename(job.split, shard_index)
    path = os.path.join(job.out_dir, filename)
    partial = path + ".partial"  # renamed when complete, so a crash never leaves a plausible shard
    start = shard_index * job.samples_per_shard
    stop = min(start + job.samples_per_shard, job.total)
    skipped: list[tuple[str, str]] = []
    length = 0
    try:
        with wds.TarWriter(partial, user=TAR_OWNER, group=TAR_OWNER, encoder=False, mtime=TAR_MTIME) as sink:
            for index in range(start, stop):
                origin = f"item {index}"
                try:
                    raw: RawSample = source.load(index)
                    origin = raw.origin
                    if raw.label is None or raw.label < 0:
                        raise UndecodableImage(f"no label ({raw.label!r})")
                    jpeg = encode_image(raw.image, job.resize_short, job.quality)
                except (UndecodableImage, OSError) as err:
                    skipped.append((origin, str(err)))
                else:
                    meta = json.dumps(raw.meta, sort_keys=True).encode()
                    key = sample_key(job.split, index)
                    sink.write({"__key__": key, "cls": str(raw.label).encode(), "jpg": jpeg, "json": meta})
                    length += 1
                if on_item is not None:
                    on_item()
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return ShardResult(filename, length, skipped)


# Pool workers receive the source once, through the initializer, rather than with every shard.
_worker_source: ImageSource | None = None


def _init_worker(source: ImageSource) -> None:
    global _worker_source
    _worker_source = source


def _write_shard_in_worker(args: tuple[_ShardJob, int]) -> ShardResult:
    assert _worker_source is not None
    return _write_one_shard(_worker_source, *args)


def _check_out_dir(out_dir: str, split: str, force: bool) -> DatasetInfo:
    """Decide whether `split` may be written into `out_dir`; return the index to merge into.

    An empty (or missing) folder is fine. A folder that holds only `_info.json` and the shards it lists for
    *other* splits is fine too, so train and validation can be written by two commands. Anything else (a
    file we did not write, or this split already there) needs `force`; with `force` the split's old shards
    are replaced and unknown files are left alone.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"--out {out_dir} exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    entries = set(os.listdir(out_dir))
    info = DatasetInfo()
    if INFO_FILENAME in entries:
        try:
            info = read_info(out_dir)
        except ValueError as err:
            if not force:
                raise FileExistsError(f"{out_dir} holds an unreadable {INFO_FILENAME} ({err}); pass --force to replace it") from err
            info = DatasetInfo()
    if force:
        for stale in info.splits.get(split, SplitInfo(split, [], [])).filenames:
            stale_path = os.path.join(out_dir, stale)
            if os.path.isfile(stale_path):
                os.remove(stale_path)
        return info
    if split in info.splits:
        raise FileExistsError(
            f"split {split!r} already exists in {os.path.join(out_dir, INFO_FILENAME)}; pass --force to replace it"
        )
    ours = {INFO_FILENAME} | {f for s in info.splits.values() for f in s.filenames}
    foreign = sorted(entries - ours)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise FileExistsError(
            f"{out_dir} is not empty ({foreign[0]}{more} is not a shard of another split in its "
            f"{INFO_FILENAME}); pass --force to write into it anyway"
        )
    return info


def write_shards(
    source: ImageSource,
    out_dir: str,
    split: str,
    samples_per_shard: int = 1000,
    *,
    resize_short: int | None = None,
    quality: int = DEFAULT_QUALITY,
    workers: int = 1,
    force: bool = False,
    progress: bool = True,
    dataset_name: str | None = None,
) -> WriteSummary:
    """Write `source` as shards `{split}-000000.tar`, ... into `out_dir` and record them in `_info.json`.

    Undecodable images are skipped, reported by origin and counted in the summary. Refuses (FileExistsError)
    to write into a folder holding anything but other splits' shards unless `force`. `workers` processes
    write whole shards in parallel; the output does not depend on their number.
    """
    _check_write_args(split, samples_per_shard, resize_short, quality, workers)
    total = len(source)
    if total == 0:
        raise UsageError("the source has no images")
    info = _check_out_dir(out_dir, split, force)

    job = _ShardJob(out_dir, split, resize_short, quality, samples_per_shard, total)
    num_shards = -(-total // samples_per_shard)
    results: list[ShardResult] = []
    with tqdm(total=total, desc=f"writing {split}", unit="img", disable=not progress, file=sys.stderr) as bar:
        for result in _run_shards(source, job, num_shards, workers, bar):
            for origin, reason in result.skipped:
                log.warning("skipped undecodable image %s: %s", origin, reason)
            results.append(result)
    if not any(r.length for r in results):
        for r in results:
            os.remove(os.path.join(out_dir, r.filename))
        raise UsageError(f"none of the {total} images could be decoded; nothing was written")

    info.name = info.name or dataset_name or getattr(source, "name", "") or os.path.basename(os.path.abspath(out_dir))
    filenames, lengths = [r.filename for r in results], [r.length for r in results]
    info.splits[split] = SplitInfo(name=split, filenames=filenames, shard_lengths=lengths,
                                   num_classes=source.num_classes, class_names=source.class_names)
    return WriteSummary(out_dir=out_dir, split=split, filenames=filenames, shard_lengths=lengths,
                        skipped=[s for r in results for s in r.skipped], info_path=write_info(out_dir, info))


def _check_write_args(split: str, samples_per_shard: int, resize_short: int | None, quality: int, workers: int) -> None:
    from mutransfer.data.config import SPLIT_NAME

    if not SPLIT_NAME.match(split):
        raise UsageError(f"split {split!r} must be letters, digits, '_' or '-'")
    if samples_per_shard < 1:
        raise UsageError(f"samples_per_shard={samples_per_shard} must be >= 1")
    if resize_short is not None and resize_short < 1:
        raise UsageError(f"resize_short={resize_short} must be >= 1")
    if not 1 <= quality <= 100:
        raise UsageError(f"quality={quality} must be between 1 and 100")
    if workers < 1:
        raise UsageError(f"workers={workers} must be >= 1")


def _run_shards(source: ImageSource, job: _ShardJob, num_shards: int, workers: int, bar: tqdm) -> Iterator[ShardResult]:
    if workers == 1 or num_shards == 1:
        for shard_index in range(num_shards):
            yield _write_one_shard(source, job, shard_index, on_item=lambda: bar.update(1))
        return
    # fork shares an opened source (a memory-mapped dataset) without pickling it, where the platform has it
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    context = multiprocessing.get_context(method)
    with context.Pool(min(workers, num_shards), initializer=_init_worker, initargs=(source,)) as pool:
        for result in pool.imap(_write_shard_in_worker, [(job, i) for i in range(num_shards)]):
            bar.update(result.length + len(result.skipped))
            yield result


def write_synthetic_shards(
    out_dir: str,
    split: str,
    classes: int,
    samples: int,
    image_size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 1000,
    *,
    quality: int = DEFAULT_QUALITY,
    workers: int = 1,
    force: bool = False,
    progress: bool = False,
) -> WriteSummary:
    """Write `samples` synthetic images of `classes` classes (see `mutransfer.data.synthetic`).

    Image i of a split is a pure function of (seed, split, i), so train and validation written with the
    same seed are independent draws from the same distribution.
    """
    spec = synthetic.SyntheticSpec(classes=classes, image_size=image_size, seed=seed, split=split)
    source = SyntheticSource(spec, samples)
    return write_shards(
        source,
        out_dir,
        split,
        samples_per_shard,
        quality=quality,
        workers=workers,
        force=force,
        progress=progress,
        dataset_name=source.name,
    )
