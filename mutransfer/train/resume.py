"""Where a run starts and how its checkpoints are written: the checkpoint run.resume points at, loading it
into the engine (passing over, on every rank alike, a newest checkpoint that fails to load), and saving
one on all ranks (rank 0 marks it pending first, complete last, then prunes old ones)."""

from __future__ import annotations

import logging
import os
import resource
import shutil
from pathlib import Path
from typing import Any

import torch

from mutransfer.tags import RunStatus

from . import checkpoint as ckpt
from .config import ConfigError, RunConfig
from .distributed import all_reduce_floats, barrier, broadcast_from_rank0

log = logging.getLogger(__name__)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written: which one, which file, and what the OS said."""


def check_fresh_start(cfg: RunConfig) -> None:
    """run.resume=never refuses a folder that already holds checkpoints (before anything is written)."""
    if cfg.run.resume == "never" and ckpt.complete_checkpoints(cfg.run.output_dir):
        raise ConfigError("run.resume", f"{cfg.run.output_dir} already holds checkpoints; use "
                          "run.resume=auto to continue or another run.output_dir")


def resume_point(cfg: RunConfig, before: Path | None = None) -> Path | None:
    """The checkpoint folder to continue from, or None to start fresh; with `before` (a folder that failed to
    load), the newest intact one older than it."""
    resume = cfg.run.resume
    if resume == "never":
        check_fresh_start(cfg)
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(cfg.run.output_dir, before=before)
    folder = Path(resume)
    if not (folder / ckpt.STATE_FILE).is_file():
        raise ConfigError("run.resume", f"{folder} is not a complete mutransfer checkpoint")
    return None if before is not None else folder


def resume_run(engine: Any, cfg: RunConfig, rank: int, world_size: int, device: torch.device
               ) -> tuple[ckpt.TrainState, Path | None]:
    """Load the checkpoint run.resume points at into the engine: (our TrainState, its folder), or a fresh
    state and None. Rank 0 picks the folder (it checks checksums once for all); a folder that fails to load
    on any rank is passed over, with a warning, for the one before it. The RNG states are loaded later, by
    the loop, once the data loader has replayed its order."""
    folder = broadcast_from_rank0(resume_point(cfg) if rank == 0 else None, world_size)
    while folder is not None:
        problem = _load(engine, folder)
        failed = all_reduce_floats([0.0 if problem is None else 1.0], device)[0] > 0
        if not failed:
            state, _ = ckpt.read_state(folder)
            state.status = RunStatus.RUNNING
            return state, folder
        if cfg.run.resume not in ("auto", "never"):
            raise ConfigError("run.resume", f"{folder} could not be loaded ({problem or 'on another rank'})")
        if rank == 0:
            log.warning(f"mutransfer: checkpoint {folder} could not be loaded ({problem or 'on another rank'}); "
                        "trying the one before it")
        folder = broadcast_from_rank0(resume_point(cfg, before=folder) if rank == 0 else None, world_size)
    return ckpt.TrainState(), None


def _load(engine: Any, folder: Path) -> str | None:
    """Load one checkpoint into the engine; what went wrong, in one line, or None."""
    try:
        engine.load_checkpoint(str(folder.parent), tag=folder.name)
    except Exception as err:  # a damaged or foreign file: torch's reader, unpickling, DeepSpeed's own checks
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def save_checkpoint(engine: Any, state: ckpt.TrainState, cfg: RunConfig, rank: int, ema: Any = None) -> Path:
    """All ranks save their part (and the weight EMA's, when there is one); rank 0 marks the checkpoint
    pending first and complete last, then prunes old ones."""
    root = ckpt.checkpoint_root(cfg.run.output_dir)
    tag = ckpt.tag_for(state.step)
    if rank == 0:
        ckpt.mark_pending(root / tag, state.step)
    barrier()
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
        ckpt.save_rng(root / tag, rank)
        if ema is not None:
            ema.save(root / tag, rank)
    except (OSError, RuntimeError) as err:
        raise CheckpointWriteError(write_failure(root / tag, err)) from err
    barrier()
    if rank == 0:
        ckpt.write_state(root / tag, state, cfg.to_dict())
        ckpt.prune(cfg.run.output_dir, cfg.run.keep_checkpoints)
    barrier()
    return root / tag


def write_failure(folder: Path, err: BaseException) -> str:
    """One line: the checkpoint, the file it was writing (the newest in the folder), and the likely cause."""
    files = sorted((p for p in folder.glob("*") if p.is_file()), key=lambda p: p.stat().st_mtime)
    where = f", file {files[-1].name} ({files[-1].stat().st_size} bytes written)" if files else ""
    cause = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else str(err).splitlines()[0]
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    hints = []
    if limit != resource.RLIM_INFINITY:
        hints.append(f"the file size limit (ulimit -f) is {limit} bytes")
    free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    if free < 1 << 30:
        hints.append(f"{free} bytes are free on its disk")
    return f"could not write checkpoint {folder}{where}: {cause}" + (f" ({'; '.join(hints)})" if hints else "")
