"""What a run writes about itself beside MLflow: `metrics.jsonl` (the same numbers as MLflow, readable
without it), `result.json`, the optional per-rank sample log, and the params and tags it gives MLflow."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mutransfer import tags

from .config import RunConfig
from .tracking import flatten

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    status: str  # finished | diverged | preempted
    step: int
    output_dir: str
    mlflow_run_id: str | None = None
    final_train_loss: float | None = None
    eval: dict[str, float] = field(default_factory=dict)
    message: str = ""
    skipped: dict[str, int] = field(default_factory=dict)  # data/{train,eval}_<kind>: samples skipped, all ranks


def append_metrics(output_dir: Path, rank: int, step: int, metrics: dict[str, float]) -> None:
    """One line of metrics.jsonl (rank 0 writes)."""
    if rank == 0:
        with open(output_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")


def write_result(result: RunResult, output_dir: Path, rank: int) -> None:
    """result.json (rank 0 writes)."""
    if rank == 0:
        (output_dir / "result.json").write_text(json.dumps(asdict(result), indent=1, default=str))


class SampleLog:
    """`run.record_samples`: the keys of every batch this rank trained on or evaluated, as JSON lines in
    output_dir/samples_rank<R>.jsonl. Lines are appended (a resumed run continues the file) and flushed at
    once, so that a preempted run leaves every trained step on record."""

    def __init__(self, output_dir: Path, rank: int) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)  # rank 0 may not have made it yet
        self.file = open(output_dir / f"samples_rank{rank}.jsonl", "a")

    def train(self, step: int, positions: list[tuple[int, int]], keys: list[list[str]]) -> None:
        for (epoch, batch), batch_keys in zip(positions, keys):
            self._write({"split": "train", "step": step, "epoch": epoch, "batch": batch, "keys": batch_keys})

    def eval(self, step: int, keys: list[str]) -> None:
        self._write({"split": "eval", "step": step, "keys": keys})

    def _write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def run_params(cfg: RunConfig, model: torch.nn.Module, world_size: int) -> dict[str, Any]:
    """MLflow params: the resolved config, flattened, plus the parametrization's multipliers."""
    param = model.parametrization
    params = flatten(cfg.to_dict())
    params.update({
        "parametrization": param.name,
        "alpha": param.alpha,
        "m_N": param.width_mult(model.width),
        "m_L": param.depth_mult(model.depth),
        "world_size": world_size,
        "num_params": sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()),
    })
    return params


def run_tags(cfg: RunConfig, model: torch.nn.Module, world_size: int, total_steps: int) -> dict[str, str]:
    """MLflow tags a study and the UI search by: the run's identity as it trained (resolved width and depth,
    global batch = per rank x accumulation x ranks, length in steps), written once by `tags.identity_tags`."""
    batch = cfg.data.batch_size * cfg.optim.accumulation * world_size
    identity = {"variant": model.parametrization.label, "width": int(model.width), "depth": int(model.depth),
                "batch_size": batch, "steps": total_steps, "lr": float(cfg.optim.lr),
                "momentum": float(cfg.optim.momentum_value), "weight_decay": float(cfg.optim.weight_decay),
                "seed": cfg.run.seed}
    names = {
        tags.ROLE: tags.RunRole.RUN.value,
        tags.MODEL: cfg.model.name,
        tags.PARAMETRIZATION: model.parametrization.name,
        tags.OPTIMIZER: cfg.optim.name,
        tags.SAMPLES: str(batch * total_steps),
        tags.STATUS: tags.RunStatus.RUNNING.value,
        **tags.identity_tags(identity),
    }
    return {**names, **cfg.tracking.tags}


def trim_metrics_file(path: str | os.PathLike, through_step: int) -> int:
    """Drop the rows of metrics.jsonl after `through_step` (what a resumed run trains again, or all of a
    run that starts over): the run appends them again, once. A row that is not whole JSON (the last line of a
    process killed while writing it) is dropped too, and said. Returns how many rows were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    rows = path.read_text().splitlines()
    kept, torn = [], 0
    for row in rows:
        try:
            values = json.loads(row) if row.strip() else None
        except ValueError:
            values = None
        torn += values is None and bool(row.strip())
        if isinstance(values, dict) and values.get("step", 0) <= through_step:
            kept.append(row)
    if torn:
        log.warning(f"mutransfer: {path}: dropped {torn} line(s) that were cut short (a process killed while writing)")
    if len(kept) != len(rows):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(row + "\n" for row in kept))
        tmp.replace(path)
    return len(rows) - len(kept)
