"""Webdataset shards in timm's layout: write them (from an ImageFolder, a Hugging Face dataset or the
synthetic generator), index them (`_info.json`), read them for training and evaluation, and `DataConfig`.

It imports only the leaf modules (`errors`, `typed_config`, `tags`, `netutil`), never `mutransfer.models` or
anything above."""

from mutransfer.data.config import DataConfig
from mutransfer.data.info import DatasetInfo, SplitInfo, read_info, write_info
from mutransfer.data.reader import (
    EvalBatch,
    EvalLoader,
    TrainLoader,
    build_eval_loader,
    build_train_loader,
    train_loss,
)
from mutransfer.data.sources import HFSource, ImageFolderSource, SyntheticSource, open_source
from mutransfer.data.writer import WriteSummary, write_shards, write_synthetic_shards

__all__ = [
    "DataConfig",
    "DatasetInfo",
    "EvalBatch",
    "EvalLoader",
    "HFSource",
    "ImageFolderSource",
    "SplitInfo",
    "SyntheticSource",
    "TrainLoader",
    "WriteSummary",
    "build_eval_loader",
    "build_train_loader",
    "open_source",
    "read_info",
    "train_loss",
    "write_info",
    "write_shards",
    "write_synthetic_shards",
]
