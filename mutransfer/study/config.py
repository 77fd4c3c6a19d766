"""A proxy study: which shapes, which grid, which budget. YAML in, typed sections out.

    study:   name, experiment, base_config (a run config), overrides, output_dir, steps, metric
    shapes:  parametrizations x widths x depths (or an explicit `list` of {parametrization, width, depth});
             a parametrization is a label: a name plus knobs, e.g. depth_mup+fle0.5 or depth_mup+alpha0.75
    grid:    lr (list, or {min_log2, max_log2, step}), momentum (SGD momentum or Adam beta1), weight_decay
    seeds:   [0, ...]
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mutransfer.train.config import ConfigError, RunConfig, build_section, load_config, load_yaml

from .store import DEFAULT_METRIC


@dataclass
class StudySection:
    name: str = ""
    experiment: str = "mutransfer"
    base_config: str = ""
    """Run config every trial starts from (path relative to the study file or the working directory)."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides applied to the base config before the trial's own values."""
    output_dir: str = ""
    """Where trial folders go; default runs/studies/<name>."""
    steps: int = 100
    """Budget of every trial, in optimizer steps."""
    metric: str = DEFAULT_METRIC
    target: str | None = None
    """Default target run config for `mutransfer transfer`."""


@dataclass
class ShapeSection:
    parametrizations: list[str] = field(default_factory=lambda: ["mup"])
    widths: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    list: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class GridSection:
    lr: Any = None
    """A list of learning rates, or {min_log2, max_log2, step} for 2**k, k = min_log2 .. max_log2."""
    momentum: list[float] = field(default_factory=lambda: [0.9])
    weight_decay: list[float] = field(default_factory=lambda: [0.0])


@dataclass
class StudyConfig:
    study: StudySection = field(default_factory=StudySection)
    shapes: ShapeSection = field(default_factory=ShapeSection)
    grid: GridSection = field(default_factory=GridSection)
    seeds: list[int] = field(default_factory=lambda: [0])
    source: str = ""  # the file it came from

    @property
    def output_dir(self) -> Path:
        return Path(self.study.output_dir or f"runs/studies/{self.study.name}")

    def lrs(self) -> list[float]:
        return lr_grid(self.grid.lr)

    def shape_list(self) -> list[tuple[str, int, int]]:
        if self.shapes.list:
            return [(str(s["parametrization"]), int(s["width"]), int(s["depth"])) for s in self.shapes.list]
        return list(itertools.product(self.shapes.parametrizations, self.shapes.widths, self.shapes.depths))

    def trials(self) -> list[TrialSpec]:
        return [TrialSpec(p, w, d, lr, m, wd, seed)
                for (p, w, d) in self.shape_list()
                for lr in self.lrs() for m in self.grid.momentum for wd in self.grid.weight_decay
                for seed in self.seeds]

    def base_run_config(self) -> RunConfig:
        return load_config(resolve_path(self.study.base_config, self.source), self.study.overrides, check=False)


@dataclass(frozen=True)
class TrialSpec:
    parametrization: str
    width: int
    depth: int
    lr: float
    momentum: float
    weight_decay: float
    seed: int

    @property
    def key(self) -> str:
        return (f"{self.parametrization}_w{self.width}_d{self.depth}_lr{self.lr:.6g}_m{self.momentum:g}"
                f"_wd{self.weight_decay:g}_s{self.seed}")

    def overrides(self, optimizer: str) -> list[str]:
        from mutransfer.models.parametrization import parse_label

        momentum_key = "optim.momentum" if optimizer == "sgd" else "optim.beta1"
        model = [f"model.{key}={value!r}" if isinstance(value, float) else f"model.{key}={value}"
                 for key, value in parse_label(self.parametrization).items()]
        return [*model, f"model.width={self.width}",
                f"model.depth={self.depth}", f"optim.lr={self.lr!r}", f"{momentum_key}={self.momentum!r}",
                f"optim.weight_decay={self.weight_decay!r}", f"run.seed={self.seed}"]


def lr_grid(spec: Any) -> list[float]:
    if isinstance(spec, dict):
        unknown = set(spec) - {"min_log2", "max_log2", "step"}
        if unknown or not {"min_log2", "max_log2"} <= set(spec):
            raise ConfigError("grid.lr", "a range needs min_log2 and max_log2 (and optionally step)")
        step = float(spec.get("step", 1))
        if step <= 0 or spec["max_log2"] < spec["min_log2"]:
            raise ConfigError("grid.lr", "needs step > 0 and max_log2 >= min_log2")
        count = int(round((spec["max_log2"] - spec["min_log2"]) / step)) + 1
        return [2.0 ** (spec["min_log2"] + i * step) for i in range(count)]
    if isinstance(spec, list) and spec and all(isinstance(v, int | float) and v > 0 for v in spec):
        return sorted(float(v) for v in spec)
    raise ConfigError("grid.lr", f"must be a list of positive learning rates or a log2 range, got {spec!r}")


def resolve_path(path: str, relative_to: str) -> str:
    """A path as given if it exists from the working directory, else relative to the referring file."""
    if not path or os.path.isabs(path) or Path(path).exists() or not relative_to:
        return path
    candidate = Path(relative_to).parent / path
    return str(candidate) if candidate.exists() else path


def load_study(path: str | os.PathLike, overrides: list[str] = ()) -> StudyConfig:
    from mutransfer.train.config import apply_overrides

    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"no such file: {path}")
    raw = load_yaml(path.read_text(), f"--config {path}") or {}
    if not isinstance(raw, dict):
        raise ConfigError("--config", f"{path} must hold a mapping")
    raw = apply_overrides(raw, list(overrides))
    cfg = build_section(StudyConfig, raw, "")
    cfg.source = str(path)
    validate_study(cfg)
    return cfg


def validate_study(cfg: StudyConfig) -> None:
    if not cfg.study.name or not all(c.isalnum() or c in "-_." for c in cfg.study.name):
        raise ConfigError("study.name", f"must be letters, digits, '-', '_' or '.', got {cfg.study.name!r}")
    if not cfg.study.base_config or not Path(resolve_path(cfg.study.base_config, cfg.source)).is_file():
        raise ConfigError("study.base_config", f"no such run config: {cfg.study.base_config!r}")
    if cfg.study.steps < 1:
        raise ConfigError("study.steps", "must be at least 1")
    cfg.lrs()
    if not cfg.shape_list():
        raise ConfigError("shapes", "no proxy shapes: give widths and depths, or a list")
    from mutransfer.models.parametrization import parse_label

    for p, w, d in cfg.shape_list():
        try:
            parse_label(p)
        except ValueError as err:
            raise ConfigError("shapes.parametrizations", str(err)) from None
        if w < 1 or d < 1:
            raise ConfigError("shapes", f"width and depth must be positive, got {w}x{d}")
    for m in cfg.grid.momentum:
        if not 0 <= m < 1:
            raise ConfigError("grid.momentum", f"must lie in [0, 1), got {m}")
    if not cfg.seeds:
        raise ConfigError("seeds", "needs at least one seed")
    cfg.base_run_config()  # the base config itself must be valid
