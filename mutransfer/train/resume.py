"""Where a run starts and how its checkpoints are written: the checkpoint run.resume points at, loading it
into the engine, and saving one on all ranks (rank 0 marks it complete and prunes old ones)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mutransfer.tags import RunStatus

from . import checkpoint as ckpt
from .config import ConfigError, RunConfig
from .distributed import barrier


def resume_point(cfg: RunConfig) -> Path | None:
    """The checkpoint folder to continue from, or None to start fresh."""
    resume = cfg.run.resume
    if resume == "never":
        if ckpt.complete_checkpoints(cfg.run.output_dir):
            raise ConfigError("run.resume", f"{cfg.run.output_dir} already holds checkpoints; use "
                              "run.resume=auto to continue or another run.output_dir")
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(cfg.run.output_dir)
    folder = Path(resume)
    if not (folder / ckpt.STATE_FILE).is_file():
        raise ConfigError("run.resume", f"{folder} is not a complete mutransfer checkpoint")
    return folder


def load_checkpoint(engine: Any, folder: Path | None) -> ckpt.TrainState:
    """The engine's state from `folder` and our TrainState (a fresh one without a folder). The RNG states
    are loaded later, by the loop, once the data loader has replayed its order."""
    if folder is None:
        return ckpt.TrainState()
    engine.load_checkpoint(str(folder.parent), tag=folder.name)
    state, _ = ckpt.read_state(folder)
    state.status = RunStatus.RUNNING
    return state


def save_checkpoint(engine: Any, state: ckpt.TrainState, cfg: RunConfig, rank: int) -> Path:
    """All ranks save their part; rank 0 marks the checkpoint complete, then prunes old ones."""
    root = ckpt.checkpoint_root(cfg.run.output_dir)
    tag = ckpt.tag_for(state.step)
    engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
    ckpt.save_rng(root / tag, rank)
    barrier()
    if rank == 0:
        ckpt.write_state(root / tag, state, cfg.to_dict())
        ckpt.prune(cfg.run.output_dir, cfg.run.keep_checkpoints)
    barrier()
    return root / tag
