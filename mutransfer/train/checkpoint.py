"""Checkpoints: DeepSpeed's engine state plus ours (step, epoch, data position, RNG, config).

Layout under `<output_dir>/checkpoints/`: one folder per tag `step_00000123/` with DeepSpeed's files, our
`rng_rank<R>.safetensors` + `rng_rank<R>.json` per rank, and `mutransfer_state.json`, written by rank 0
last, after every rank has saved. A checkpoint without that file is incomplete and never resumed from.

Which folders are ours: a checkpoint is a folder whose state file names it (its `tag`), so a user's copy
(`checkpoints/step_best`) is neither resumed from by `run.resume=auto` nor deleted; it can still be named
(`run.resume=<folder>`). "Newest" is the step the state file saved, not the folder's name. A checkpoint
being written carries `mutransfer_pending.json` (made before any rank writes), so that a leftover of an
interrupted save can be told from a folder of the user's, which pruning never touches.

Integrity: the state file lists every file of the checkpoint with its size and SHA-256. Resuming checks
them, and a damaged newest checkpoint (a file missing, cut short or changed, the state unreadable) is passed
over, with a warning naming what is wrong, for the newest intact one; so is one that fails to load.

Nothing here unpickles: our state is JSON and safetensors, and DeepSpeed's own files are read through
`safe_torch_load`, which loads with `weights_only=True` and allows only the few DeepSpeed types those
files hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mutransfer.tags import RunStatus

log = logging.getLogger(__name__)

STATE_FILE = "mutransfer_state.json"
PENDING_FILE = "mutransfer_pending.json"
STEP_FOLDER_PREFIX = "step_"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next batch belongs to
    batch_in_epoch: int = 0  # micro-batches of that epoch already consumed
    samples_seen: int = 0  # images trained on, all ranks
    mlflow_run_id: str | None = None
    status: str = RunStatus.RUNNING


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"{STEP_FOLDER_PREFIX}{step:08d}"


def _read_raw_state(folder: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads((folder / STATE_FILE).read_text())
        int(raw["state"]["step"])
        return raw
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _ours(folder: Path, raw: dict[str, Any]) -> bool:
    """Written here by us: the state file names this folder, so a user's copy of a checkpoint (whose state names
    the original) is neither resumed from nor pruned."""
    return raw.get("tag") == folder.name


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Our complete checkpoint folders, oldest first by the step they saved."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        raw = _read_raw_state(folder) if (folder / STATE_FILE).is_file() else None
        if raw is not None and _ours(folder, raw):
            found.append((int(raw["state"]["step"]), folder.name, folder))
    return [folder for *_, folder in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike, before: Path | None = None) -> Path | None:
    """The newest complete checkpoint whose files are intact (older than `before`, when given: the one that
    failed to load); damaged newer ones are warned about."""
    complete = complete_checkpoints(output_dir)
    if before is not None:
        complete = complete[:complete.index(before)] if before in complete else []
    for folder in reversed(complete):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log.warning(f"mutransfer: checkpoint {folder} is damaged ({problem}); trying the one before it")
    return None


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 4 MiB blocks (about 1 s per GB here, once per save and per resume)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a complete checkpoint (its state unreadable, a listed file missing, of another size
    or another checksum), or None."""
    raw = _read_raw_state(folder)
    if raw is None:
        return f"{STATE_FILE} is unreadable"
    try:
        TrainState(**raw["state"])
    except TypeError as err:
        return f"{STATE_FILE} is unreadable ({err})"
    for name, written in raw.get("files", {}).items():
        path = folder / name
        size, digest = written["size"], written["sha256"]
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if file_digest(path) != digest:
            return f"{name} has changed since it was written (its SHA-256 differs)"
    return None


def read_state(folder: Path) -> tuple[TrainState, dict[str, Any]]:
    raw = json.loads((folder / STATE_FILE).read_text())
    return TrainState(**raw["state"]), raw["config"]


def mark_pending(folder: Path, step: int) -> None:
    """Before any rank writes: the folder is a checkpoint of ours being written (see `prune`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PENDING_FILE).write_text(json.dumps({"tag": folder.name, "step": step}))


def write_state(folder: Path, state: TrainState, config: dict[str, Any]) -> None:
    """The state file, with the size and SHA-256 of every file the ranks wrote (call it after they all have)."""
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith((STATE_FILE, PENDING_FILE))}
    tmp = folder / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps({"state": asdict(state), "config": config, "files": files, "tag": folder.name},
                              indent=1))
    tmp.replace(folder / STATE_FILE)  # atomic: the checkpoint is complete once this name exists
    (folder / PENDING_FILE).unlink(missing_ok=True)


def prune(output_dir: str | os.PathLike, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones of ours, and leftovers of our own saves
    that never completed (older than the newest complete one). Nothing else is ever deleted."""
    complete = complete_checkpoints(output_dir)
    for folder in complete[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
    if not complete:
        return
    newest_step = read_state(complete[-1])[0].step
    for folder in checkpoint_root(output_dir).iterdir():
        try:
            pending = json.loads((folder / PENDING_FILE).read_text())
        except (OSError, ValueError):
            continue
        if (not (folder / STATE_FILE).exists() and pending.get("tag") == folder.name
                and int(pending.get("step", newest_step)) < newest_step):
            shutil.rmtree(folder, ignore_errors=True)


# --- RNG state as safetensors + JSON ------------------------------------------------------------------------
def save_rng(folder: Path, rank: int) -> None:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, py_state, gauss = random.getstate()
    save_file(tensors, str(folder / f"rng_rank{rank}.safetensors"))
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(py_state), gauss]}
    (folder / f"rng_rank{rank}.json").write_text(json.dumps(meta))


def load_rng(folder: Path, rank: int) -> None:
    path = folder / f"rng_rank{rank}.safetensors"
    if not path.is_file():  # resumed on more ranks than saved: those ranks keep their seeded state
        return
    tensors = load_file(str(path))
    meta = json.loads((folder / f"rng_rank{rank}.json").read_text())
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = meta["python"]
    random.setstate((version, tuple(py_state), gauss))


# --- DeepSpeed files without unpickling arbitrary objects ---------------------------------------------------
def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed writes into its checkpoint files (found by loading them)."""
    import collections

    allowed: list[Any] = [collections.OrderedDict, set, torch.Size]
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:
        pass
    return allowed


def safe_torch_load(path: Any, map_location: Any = None, *, load: Any = None, **kwargs: Any) -> Any:
    """torch.load (or `load`, the original when torch.load is patched) with weights_only=True and only
    DeepSpeed's checkpoint types allowed; a `weights_only` the caller passes is overruled."""
    kwargs.pop("weights_only", None)
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return (load or torch.load)(path, map_location=map_location, weights_only=True, **kwargs)


def make_safe_checkpoint_engine(base_engine: Any) -> Any:
    """Make DeepSpeed's checkpoint engine load through `safe_torch_load`."""
    base_engine.load = lambda path, map_location=None: safe_torch_load(path, map_location)
    return base_engine
