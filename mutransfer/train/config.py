"""Run configuration: the typed sections of one training run, read from YAML with dotted command-line overrides.

    cfg = load_config("configs/cpu_demo.yaml", ["optim.lr=3e-3", "deepspeed.zero_stage=2"])
    trial = with_values(cfg, {"optim.lr": 2 ** -6, "model.depth": 16})    # typed, checked again

Every section checks itself when it is made (`typed_config.Section`); unknown keys, wrong types and bad
values raise ConfigError naming the dotted key, before any work starts (the entry point turns it into one
line on stderr and exit code 2). Paths are checked apart (`check_paths`), where the run starts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mutransfer.data import DataConfig
from mutransfer.errors import ConfigError
from mutransfer.models.optim import OptimSection
from mutransfer.models.parametrization import DEPTH_AWARE, RECOMMENDED, ParametrizationName
from mutransfer.typed_config import (
    Section,
    apply_overrides,
    build_section,
    check_at_least,
    check_path_text,
    load_yaml,
    read_yaml_mapping,
    with_values,
)

from .paths import check_run_paths

__all__ = ["ConfigError", "DataConfig", "DeepSpeedSection", "ModelSection", "OptimSection", "RunConfig",
           "RunSection", "TrackingSection", "apply_overrides", "check_paths", "config_from_dict", "load_config",
           "load_yaml", "save_config", "with_values"]


@dataclass
class ModelSection(Section):
    """Which zoo model, its shape, and its parametrization (docs/parametrizations.md); None keeps the zoo
    entry's or the parametrization's default."""

    name: str = "vit"
    """Zoo name (`mutransfer models` lists them)."""
    width: int | None = None
    """Embedding width; None keeps the zoo entry's default."""
    depth: int | None = None
    """Number of residual blocks; None keeps the zoo entry's default."""
    head_dim: int | None = None
    """Width of one attention head (heads = width / head_dim); None keeps the zoo entry's default."""
    patch_size: int | None = None
    """Side of the square image patches a ViT embeds; None keeps the zoo entry's default."""
    mlp_ratio: float | None = None
    """Hidden width of each MLP block over the embedding width; None keeps the zoo entry's default (4)."""
    parametrization: ParametrizationName | None = None
    """How init, multipliers and per-role LRs scale with width and depth. None: the recommended default for
    ViTs, depth_mup with first_layer_lr_exponent 0.5 (docs/results.md). A name alone means its knobs at their
    plain values, as a study label does: `depth_mup` is first_layer_lr_exponent 0."""
    alpha: float | None = None
    """Residual exponent in [1/2, 1] (branches are multiplied by m_L ** -alpha); None: 1/2 for depth_mup,
    1 for completep. Only for depth_mup and completep."""
    base_width: int | None = None
    """Width at which every multiplier is 1 (the proxies' tuning width); None: the parametrization's default, 128."""
    base_depth: int | None = None
    """Depth at which every multiplier is 1; None: the parametrization's default."""
    readout_multiplier: float | None = None
    """alpha_out in the readout's alpha_out / m_N; None: 1."""
    first_layer_lr_exponent: float | None = None
    """LR of qkv / fc1 times m_L ** this (docs/parametrizations.md); None: 0, or 0.5 when no parametrization
    is named (the recommended default)."""
    zero_init: bool | None = None
    """Zero-initialise readout and query weights; None: on for every parametrization but sp."""
    init_std: float | None = None
    """Init std sigma of hidden matrices at the base width (None: 0.02, timm's ViT init); the residual-MLP
    studies use 1/sqrt(base_width), the fan-in init their theory assumes."""
    drop_path_rate: float = 0.0
    """Stochastic depth (timm's --drop-path) of the last block, rising linearly from 0 at the first (timm's
    rule); 0: none. ViT models only. Keep it fixed over depth when transferring (docs/parametrizations.md)."""
    grad_checkpointing: bool = False
    """Activation checkpointing per block (timm's `set_grad_checkpointing()`): each block's activations are
    recomputed in the backward pass instead of kept, for about one more forward of compute. For ViT-L/H
    at large batches; `benchmarks/grad_checkpointing.py` measures the memory it saves."""

    def check(self) -> None:
        from mutransfer.models import zoo_entry

        try:
            entry = zoo_entry(self.name)
        except ValueError as err:
            raise ConfigError("name", str(err)) from None
        for key in ("width", "depth", "head_dim", "patch_size", "base_width", "base_depth"):
            check_at_least(key, getattr(self, key), 1)
        for key in ("mlp_ratio", "readout_multiplier", "init_std"):
            value = getattr(self, key)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(key, f"must be a positive number, got {value}")
        if self.first_layer_lr_exponent is not None and not math.isfinite(self.first_layer_lr_exponent):
            raise ConfigError("first_layer_lr_exponent", f"must be finite, got {self.first_layer_lr_exponent}")
        if not 0 <= self.drop_path_rate < 1:
            raise ConfigError("drop_path_rate", f"must lie in [0, 1), got {self.drop_path_rate}")
        if self.alpha is not None and (self.parametrization or RECOMMENDED) not in DEPTH_AWARE:
            raise ConfigError("alpha", f"only applies to {' and '.join(DEPTH_AWARE)}, not {self.parametrization}")
        if self.alpha is not None and not 0.5 <= self.alpha <= 1:
            raise ConfigError("alpha", f"must lie in [1/2, 1], got {self.alpha}")
        width, head_dim = (self.width or entry.defaults.get("width"), self.head_dim or entry.defaults.get("head_dim"))
        if width and head_dim and width % head_dim:
            raise ConfigError("width" if self.width else "head_dim", f"width {width} is not divisible by head_dim "
                              f"{head_dim}")

    def create_kwargs(self, img_size: int, num_classes: int) -> dict[str, Any]:
        kwargs = {k: getattr(self, k) for k in (
            "width", "depth", "head_dim", "patch_size", "mlp_ratio", "alpha", "base_width", "base_depth",
            "readout_multiplier", "first_layer_lr_exponent", "init_std")}
        kwargs.update(parametrization=self.parametrization, img_size=img_size, num_classes=num_classes,
                      zero_readout=self.zero_init, zero_query=self.zero_init)
        kwargs["drop_path_rate"] = self.drop_path_rate or None  # left out at 0: models without it take these too
        return {k: v for k, v in kwargs.items() if v is not None}


@dataclass
class DeepSpeedSection(Section):
    """How DeepSpeed shards and runs the model: ZeRO stage, bf16, offload, and a JSON to merge over ours."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage: 0 data parallel, 1 shards optimizer states, 2 also gradients, 3 also parameters."""
    bf16: bool = False
    """Train in bfloat16 with fp32 master weights (DeepSpeed's bf16 mode)."""
    offload_optimizer: bool = False
    """Keep optimizer states in host memory and step there (ZeRO-Offload); ZeRO 1-3."""
    offload_param: bool = False
    """Keep parameters in host memory between uses; ZeRO-3 only."""
    zero3_init: bool = True
    """Build the model under deepspeed.zero.Init at stage 3 (parameters born partitioned)."""
    config: str | None = None
    """Path to a DeepSpeed JSON merged over the generated one (its keys win, except batch sizes)."""

    def check(self) -> None:
        if self.offload_param and self.zero_stage != 3:
            raise ConfigError("offload_param", "needs deepspeed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("offload_optimizer", "needs deepspeed.zero_stage 1, 2 or 3")


@dataclass
class RunSection(Section):
    """How long to train, when to evaluate, checkpoint and log, and where the run's files go."""

    steps: int | None = None
    """Optimizer steps to train; exactly one of steps and epochs."""
    epochs: int | None = None
    """Epochs to train (passes over the training split, counted in optimizer steps per epoch)."""
    eval_interval: int = 0
    """Evaluate every N steps (0: only at the end)."""
    checkpoint_interval: int = 0
    """Checkpoint every N steps (0: only at the end and on SIGTERM/SIGINT)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept in output_dir/checkpoints; older ones are deleted."""
    log_interval: int = 10
    """Log metrics (and check for divergence and stop signals) every N steps."""
    seed: int = 0
    """Seed of the model's init and of in-process augmentation (data order has data.seed)."""
    output_dir: str = "runs/default"
    """Folder of the run: config.yaml, metrics.jsonl, result.json and checkpoints."""
    resume: str = "auto"
    """auto: continue from the newest checkpoint in output_dir; never: start fresh (refuses a used dir); or a
    checkpoint directory to start from."""
    divergence_loss: float = 1e3
    """A training loss above this (or NaN/inf) stops the run as diverged."""
    save_checkpoints: bool = True
    """False: no checkpoints at all (short sweep trials)."""
    progress: bool = True
    """A tqdm bar on rank 0 (sweeps turn it off and show one bar over trials)."""
    compile: Literal["off", "model", "max-autotune"] = "off"
    """torch.compile the model: `model` (inductor, default mode) or `max-autotune` (longer compile, tuned
    kernels). Done through DeepSpeed's `engine.compile()`, which compiles `engine.module` in place
    (nn.Module.compile) with the accelerator's backend, rather than `torch.compile(model)` before
    deepspeed.initialize: the module keeps its parameter names (no `_orig_mod.` prefix), so checkpoints of
    compiled and eager runs load into each other, and DeepSpeed keeps handling the module it wrapped.
    ZeRO 0-2 only: at ZeRO-3, dynamo traces DeepSpeed's per-module parameter gather hooks, breaking the
    graph and recompiling at every submodule (DeepSpeed's DeepCompile is the ZeRO-3 path; not wired here)."""
    matmul_precision: Literal["default", "highest", "high", "medium"] = "default"
    """float32 matrix products and convolutions, set when the run (or stack) starts: `default` is
    PyTorch's (products in full float32, cuDNN's convolutions in TF32), `highest` full float32 for both,
    `high` TF32 for both (on the tensor cores; without them an H100's float32 products ran at 51 TFLOP/s),
    `medium` products in bf16 internally (torch.set_float32_matmul_precision; on CPUs that have them, oneDNN's
    products follow `high` and `medium` too). A float32 run or stack trains at the precision of its products;
    a bf16 run (deepspeed.bf16) is not affected. Stacked and lone trials of one study share it."""
    ema_decay: float = 0.0
    """Weight EMA with this decay after every optimizer step, as timm's ModelEmaV3 (--model-ema-decay; 0: none):
    evaluated beside the weights (eval/ema_loss, eval/ema_top1), checkpointed, `mutransfer export --ema`
    writes it; ZeRO-3 shards it like the parameters (mutransfer/train/ema.py)."""
    ema_warmup: bool = False
    """Warm the EMA's decay up as timm's --model-ema-warmup: min(ema_decay, 1 - (1 + t) ** -2/3) at step t."""
    record_samples: bool = False
    """Debugging aid: every rank appends the keys of each batch it trains on (with step, epoch and batch
    index) and of each eval batch to output_dir/samples_rank<R>.jsonl. Costs a line per batch."""

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole run, from epochs when given."""
        return self.steps if self.steps is not None else self.epochs * steps_per_epoch

    def check(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("steps", "set exactly one of run.steps and run.epochs")
        for key in ("steps", "epochs", "keep_checkpoints", "log_interval"):
            check_at_least(key, getattr(self, key), 1)
        for key in ("eval_interval", "checkpoint_interval"):
            check_at_least(key, getattr(self, key), 0)
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must lie in [0, 1) (0 turns the EMA off), got {self.ema_decay}")
        if self.ema_warmup and not self.ema_decay:
            raise ConfigError("ema_warmup", "needs run.ema_decay > 0")
        if not self.divergence_loss > 0:
            raise ConfigError("divergence_loss", f"must be positive, got {self.divergence_loss}")
        if not self.resume.strip():
            raise ConfigError("resume", "must be auto, never or a checkpoint directory")
        for key in ("output_dir", "resume"):
            check_path_text(key, getattr(self, key))


@dataclass
class TrackingSection(Section):
    """Where and how the run is recorded in MLflow."""

    enabled: bool = True
    """Record the run in MLflow (rank 0 only); false leaves metrics.jsonl and result.json alone."""
    uri: str | None = None
    """MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    experiment: str = "mutransfer"
    """MLflow experiment, created (tagged as model training) when missing."""
    run_name: str | None = None
    """MLflow run name; None: the output folder's name."""
    parent_run_id: str | None = None
    """Nest the run under this MLflow run (a sweep's trials under the study's run)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra MLflow tags of the run."""
    params: dict[str, str] = field(default_factory=dict)
    """Extra MLflow params of the run (logged as tracking.params.<key>): `mutransfer transfer` records here
    which rule chose the target's lr and what it predicted."""
    log_model: bool | None = None
    """Log the final model as an MLflow model (mlflow.pytorch, torch.export format, with an input example and
    signature; at ZeRO-3 the weights are gathered first). None: for the target of a study
    (tags mutransfer.role=target) and whenever registered_model_name is set."""
    registered_model_name: str | None = None
    """Register the logged model under this name in the MLflow model registry (a new version each run)."""
    system_metrics: bool = True
    """Log MLflow's system metrics (system/cpu_utilization_percentage, system/system_memory_usage_megabytes,
    disk, network, and GPU utilisation and memory where pynvml sees a GPU) at every run.log_interval, on
    rank 0, at the training step."""
    continue_run_id: str | None = None
    """Continue this MLflow run instead of starting one (a sweep's interrupted trial); the steps it already
    holds are not recorded again. A checkpoint's own run id comes first."""
    wait_at_end_s: float = 60.0
    """How long the end of a run waits for a tracking server that stopped answering (what it could not
    record is held and retried meanwhile); after that it says what is missing in MLflow."""
    send_interval_s: float = 5.0
    """How long metric values may wait to go to MLflow together (one request per run at most this often; a
    request to a local sqlite store costs ~10 ms, as much as a small proxy's logging point). Everything held
    is sent before each checkpoint and at the end of the run. 0: every logging point at once."""

    def check(self) -> None:
        if self.log_model is False and self.registered_model_name:
            raise ConfigError("registered_model_name", "is set, but tracking.log_model=false logs no model")
        if not self.wait_at_end_s >= 0:
            raise ConfigError("wait_at_end_s", f"must be >= 0, got {self.wait_at_end_s}")
        if not self.send_interval_s >= 0:
            raise ConfigError("send_interval_s", f"must be >= 0, got {self.send_interval_s}")


@dataclass
class RunConfig(Section):
    """One training run: every section, and the checks that span sections."""

    model: ModelSection = field(default_factory=ModelSection)
    """The model (`ModelSection`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The input pipeline (`mutransfer.data.DataConfig`)."""
    optim: OptimSection = field(default_factory=OptimSection)
    """Optimizer and schedule (`OptimSection`)."""
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    """ZeRO and precision (`DeepSpeedSection`)."""
    run: RunSection = field(default_factory=RunSection)
    """Length, intervals and output (`RunSection`)."""
    tracking: TrackingSection = field(default_factory=TrackingSection)
    """MLflow (`TrackingSection`)."""

    def check(self) -> None:
        if self.run.compile != "off" and self.deepspeed.zero_stage == 3:
            raise ConfigError("run.compile", f"{self.run.compile} is not supported at deepspeed.zero_stage=3 "
                              "(dynamo breaks the graph at ZeRO-3's parameter hooks); use run.compile=off or ZeRO 0-2")
        check_model_fits_data(self)


def check_model_fits_data(cfg: RunConfig) -> None:
    """The constraints between model and data, before any work: the patches must tile the image, and the model
    must build from the config, so that every check its constructor makes is a config error here rather than
    a traceback after the data has loaded."""
    from mutransfer.models import zoo_entry

    patch = cfg.model.patch_size or zoo_entry(cfg.model.name).defaults.get("patch_size")
    if patch and cfg.data.img_size % patch:
        raise ConfigError("data.img_size", f"{cfg.data.img_size} is not divisible by the model's patch_size {patch}")
    kwargs = cfg.model.create_kwargs(cfg.data.img_size, cfg.data.num_classes or 2)
    problem = model_build_problem(cfg.model.name, tuple(sorted(kwargs.items())))
    if problem is not None:
        raise ConfigError("model", problem)


@functools.lru_cache(maxsize=256)
def model_build_problem(name: str, kwargs: tuple[tuple[str, Any], ...]) -> str | None:
    """Why the zoo's `name` does not build from `kwargs`, or None. Built on the meta device without its init
    (no memory; the meta device's init alone took 0.14 s for a depth-16 proxy) and remembered, because every
    trial of a sweep checks its config several times and a shape's trials share one model section."""
    import torch

    from mutransfer.models import create_model

    try:
        with torch.device("meta"):
            create_model(name, weight_init=False, **dict(kwargs))
    except ValueError as err:
        return str(err)
    return None


def check_paths(cfg: RunConfig) -> None:
    """Paths the run reads must exist before any work starts; local shard sets must be complete."""
    check_run_paths(cfg.data, cfg.deepspeed.config, cfg.run.output_dir, cfg.run.resume,
                    sections={f.name for f in dataclasses.fields(RunConfig)})


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """A RunConfig from a plain mapping (as saved with a run), every value checked; paths are not checked."""
    return build_section(RunConfig, raw)


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                check: bool = True) -> RunConfig:
    """Read a YAML run config, apply the command line's dotted overrides, check values and (with `check`)
    paths."""
    raw = read_yaml_mapping(path) if path is not None else {}
    cfg = config_from_dict(apply_overrides(raw, list(overrides)))
    if check:
        check_paths(cfg)
    return cfg


def save_config(cfg: RunConfig, path: str | os.PathLike, header: str = "") -> None:
    """The config in full as YAML (`header`: comment lines written above it)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
