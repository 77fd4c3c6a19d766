"""`mutransfer export RUN_DIR OUT`: consolidated fp32 weights of a run, as our safetensors or as plain timm.

`--ema` writes the checkpoint's weight EMA (run.ema_decay, `ema.safetensors`, already full fp32 tensors)
instead of its weights, in either format.

`--format safetensors` (the default) writes one file whose metadata names the zoo model and its arguments,
so `mutransfer.models.load_model(OUT)` (or `create_model(name, checkpoint_path=OUT, **same_args)`) rebuilds
it. `--format timm` writes a folder (`model.safetensors` + `config.json`) that
`timm.create_model("local-dir:OUT", pretrained=True)` loads with no mutransfer installed: the
parametrization's multipliers are folded into the weights (`mutransfer.models.timm_export`). ZeRO 1-3
partitions are merged with DeepSpeed's own consolidation; a stage-0 checkpoint holds the whole model already.
Every torch file is read with `weights_only=True`: nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mutransfer.data import DataConfig
from mutransfer.errors import UsageError
from mutransfer.models import create_model
from mutransfer.models.timm_export import save_timm
from mutransfer.models.zoo import MODEL_METADATA_KEY

from . import checkpoint as ckpt
from .config import config_from_dict
from .ema import EMA_FILE


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Make every torch.load inside (DeepSpeed's consolidation included) a weights-only load."""
    original = torch.load
    torch.load = lambda f, map_location=None, **kwargs: ckpt.safe_torch_load(f, map_location, load=original,
                                                                            **kwargs)
    try:
        yield
    finally:
        torch.load = original


def consolidated_state_dict(folder: Path, zero_stage: int, bf16: bool) -> dict[str, torch.Tensor]:
    with weights_only_torch_load():
        if zero_stage == 0 and not bf16:
            states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu")
            return {k: v.float() for k, v in states["module"].items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)


FORMATS = ("safetensors", "timm")


def checkpoint_weights(folder: Path, zero_stage: int, bf16: bool, ema: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's full fp32 weights, or with `ema` the weight EMA it holds."""
    if not ema:
        return consolidated_state_dict(folder, zero_stage, bf16)
    path = folder / EMA_FILE
    if not path.is_file():
        raise UsageError(f"checkpoint {folder} holds no weight EMA ({EMA_FILE}): the run had run.ema_decay=0")
    return load_file(str(path))


def export(run_dir: str | Path, out: str | Path, checkpoint: str | None = None,
           format: str = "safetensors", ema: bool = False) -> Path:
    """Write the newest complete checkpoint of `run_dir` (or `checkpoint`) as one safetensors file, or (timm)
    as a timm folder; with `ema`, its weight EMA."""
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    run_dir, out = Path(run_dir), Path(out)
    if format == "timm" and out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; --format timm writes a folder")
    folder = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run_dir)
    if folder is None or not (folder / ckpt.STATE_FILE).is_file():
        raise UsageError(f"{run_dir} holds no complete checkpoint (looked in {ckpt.checkpoint_root(run_dir)})")
    state, raw_config = ckpt.read_state(folder)
    cfg = config_from_dict(raw_config)
    tensors = checkpoint_weights(folder, cfg.deepspeed.zero_stage, cfg.deepspeed.bf16, ema)
    kwargs = cfg.model.create_kwargs(cfg.data.img_size, cfg.data.num_classes)  # saved resolved by the trainer
    model = create_model(cfg.model.name, **kwargs)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        diff = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        raise UsageError(f"checkpoint {folder} does not match model {cfg.model.name}: {', '.join(diff[:5])}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "timm":
        model.load_state_dict(tensors, strict=True)
        provenance = {"model": cfg.model.name, "kwargs": kwargs, "step": state.step, "checkpoint": str(folder),
                      "mlflow_run_id": state.mlflow_run_id, "weights": "ema" if ema else "trained"}
        return save_timm(model, out, eval_data_config(cfg.data), provenance)
    metadata = {MODEL_METADATA_KEY: json.dumps({"name": cfg.model.name, "kwargs": kwargs}),
                "mutransfer_step": str(state.step), "mutransfer_weights": "ema" if ema else "trained"}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata=metadata)
    return out


def eval_data_config(data: DataConfig) -> dict[str, Any]:
    """Our eval preprocessing in timm's data-config terms (what `timm.data.resolve_data_config` returns)."""
    return {"input_size": (3, data.img_size, data.img_size), "crop_pct": data.crop_pct, "crop_mode": "center",
            "interpolation": "bicubic" if data.interpolation == "random" else data.interpolation,
            "mean": tuple(data.mean), "std": tuple(data.std)}
