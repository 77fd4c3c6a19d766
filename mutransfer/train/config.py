"""Run configuration: YAML files validated into typed sections, with dotted command-line overrides.

    cfg = load_config("configs/cpu_demo.yaml", ["optim.lr=3e-3", "deepspeed.zero_stage=2"])

Unknown keys, wrong types and missing paths raise ConfigError naming the dotted key, before any work starts
(the entry point turns it into one line on stderr and exit code 2). Numbers read as people write them:
`3e-3`, `1e-05` and `.5` are floats in files and overrides alike (YAML 1.2; PyYAML's 1.1 rules read them
as strings).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mutransfer.data import DataConfig
from mutransfer.data.info import DataError

FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.2's floats (a dot or an exponent; the exponent's sign optional), as well as .inf and .nan
YAML12_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


class NumberLoader(yaml.SafeLoader):
    """yaml.SafeLoader that reads floats by YAML 1.2's rules (its int, bool and null rules are unchanged)."""


NumberLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
NumberLoader.add_implicit_resolver(FLOAT_TAG, YAML12_FLOAT, list("-+0123456789."))  # after int: "3" stays an int


def load_yaml(text: str, where: str = "--config") -> Any:
    """YAML text to Python values with `NumberLoader`; a syntax error is a one-line ConfigError naming
    `where`, the line and the column."""
    try:
        return yaml.load(text, Loader=NumberLoader)  # NumberLoader is a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(where, f"not valid YAML{at}: {problem}") from None


class ConfigError(ValueError):
    """A config problem, with the dotted key it is about."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass
class ModelSection:
    name: str = "vit"
    """Zoo name (`mutransfer models` lists them)."""
    width: int | None = None
    """Embedding width; None keeps the zoo entry's default."""
    depth: int | None = None
    """Number of residual blocks; None keeps the zoo entry's default."""
    head_dim: int | None = None
    patch_size: int | None = None
    mlp_ratio: float | None = None
    parametrization: Literal["sp", "mup", "depth_mup", "completep"] = "depth_mup"
    """The recommended default for ViTs is depth_mup with first_layer_lr_exponent 0.5 (docs/results.md)."""
    alpha: float | None = None
    """Residual exponent; None: 1/2 for depth_mup, 1 for completep."""
    base_width: int | None = None
    base_depth: int | None = None
    readout_multiplier: float | None = None
    first_layer_lr_exponent: float | None = None
    """LR of qkv / fc1 times m_L ** this (docs/parametrizations.md); None: 0.5 for depth_mup, else 0."""
    zero_init: bool | None = None
    """Zero-initialise readout and query weights; None: on for every parametrization but sp."""
    init_std: float | None = None
    """Init std sigma of hidden matrices at the base width (None: 0.02, timm's ViT init); the residual-MLP
    studies use 1/sqrt(base_width), the fan-in init their theory assumes."""
    grad_checkpointing: bool = False
    """Activation checkpointing per block (timm's `set_grad_checkpointing()`): each block's activations are
    recomputed in the backward pass instead of kept, for about one more forward of compute. For ViT-L/H
    at large batches; `benchmarks/grad_checkpointing.py` measures the memory it saves."""

    def create_kwargs(self, img_size: int, num_classes: int) -> dict[str, Any]:
        kwargs = {k: getattr(self, k) for k in (
            "width", "depth", "head_dim", "patch_size", "mlp_ratio", "alpha", "base_width", "base_depth",
            "readout_multiplier", "first_layer_lr_exponent", "init_std")}
        kwargs.update(parametrization=self.parametrization, img_size=img_size, num_classes=num_classes,
                      zero_readout=self.zero_init, zero_query=self.zero_init)
        return {k: v for k, v in kwargs.items() if v is not None}


@dataclass
class OptimSection:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    """Base learning rate eta; each role group gets eta * its lr_scale."""
    momentum: float = 0.9
    """SGD momentum."""
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of each group's own LR."""
    grad_clip: float = 0.0
    """Global grad-norm clip; 0 turns it off (DeepSpeed's own default would clip at 1.0)."""
    accumulation: int = 1
    """Micro-batches per optimizer step."""

    @property
    def momentum_value(self) -> float:
        """The momentum a sweep tunes: SGD momentum or Adam beta1."""
        return self.momentum if self.name == "sgd" else self.beta1


@dataclass
class DeepSpeedSection:
    zero_stage: int = 0
    bf16: bool = False
    offload_optimizer: bool = False
    offload_param: bool = False
    zero3_init: bool = True
    """Build the model under deepspeed.zero.Init at stage 3 (parameters born partitioned)."""
    config: str | None = None
    """Path to a DeepSpeed JSON merged over the generated one (its keys win, except batch sizes)."""


@dataclass
class RunSection:
    steps: int | None = None
    """Optimizer steps to train; exactly one of steps and epochs."""
    epochs: int | None = None
    eval_interval: int = 0
    """Evaluate every N steps (0: only at the end)."""
    checkpoint_interval: int = 0
    """Checkpoint every N steps (0: only at the end and on SIGTERM/SIGINT)."""
    keep_checkpoints: int = 2
    log_interval: int = 10
    seed: int = 0
    output_dir: str = "runs/default"
    resume: str = "auto"
    """auto: continue from the newest checkpoint in output_dir; never: start fresh (refuses a used dir)."""
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
    record_samples: bool = False
    """Debugging aid: every rank appends the keys of each batch it trains on (with step, epoch and batch
    index) and of each eval batch to output_dir/samples_rank<R>.jsonl. Costs a line per batch."""


@dataclass
class TrackingSection:
    enabled: bool = True
    uri: str | None = None
    """MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    experiment: str = "mutransfer"
    run_name: str | None = None
    parent_run_id: str | None = None
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


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    run: RunSection = field(default_factory=RunSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against a type hint; convert lists to tuples and ints to floats where the hint says."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, "must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(key, f"must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, arg) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping, got {value!r}")
        _, value_hint = typing.get_args(hint) or (str, Any)
        return {str(k): str(v) if value_hint is str else v for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    return value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def build_section(cls: type, values: Any, prefix: str) -> Any:
    """A dataclass from a mapping, every value checked against its type hint; errors name the dotted key."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(prefix, f"must be a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(_join(prefix, key), f"unknown key (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_section(hint, value, _join(prefix, name))
        else:
            kwargs[name] = _coerce(_join(prefix, name), value, hint)
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section's own checks (DataConfig.validate) name their field
        message = str(err)
        field_name = next((n for n in sorted(known, key=len, reverse=True) if n in message), None)
        raise ConfigError(_join(prefix, field_name) if field_name else prefix or "config", message) from err


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(text, "an override must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw, key) if raw.strip() else None
    except ConfigError as err:
        raise ConfigError(key, f"cannot parse value {raw!r}") from err
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(".".join(path), f"{part} is not a section")
        node[path[-1]] = value
    return raw


def _local(path: str) -> bool:
    return "://" not in path and not path.startswith("pipe:")


def check_paths(cfg: RunConfig) -> None:
    """Paths the run reads must exist before any work starts; local shard sets must be complete."""
    if cfg.data.shards_dir and _local(cfg.data.shards_dir) and not Path(cfg.data.shards_dir).is_dir():
        raise ConfigError("data.shards_dir", f"no such directory: {cfg.data.shards_dir}")
    check_shard_sets(cfg.data)
    if cfg.deepspeed.config and not Path(cfg.deepspeed.config).is_file():
        raise ConfigError("deepspeed.config", f"no such file: {cfg.deepspeed.config}")
    resume = cfg.run.resume
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        raise ConfigError("run.resume", f"must be auto, never or a checkpoint directory; no such directory: {resume}")
    if resume not in ("auto", "never"):
        from .checkpoint import checkpoint_problem

        problem = checkpoint_problem(Path(resume))
        if problem is not None:
            raise ConfigError("run.resume", f"{resume} is not an intact checkpoint: {problem}")


def check_shard_sets(data: DataConfig) -> None:
    """The local train and eval shard sets: an index that lists the split and every shard it names."""
    from mutransfer.data.shards import shards_from_info, shards_from_pattern

    for pattern_key, split_key in (("train_shards", "train_split"), ("eval_shards", "eval_split")):
        pattern = getattr(data, pattern_key)
        try:
            if pattern is not None:
                if _local(pattern):
                    shards_from_pattern(pattern)
            elif data.shards_dir and _local(data.shards_dir):
                shards_from_info(data.shards_dir, getattr(data, split_key))
        except DataError as err:
            raise ConfigError(f"data.{pattern_key if pattern is not None else 'shards_dir'}", str(err)) from None


def validate(cfg: RunConfig) -> None:
    run, optim, ds = cfg.run, cfg.optim, cfg.deepspeed
    if (run.steps is None) == (run.epochs is None):
        raise ConfigError("run.steps", "set exactly one of run.steps and run.epochs")
    for key, value in (("run.steps", run.steps), ("run.epochs", run.epochs)):
        if value is not None and value < 1:
            raise ConfigError(key, f"must be at least 1, got {value}")
    for key, value in (("run.eval_interval", run.eval_interval), ("run.checkpoint_interval", run.checkpoint_interval),
                       ("optim.warmup_steps", optim.warmup_steps)):
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}")
    for key, value in (("run.keep_checkpoints", run.keep_checkpoints), ("run.log_interval", run.log_interval),
                       ("optim.accumulation", optim.accumulation)):
        if value < 1:
            raise ConfigError(key, f"must be at least 1, got {value}")
    if not optim.lr > 0:
        raise ConfigError("optim.lr", f"must be positive, got {optim.lr}")
    for key in ("momentum", "beta1", "beta2"):
        if not 0 <= getattr(optim, key) < 1:
            raise ConfigError(f"optim.{key}", f"must lie in [0, 1), got {getattr(optim, key)}")
    for key in ("weight_decay", "eps", "grad_clip"):
        if getattr(optim, key) < 0:
            raise ConfigError(f"optim.{key}", f"must be >= 0, got {getattr(optim, key)}")
    if not 0 <= optim.min_lr_ratio <= 1:
        raise ConfigError("optim.min_lr_ratio", f"must lie in [0, 1], got {optim.min_lr_ratio}")
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {ds.zero_stage}")
    if ds.offload_param and ds.zero_stage != 3:
        raise ConfigError("deepspeed.offload_param", "needs deepspeed.zero_stage=3")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer", "needs deepspeed.zero_stage 1, 2 or 3")
    if run.compile != "off" and ds.zero_stage == 3:
        raise ConfigError("run.compile", f"{run.compile} is not supported at deepspeed.zero_stage=3 (dynamo "
                          "breaks the graph at ZeRO-3's parameter hooks); use run.compile=off or ZeRO 0-2")
    if cfg.tracking.log_model is False and cfg.tracking.registered_model_name:
        raise ConfigError("tracking.registered_model_name", "is set, but tracking.log_model=false logs no model")
    if not cfg.tracking.wait_at_end_s >= 0:
        raise ConfigError("tracking.wait_at_end_s", f"must be >= 0, got {cfg.tracking.wait_at_end_s}")
    if not run.divergence_loss > 0:
        raise ConfigError("run.divergence_loss", f"must be positive, got {run.divergence_loss}")
    from mutransfer.models import zoo_entry

    try:
        zoo_entry(cfg.model.name)
    except ValueError as err:
        raise ConfigError("model.name", str(err)) from err


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """A validated RunConfig from a plain mapping (as saved with a run); paths are not checked."""
    cfg = build_section(RunConfig, raw, "")
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                check: bool = True) -> RunConfig:
    """Read a YAML run config, apply dotted overrides, validate types, values and paths."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("--config", f"no such file: {path}")
        raw = load_yaml(path.read_text(), f"--config {path}") or {}
        if not isinstance(raw, dict):
            raise ConfigError("--config", f"{path} must hold a mapping of sections")
    cfg = config_from_dict(apply_overrides(raw, list(overrides)))
    if check:
        check_paths(cfg)
    return cfg


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
