"""`_info.json`: the index beside a shard set, in timm's layout (as in the public imagenet-1k webdataset).

    {"name": "imagenet-1k",
     "splits": {"train": {"name": "train", "num_samples": 1281167,
                          "filenames": ["imagenet1k-train-0000.tar", ...], "shard_lengths": [1251, ...]}}}

timm reads `name`, `num_samples`, `filenames` and `shard_lengths` of a split. We add `num_classes` and
`class_names` when the writer knows them; readers that do not know those keys ignore them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from mutransfer.data.urls import open_url
from mutransfer.errors import DataError

__all__ = ["INFO_FILENAME", "DataError", "DatasetInfo", "MissingData", "SplitInfo", "info_location", "read_info",
           "shard_filename", "shard_pattern", "write_info"]

INFO_FILENAME = "_info.json"


class MissingData(DataError, FileNotFoundError):
    """A shard index or shard that should be there is not."""


@dataclass
class SplitInfo:
    """One split: its shard files (relative to the info file's folder) and the samples in each."""

    name: str
    filenames: list[str]
    shard_lengths: list[int]
    num_classes: int | None = None
    class_names: list[str] | None = None

    @property
    def num_samples(self) -> int:
        return sum(self.shard_lengths)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "num_samples": self.num_samples,
            "filenames": list(self.filenames),
            "shard_lengths": list(self.shard_lengths),
        }
        if self.num_classes is not None:
            out["num_classes"] = self.num_classes
        if self.class_names is not None:
            out["class_names"] = list(self.class_names)
        return out

    @classmethod
    def from_json(cls, split: str, raw: dict[str, Any], where: str) -> SplitInfo:
        try:
            filenames = [str(f) for f in raw["filenames"]]
            lengths = [int(n) for n in raw.get("shard_lengths") or []]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: split {split!r} needs 'filenames' and 'shard_lengths' lists ({err})") from err
        if len(lengths) != len(filenames):
            raise ValueError(
                f"{where}: split {split!r} lists {len(filenames)} filenames but {len(lengths)} shard_lengths"
            )
        if "num_samples" in raw and int(raw["num_samples"]) != sum(lengths):
            raise ValueError(
                f"{where}: split {split!r} says num_samples={raw['num_samples']} but its shard_lengths sum to "
                f"{sum(lengths)}"
            )
        num_classes = raw.get("num_classes")
        class_names = raw.get("class_names")
        return cls(
            name=str(raw.get("name", split)),
            filenames=filenames,
            shard_lengths=lengths,
            num_classes=int(num_classes) if num_classes is not None else None,
            class_names=[str(c) for c in class_names] if class_names is not None else None,
        )


@dataclass
class DatasetInfo:
    """The whole `_info.json`: a dataset name and its splits. Unknown top-level keys are kept on rewrite."""

    name: str = ""
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str, where: str = INFO_FILENAME) -> SplitInfo:
        if name not in self.splits:
            known = ", ".join(sorted(self.splits)) or "none"
            raise ValueError(f"split {name!r} is not in {where} (its splits: {known})")
        return self.splits[name]

    def to_json(self) -> dict[str, Any]:
        return {**self.extra, "name": self.name, "splits": {k: v.to_json() for k, v in sorted(self.splits.items())}}

    @classmethod
    def from_json(cls, raw: Any, where: str) -> DatasetInfo:
        if not isinstance(raw, dict) or not isinstance(raw.get("splits"), dict):
            raise ValueError(f"{where}: not a shard index (expected an object with a 'splits' mapping)")
        splits = {name: SplitInfo.from_json(name, body, where) for name, body in raw["splits"].items()}
        extra = {k: v for k, v in raw.items() if k not in ("name", "splits")}
        return cls(name=str(raw.get("name", "")), splits=splits, extra=extra)


def info_location(location: str) -> str:
    """The `_info.json` path or URL for a shard folder (or the file itself when given)."""
    if location.endswith(".json"):
        return location
    return location.rstrip("/") + "/" + INFO_FILENAME


def read_info(location: str | os.PathLike[str]) -> DatasetInfo:
    """Read `_info.json` from a shard folder, a URL prefix, or the file's own path.

    Raises FileNotFoundError naming the path when there is none, ValueError when it is malformed.
    """
    where = info_location(os.fspath(location))
    try:
        with open_url(where) as stream:
            raw = json.loads(stream.read())
    except FileNotFoundError as err:
        raise MissingData(_no_index(os.fspath(location), where)) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{where} is not valid JSON: {err}") from err
    try:
        return DatasetInfo.from_json(raw, where)
    except ValueError as err:
        raise DataError(str(err)) from err


def _no_index(location: str, where: str) -> str:
    """Why there is no index: an empty folder, a folder of tars without one, or nothing at all."""
    if os.path.isdir(location):
        entries = os.listdir(location)
        if not entries:
            return f"shard folder {location} is empty: no {INFO_FILENAME} and no shards"
        tars = sum(name.endswith(".tar") for name in entries)
        return (f"shard folder {location} has no {INFO_FILENAME} ({tars} .tar file(s) beside it); write shards "
                f"with `mutransfer shards write`, or name them with data.train_shards / data.eval_shards")
    return f"no shard index at {where}"


def write_info(folder: str | os.PathLike[str], info: DatasetInfo) -> str:
    """Write `_info.json` atomically (a reader never sees half a file). Returns its path."""
    path = os.path.join(os.fspath(folder), INFO_FILENAME)
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(info.to_json(), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def shard_filename(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def shard_pattern(split: str, num_shards: int) -> str:
    """The brace pattern that names a split's shards, e.g. 'train-{000000..000127}.tar'."""
    if num_shards == 1:
        return shard_filename(split, 0)
    return f"{split}-{{{0:06d}..{num_shards - 1:06d}}}.tar"
