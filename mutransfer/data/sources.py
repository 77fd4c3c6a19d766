"""Where images come from when writing shards: an ImageFolder tree, a Hugging Face dataset, or the
synthetic generator. Each source is an indexable, picklable list of (image, label) with a name for every
item, so writer processes can load their own slice."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mutransfer.data import synthetic
from mutransfer.errors import UsageError


@dataclass
class RawSample:
    """One source item before encoding: encoded image bytes or an RGB array, its label, where it came from
    (named in error reports) and metadata for the sample's `json` entry."""

    image: bytes | np.ndarray
    label: int | None
    origin: str
    meta: dict[str, Any] = field(default_factory=dict)


class ImageSource(Protocol):
    name: str
    num_classes: int | None
    class_names: list[str] | None

    def __len__(self) -> int: ...

    def load(self, index: int) -> RawSample:
        """Item `index`; raises OSError when its bytes cannot be read."""
        ...


def image_extensions() -> set[str]:
    from timm.data.readers.img_extensions import get_img_extensions

    return {e.lower() for e in get_img_extensions(as_set=True)}


class ImageFolderSource:
    """`root/<class>/**/<image>`: classes are the sorted sub-folder names (label = position, as in
    torchvision's ImageFolder), images are sorted by path. Files with non-image extensions are counted in
    `ignored`, not read."""

    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
        self.root = root
        self.name = os.path.basename(os.path.normpath(root))
        self.class_names = sorted(
            d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
        )
        if not self.class_names:
            raise UsageError(f"image folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
        self.num_classes = len(self.class_names)
        extensions = image_extensions()
        self.files: list[tuple[str, int]] = []
        self.ignored: list[str] = []
        for label, class_name in enumerate(self.class_names):
            for folder, dirs, names in os.walk(os.path.join(root, class_name)):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for filename in sorted(names):
                    if filename.startswith("."):
                        continue
                    relpath = os.path.relpath(os.path.join(folder, filename), root)
                    if os.path.splitext(filename)[1].lower() in extensions:
                        self.files.append((relpath, label))
                    else:
                        self.ignored.append(relpath)
        if not self.files:
            raise UsageError(f"image folder {root} has class folders but no images in them")

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> RawSample:
        relpath, label = self.files[index]
        path = os.path.join(self.root, relpath)
        with open(path, "rb") as f:
            data = f.read()
        meta = {"filename": relpath.replace(os.sep, "/"), "label": label, "class_name": self.class_names[label]}
        return RawSample(data, label, path, meta)


class HFSource:
    """A Hugging Face dataset on disk, read offline: a `save_to_disk` folder (Dataset or DatasetDict), a
    parquet file or folder of them, or a folder for the `imagefolder` builder. The image column is the
    first `Image` feature and the label the first `ClassLabel` (or an integer column named label/labels/
    cls/target) unless named."""

    LABEL_NAMES = ("label", "labels", "cls", "target")

    def __init__(
        self,
        path: str,
        split: str = "train",
        image_column: str | None = None,
        label_column: str | None = None,
    ) -> None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"Hugging Face dataset path {path} does not exist")
        self.path = path
        self.split = split
        self.name = os.path.basename(os.path.normpath(path))
        self._cache_dir: str | None = None
        dataset = self._open()
        features = dataset.features
        self.image_column = image_column or self._find_image_column(features)
        self.label_column = label_column or self._find_label_column(features)
        for column in (self.image_column, self.label_column):
            if column not in features:
                raise UsageError(f"{path}: no column {column!r} (columns: {', '.join(features)})")
        self._ds: Any = self._prepare(dataset)
        import datasets

        label_feature = features[self.label_column]
        if isinstance(label_feature, datasets.ClassLabel):
            self.class_names: list[str] | None = list(label_feature.names)
            self.num_classes: int | None = label_feature.num_classes
        else:
            labels = [x for x in dataset[self.label_column] if x is not None]
            self.class_names = None
            self.num_classes = max(labels) + 1 if labels else None

    def _dataset(self) -> Any:
        if self._ds is None:
            self._ds = self._prepare(self._open())
        return self._ds

    def _prepare(self, dataset: Any) -> Any:
        import datasets

        dataset = dataset.select_columns([self.image_column, self.label_column])
        if isinstance(dataset.features[self.image_column], datasets.Image):
            # read the stored bytes, not a decoded PIL image: JPEGs then pass through unchanged
            dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        return dataset

    def _open(self) -> Any:
        os.environ["HF_DATASETS_OFFLINE"] = "1"  # never reach for the network
        os.environ["HF_HUB_OFFLINE"] = "1"
        import datasets

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True  # if imported earlier

        path = self.path
        if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
            loaded = datasets.load_from_disk(path)
        else:
            if self._cache_dir is None:  # the builders cache arrow files; keep them out of ~/.cache
                self._cache_dir = tempfile.mkdtemp(prefix="mutransfer-hf-")
            if path.endswith(".parquet") or glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True):
                files = [path] if path.endswith(".parquet") else sorted(
                    glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)
                )
                loaded = datasets.load_dataset("parquet", data_files=files, cache_dir=self._cache_dir)
            elif os.path.isdir(path):
                loaded = datasets.load_dataset("imagefolder", data_dir=path, cache_dir=self._cache_dir)
            else:
                raise UsageError(f"{path} is neither a saved dataset, a parquet file nor a folder")
        if isinstance(loaded, datasets.DatasetDict):
            loaded = self._pick_split(loaded)
        return loaded

    def _pick_split(self, splits: Any) -> Any:
        if self.split in splits:
            return splits[self.split]
        if len(splits) == 1:
            return next(iter(splits.values()))
        raise UsageError(f"{self.path} has splits {', '.join(splits)}; choose one with --hf-split")

    def _find_image_column(self, features: Any) -> str:
        import datasets

        for name, feature in features.items():
            if isinstance(feature, datasets.Image):
                return name
        raise UsageError(f"{self.path}: no Image column (columns: {', '.join(features)}); name it with --image-column")

    def _find_label_column(self, features: Any) -> str:
        import datasets

        for name, feature in features.items():
            if isinstance(feature, datasets.ClassLabel):
                return name
        for name in self.LABEL_NAMES:
            if name in features and str(getattr(features[name], "dtype", "")).startswith(("int", "uint")):
                return name
        raise UsageError(f"{self.path}: no label column (columns: {', '.join(features)}); name it with --label-column")

    def __len__(self) -> int:
        return len(self._dataset())

    def load(self, index: int) -> RawSample:
        row = self._dataset()[index]
        image = row[self.image_column]
        if isinstance(image, (bytes, bytearray)):  # a plain binary column
            image = {"bytes": bytes(image)}
        image = image or {}
        origin = f"{self.path}[{index}]" + (f" ({image['path']})" if image.get("path") else "")
        data = image.get("bytes")
        if data is None:
            if not image.get("path"):
                raise OSError("row has neither image bytes nor a path")
            with open(image["path"], "rb") as f:
                data = f.read()
        label = row[self.label_column]
        meta: dict[str, Any] = {"index": index, "label": label}
        if image.get("path"):
            meta["filename"] = os.path.basename(image["path"])
        if self.class_names is not None and label is not None and 0 <= label < len(self.class_names):
            meta["class_name"] = self.class_names[label]
        return RawSample(data, label, origin, meta)

    def close(self) -> None:
        self._ds = None
        if self._cache_dir is not None:
            shutil.rmtree(self._cache_dir, ignore_errors=True)
            self._cache_dir = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ds": None}  # a spawned writer process reopens the dataset itself


class SyntheticSource:
    """The procedural dataset of `mutransfer.data.synthetic` as a source."""

    def __init__(self, spec: synthetic.SyntheticSpec, samples: int) -> None:
        if samples < 1:
            raise UsageError(f"samples={samples} must be >= 1")
        self.spec = spec
        self.samples = samples
        self.name = f"synthetic-c{spec.classes}-s{spec.image_size}-seed{spec.seed}"
        self.num_classes = spec.classes
        self.class_names = [synthetic.class_name(c) for c in range(spec.classes)]

    def __len__(self) -> int:
        return self.samples

    def load(self, index: int) -> RawSample:
        image, label = synthetic.render(self.spec, index)
        colour, shape, texture = synthetic.class_attributes(label)
        meta = {"index": index, "label": label, "colour": colour, "shape": shape, "texture": texture}
        return RawSample(image, label, f"synthetic[{index}]", meta)


def open_source(spec: str, split: str, hf_split: str | None = None, image_column: str | None = None,
                label_column: str | None = None) -> ImageFolderSource | HFSource:
    """Parse 'imagefolder:DIR' or 'hf:PATH' (the synthetic source takes its own options)."""
    kind, sep, location = spec.partition(":")
    if not sep or not location:
        raise UsageError(f"source {spec!r} must be imagefolder:DIR, hf:PATH or synthetic")
    if kind == "imagefolder":
        if image_column or label_column or hf_split:
            raise UsageError("--image-column, --label-column and --hf-split only apply to hf: sources")
        return ImageFolderSource(location)
    if kind == "hf":
        return HFSource(location, hf_split or split, image_column, label_column)
    raise UsageError(f"unknown source kind {kind!r} in {spec!r}: use imagefolder:DIR, hf:PATH or synthetic")
