"""Webdataset shards in timm's layout: write them (from an ImageFolder, a Hugging Face dataset or the
synthetic generator), index them (`_info.json`), read them for training and evaluation, and `DataConfig`.

Reading is a chain of small stages, one module each: `urls` (opening a shard or index), `shards` (a split's
shard set), `partition` (which worker reads what, seeds), `tars` (tar members -> raw samples, counting what
could not be read), `skips` (the counts, in shared memory), `worker_signals` (workers and SIGTERM),
`decode` (checking and decoding samples; the decoder is passed in: PIL here, `gpu_decode` on the device),
`collate` (batches in the workers; the matching loss), `device_step` (normalising on the device), and the
loaders: `loader_base`, `train_loader`, `eval_loader`.

It imports only the leaf modules (`errors`, `typed_config`, `tags`, `netutil`), never `mutransfer.models` or
anything above."""

from mutransfer.data.collate import EvalBatch, train_loss
from mutransfer.data.config import DataConfig
from mutransfer.data.eval_loader import EvalLoader, build_eval_loader
from mutransfer.data.info import DatasetInfo, SplitInfo, read_info, write_info
from mutransfer.data.sources import HFSource, ImageFolderSource, SyntheticSource, open_source
from mutransfer.data.train_loader import TrainLoader, build_train_loader
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
