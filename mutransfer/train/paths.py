"""The files a run reads and writes, checked before any work: local shard sets complete, and an output
folder that is a folder we may write, holding nothing of another kind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from mutransfer.data import DataConfig
from mutransfer.errors import ConfigError, DataError


def is_local(path: str) -> bool:
    """A path on this machine's filesystem, not a URL or a `pipe:` command."""
    return "://" not in path and not path.startswith("pipe:")


def check_output_dir(output_dir: str, sections: set[str]) -> None:
    """run.output_dir must be a folder we may write, holding nothing of another kind where the run writes
    (its config.yaml and metrics.jsonl): a user's files of those names would be overwritten or misread."""
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise ConfigError("run.output_dir", f"{output_dir} is a file, not a folder")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("run.output_dir", f"{existing} is not writable")
    ours = {"config.yaml": lambda path: _our_config_file(path, sections), "metrics.jsonl": _our_metrics_file}
    foreign = [name for name, check in ours.items() if (folder / name).is_file() and not check(folder / name)]
    if foreign:
        raise ConfigError("run.output_dir", f"{output_dir} holds a {foreign[0]} that mutransfer did not write; "
                          "choose another run.output_dir")


def _our_config_file(path: Path, sections: set[str]) -> bool:
    """A config.yaml a run saved: a mapping of the run config's `sections`, the run section among them."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "run" in raw and set(raw) <= sections


def _our_metrics_file(path: Path) -> bool:
    """A metrics.jsonl a run wrote: it is empty or its first line is a JSON object with a step."""
    try:
        with open(path) as fh:
            first = fh.readline()
        return not first.strip() or isinstance(json.loads(first).get("step"), int)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def check_shard_sets(data: DataConfig) -> None:
    """The local train and eval shard sets: an index that lists the split and every shard it names."""
    from mutransfer.data.shards import shards_from_info, shards_from_pattern

    for pattern_key, split_key in (("train_shards", "train_split"), ("eval_shards", "eval_split")):
        pattern = getattr(data, pattern_key)
        try:
            if pattern is not None:
                if is_local(pattern):
                    shards_from_pattern(pattern)
            elif data.shards_dir and is_local(data.shards_dir):
                shards_from_info(data.shards_dir, getattr(data, split_key))
        except DataError as err:
            raise ConfigError(f"data.{pattern_key if pattern is not None else 'shards_dir'}", str(err)) from None


def check_run_paths(data: DataConfig, deepspeed_json: str | None, output_dir: str, resume: str,
                    sections: set[str]) -> None:
    """Paths a run reads must exist before any work starts; local shard sets must be complete (`sections`:
    the run config's section names, which an output folder's config.yaml may hold)."""
    if data.shards_dir and is_local(data.shards_dir) and not Path(data.shards_dir).is_dir():
        raise ConfigError("data.shards_dir", f"no such directory: {data.shards_dir}")
    check_shard_sets(data)
    if deepspeed_json and not Path(deepspeed_json).is_file():
        raise ConfigError("deepspeed.config", f"no such file: {deepspeed_json}")
    check_output_dir(output_dir, sections=sections)
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        raise ConfigError("run.resume", f"must be auto, never or a checkpoint directory; no such directory: {resume}")
    if resume not in ("auto", "never"):
        from .checkpoint import checkpoint_problem

        problem = checkpoint_problem(Path(resume))
        if problem is not None:
            raise ConfigError("run.resume", f"{resume} is not an intact checkpoint: {problem}")
