"""From a RunConfig to a ready DeepSpeed engine: the DeepSpeed config, the zoo model (initialised from
run.seed identically at every ZeRO stage), per-rank RNG seeding, our optimizer and LR schedule, and
`torch.compile` (run.compile) through DeepSpeed's `engine.compile()`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from mutransfer.models import create_model
from mutransfer.models.optim import build_optimizer

from . import checkpoint as ckpt
from . import deepspeed_sync
from .config import ConfigError, RunConfig
from .schedule import build_scheduler

log = logging.getLogger(__name__)

# run.compile -> torch.compile keyword arguments (engine.compile passes them on with the accelerator's backend)
COMPILE_KWARGS: dict[str, dict[str, Any]] = {"model": {}, "max-autotune": {"mode": "max-autotune"}}


def merge_config(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, recursively for nested mappings (the keys of `extra` win)."""
    out = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_config(out[key], value) if nested else value
    return out


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """Every DeepSpeed default that matters, set explicitly (0.19 clips at 1.0 unless told otherwise)."""
    ds, optim = cfg.deepspeed, cfg.optim
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        # DeepSpeed's bf16 overflow check reads a flag back to the host in every ZeRO-1/2 step; bf16 needs no
        # loss scaling, and the trainer's sync point catches inf/NaN losses
        "bf16": {"enabled": ds.bf16, "check_grad_overflow": False},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # our client AdamW / SGD carry the per-role groups
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if ds.config:
        config = merge_config(config, json.loads(Path(ds.config).read_text()))
    # batch sizes always follow the data config, so that the loader and the engine agree
    config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    config["gradient_accumulation_steps"] = optim.accumulation
    config["train_batch_size"] = cfg.data.batch_size * optim.accumulation * world_size
    return config


def build_model(cfg: RunConfig, ds_config: dict[str, Any], num_classes: int) -> torch.nn.Module:
    """The zoo model, initialised from run.seed identically whatever the ZeRO stage."""
    kwargs = cfg.model.create_kwargs(cfg.data.img_size, num_classes)
    if cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.zero3_init:
        import deepspeed  # only here: a stack of trials builds its models without DeepSpeed

        # parameters are born partitioned; our init code must run on gathered full tensors
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = create_model(cfg.model.name, weight_init=False, **kwargs)
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            torch.manual_seed(cfg.run.seed)
            model.init_weights()
    else:
        model = create_model(cfg.model.name, weight_init=False, **kwargs)  # initialised once, here
        torch.manual_seed(cfg.run.seed)
        model.init_weights()
    if cfg.model.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError("model.grad_checkpointing", f"{cfg.model.name} has no per-block checkpointing")
        model.set_grad_checkpointing(True)
    return model


def seed_rngs(seed: int, rank: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs from (seed, rank)."""
    import random

    import numpy as np

    state = np.random.SeedSequence([seed, rank]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    torch.manual_seed(int(state[0]) ^ int(state[1]))


def build_engine(cfg: RunConfig, model: torch.nn.Module, ds_config: dict[str, Any], total_steps: int,
                 warmup_steps: int) -> Any:
    """deepspeed.initialize with our optimizer over the model's per-role groups and our LR schedule (which
    multiplies each group's own LR), compiled as run.compile asks; checkpoints load with weights_only."""
    import deepspeed

    deepspeed_sync.install()  # DeepSpeed's per-step host waits out (its docstring says which)
    if torch.cuda.is_available() and cfg.deepspeed.bf16 and cfg.deepspeed.zero_stage == 0:
        log.warning("mutransfer: deepspeed.zero_stage=0 with bf16 runs DeepSpeed's FP16_UnfusedOptimizer, which waits "
                    "for the GPU every step; ZeRO-1 trained ViT-B/16 1.3-1.5x faster on an H100 (docs/benchmarks.md): "
                    "set deepspeed.zero_stage=1, the same training on any number of GPUs")
    optim = cfg.optim
    optimizer = build_optimizer(model, optim, fused=fused_optimizer(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: build_scheduler(opt, total_steps, warmup_steps, optim.schedule,
                                                 optim.min_lr_ratio),
    )
    ckpt.make_safe_checkpoint_engine(engine.checkpoint_engine)
    if cfg.run.compile != "off":
        # nn.Module.compile in place on engine.module: parameter names (and so checkpoints) stay those of
        # the eager model, with no `_orig_mod.` prefix (run.compile's docstring says why this path)
        engine.compile(compile_kwargs=COMPILE_KWARGS[cfg.run.compile])
    return engine


def fused_optimizer(cfg: RunConfig) -> bool:
    """Fused AdamW / SGD kernels where the optimizer steps on a GPU; foreach kernels otherwise (the CPU,
    and ZeRO-Offload, whose optimizer steps on host copies)."""
    return torch.cuda.is_available() and not cfg.deepspeed.offload_optimizer


def param_groups_of(engine: Any) -> list[dict[str, Any]]:
    """The optimizer's per-role groups (with their current LRs) under any ZeRO stage's wrapper."""
    optimizer = getattr(engine, "basic_optimizer", None) or engine.optimizer
    return optimizer.param_groups
