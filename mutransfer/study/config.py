"""A proxy study: which shapes, which grid, which budget. YAML in, typed sections out.

    study:   name, experiment, base_config (a run config), overrides, output_dir, steps, metric
    shapes:  variants x widths x depths x batch_sizes x lengths (or an explicit `list` of shapes); a
             variant is a parametrization plus its knobs, spelled as a label, e.g. depth_mup+fle0.5 or
             depth_mup+alpha0.75 (`parametrizations`, the key's old name, is read as `variants`); a
             batch is global (samples per optimizer step); a length is given in `steps`, `samples` or `epochs`
             (one of them; none: study.steps) and stored as steps (samples / batch, epochs x the split's size
             / batch), each length its own run with its own warmup and decay
    grid:    lr (list, or {min_log2, max_log2, step}), momentum (SGD momentum or Adam beta1), weight_decay
    seeds:   [0, ...]
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mutransfer.errors import ConfigError
from mutransfer.models.parametrization import parse_label
from mutransfer.train.config import RunConfig, load_config
from mutransfer.typed_config import (
    Section,
    apply_overrides,
    build_section,
    check_path_text,
    read_yaml_mapping,
)

from .store import DEFAULT_METRIC
from .trial import Shape, TrialSpec, global_batch, samples_per_epoch


@dataclass
class StudySection(Section):
    """What the study is called, where it is recorded, and what every trial starts from."""

    name: str = ""
    """The study's name: its MLflow tag mutransfer.study and its default output folder."""
    experiment: str = "mutransfer"
    """MLflow experiment of the study's parent run and its trials."""
    base_config: str = ""
    """Run config every trial starts from (path relative to the study file or the working directory)."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides applied to the base config before the trial's own values."""
    output_dir: str = ""
    """Where trial folders go; default runs/studies/<name>."""
    steps: int = 100
    """Budget of every trial, in optimizer steps, unless `shapes` gives lengths."""
    metric: str = DEFAULT_METRIC
    """The metric whose optimum the study looks for (minimised, or maximised for top-1/top-5)."""
    target: str | None = None
    """The target run config `mutransfer demo` transfers to and trains (path relative to the study file or the
    working directory); `mutransfer transfer` takes its target with --target."""

    def check(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name) or set(self.name) == {"."}:
            # dots alone ('.', '..') would name the folder above the studies as the study's output folder
            raise ConfigError("name", f"must be letters, digits, '-', '_' or '.' (not dots alone), got {self.name!r}")
        if not self.base_config:
            raise ConfigError("base_config", "is required: the run config every trial starts from")
        if self.steps < 1:
            raise ConfigError("steps", f"must be at least 1, got {self.steps}")
        for key in ("base_config", "output_dir"):
            check_path_text(key, getattr(self, key))


LENGTH_UNITS = ("steps", "samples", "epochs")
SHAPE_KEYS = {"variant", "width", "depth", "batch_size", *LENGTH_UNITS}
OLD_NAMES = {"parametrizations": "variants", "parametrization": "variant"}
"""Keys studies written before the rename still use: read under their new names."""


@dataclass
class ShapeSection(Section):
    """The proxy shapes: variants x widths x depths x batch sizes x lengths, or an explicit list."""

    variants: list[str] = field(default_factory=lambda: ["mup"])
    """Variants: a parametrization plus its knobs, e.g. depth_mup+fle0.5 or depth_mup+alpha0.75."""
    widths: list[int] = field(default_factory=list)
    """Proxy widths (every variant x width x depth x batch x length is a shape)."""
    depths: list[int] = field(default_factory=list)
    """Proxy depths."""
    batch_sizes: list[int] = field(default_factory=list)
    """Global batches (samples per optimizer step); empty: the base config's data.batch_size x accumulation."""
    steps: list[int] = field(default_factory=list)
    """Training lengths in optimizer steps (give at most one of steps, samples, epochs; none: study.steps)."""
    samples: list[int] = field(default_factory=list)
    """Training lengths in samples; each must be a multiple of every batch size."""
    epochs: list[float] = field(default_factory=list)
    """Training lengths in epochs of the base config's training split (rounded to whole steps)."""
    list: list[dict[str, Any]] = field(default_factory=list)
    """Explicit shapes, each {variant, width, depth} and optionally batch_size and one of steps,
    samples, epochs, instead of the product above."""

    def length_unit(self) -> str | None:
        given = [unit for unit in LENGTH_UNITS if getattr(self, unit)]
        return given[0] if given else None

    def check(self) -> None:
        if len([unit for unit in LENGTH_UNITS if getattr(self, unit)]) > 1:
            raise ConfigError("steps", "give the lengths in one unit: steps, samples or epochs")
        for item in self.list:
            if (not isinstance(item, dict) or not {"variant", "width", "depth"} <= set(item)
                    or not set(item) <= SHAPE_KEYS or len(set(item) & set(LENGTH_UNITS)) > 1):
                raise ConfigError("list", "each shape needs variant, width and depth, and may give "
                                  f"batch_size and one of steps, samples, epochs; got {item!r}")
        if not self.list and not (self.widths and self.depths):
            raise ConfigError("widths", "no proxy shapes: give widths and depths, or a list")
        for variant in {str(s["variant"]) for s in self.list} | set(self.variants if not self.list else ()):
            try:
                parse_label(variant)
            except ValueError as err:
                raise ConfigError("variants", str(err)) from None
        sizes = [*self.widths, *self.depths, *self.batch_sizes, *self.steps, *self.samples]
        sizes += [s[k] for s in self.list for k in ("width", "depth", "batch_size", "steps", "samples") if k in s]
        if any(not isinstance(v, int) or v < 1 for v in sizes) or any(not e > 0 for e in self.epochs):
            raise ConfigError("widths", "widths, depths, batch sizes and lengths must be positive (whole numbers "
                              "but epochs)")

    def shapes(self, base: RunConfig, default_steps: int) -> list[Shape]:
        """Every shape, lengths turned into steps for each batch (ConfigError where they do not divide)."""
        default_batch = global_batch(base)
        if self.list:
            return [_shape(base, str(s["variant"]), int(s["width"]), int(s["depth"]),
                           int(s.get("batch_size", default_batch)),
                           next(((u, s[u]) for u in LENGTH_UNITS if u in s), ("steps", default_steps)))
                    for s in self.list]
        unit = self.length_unit()
        lengths = [(unit, v) for v in getattr(self, unit)] if unit else [("steps", default_steps)]
        return [_shape(base, variant, width, depth, batch, length) for variant, width, depth, batch, length in
                itertools.product(self.variants, self.widths, self.depths,
                                  self.batch_sizes or [default_batch], lengths)]


def _shape(base: RunConfig, variant: str, width: int, depth: int, batch: int, length: tuple[str, float]) -> Shape:
    """One shape with its length in steps: samples / batch (exact), epochs x the split's size / batch (rounded)."""
    unit, value = length
    if unit == "steps":
        steps = int(value)
    elif unit == "samples":
        if value % batch:
            raise ConfigError("shapes.samples", f"{value} samples is not a whole number of batches of {batch}")
        steps = int(value) // batch
    else:
        steps = max(1, round(value * samples_per_epoch(base) / batch))
    return Shape(variant, width, depth, batch, steps)


@dataclass
class GridSection(Section):
    """The hyperparameters every shape is swept over."""

    lr: list[float] | dict[str, float] | None = None
    """A list of learning rates, or {min_log2, max_log2, step} for 2**k, k = min_log2 .. max_log2."""
    momentum: list[float] = field(default_factory=lambda: [0.9])
    """SGD momentum or Adam beta1 values (whichever the base config's optimizer uses)."""
    weight_decay: list[float] = field(default_factory=lambda: [0.0])
    """Weight-decay values."""

    def lrs(self) -> list[float]:
        return lr_grid(self.lr)

    def check(self) -> None:
        self.lrs()
        for m in self.momentum:
            if not 0 <= m < 1:
                raise ConfigError("momentum", f"must lie in [0, 1), got {m}")
        for wd in self.weight_decay:
            if wd < 0:
                raise ConfigError("weight_decay", f"must be >= 0, got {wd}")


@dataclass
class StudyConfig(Section):
    """A proxy study. `load_study` reads it and its base run config (once); `trials()` lists its trials."""

    study: StudySection = field(default_factory=StudySection)
    """Name, recording, base config and budget (`StudySection`)."""
    shapes: ShapeSection = field(default_factory=ShapeSection)
    """The proxy shapes (`ShapeSection`)."""
    grid: GridSection = field(default_factory=GridSection)
    """The hyperparameter grid (`GridSection`)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds of every grid point (run.seed)."""
    source: str = field(default="", init=False)
    """The file it was read from."""
    base: RunConfig | None = field(default=None, init=False, repr=False)
    """The base run config with the study's overrides, read once by `load_study`."""

    def check(self) -> None:
        if not self.seeds:
            raise ConfigError("seeds", "needs at least one seed")

    @property
    def output_dir(self) -> Path:
        return Path(self.study.output_dir or f"runs/studies/{self.study.name}")

    def lrs(self) -> list[float]:
        return self.grid.lrs()

    def shape_list(self) -> list[Shape]:
        return self.shapes.shapes(self.base_run_config(), self.study.steps)

    def trials(self) -> list[TrialSpec]:
        return [TrialSpec(*shape, lr=lr, momentum=m, weight_decay=wd, seed=seed)
                for shape in self.shape_list()
                for lr in self.lrs() for m in self.grid.momentum for wd in self.grid.weight_decay
                for seed in self.seeds]

    def base_run_config(self) -> RunConfig:
        if self.base is None:
            raise ValueError("the study's base run config is read by load_study")
        return self.base


def lr_grid(spec: Any) -> list[float]:
    if isinstance(spec, dict):
        unknown = set(spec) - {"min_log2", "max_log2", "step"}
        if unknown or not {"min_log2", "max_log2"} <= set(spec):
            raise ConfigError("lr", "a range needs min_log2 and max_log2 (and optionally step)")
        step = float(spec.get("step", 1))
        if step <= 0 or spec["max_log2"] < spec["min_log2"]:
            raise ConfigError("lr", "needs step > 0 and max_log2 >= min_log2")
        count = int(round((spec["max_log2"] - spec["min_log2"]) / step)) + 1
        return [2.0 ** (spec["min_log2"] + i * step) for i in range(count)]
    if isinstance(spec, list) and spec and all(v > 0 for v in spec):
        return sorted(float(v) for v in spec)
    raise ConfigError("lr", f"must be a list of positive learning rates or a log2 range, got {spec!r}")


def resolve_path(path: str, relative_to: str) -> str:
    """A path as given if it exists from the working directory, else relative to the referring file."""
    if not path or os.path.isabs(path) or Path(path).exists() or not relative_to:
        return path
    candidate = Path(relative_to).parent / path
    return str(candidate) if candidate.exists() else path


def _renamed_shape_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with the shapes section's old key names (`OLD_NAMES`) under their new ones, in the section and in
    each explicit shape; a section that gives a key under both names is an error."""
    shapes = raw.get("shapes")
    if not isinstance(shapes, dict):
        return raw  # build_section names what is wrong with it
    shapes = _renamed(shapes, "shapes")
    if isinstance(shapes.get("list"), list):
        shapes["list"] = [_renamed(item, "shapes.list") if isinstance(item, dict) else item for item in shapes["list"]]
    return {**raw, "shapes": shapes}


def _renamed(values: dict[str, Any], where: str) -> dict[str, Any]:
    out = dict(values)
    for old, new in OLD_NAMES.items():
        if old in out:
            if new in out:
                raise ConfigError(f"{where}.{old}", f"is the old name of {new}: give one of them")
            out[new] = out.pop(old)
    return out



def _renamed_override(override: str) -> str:
    """`shapes.parametrizations=[mup]` as `shapes.variants=[mup]`; any other override as it is."""
    key, sep, value = override.partition("=")
    head, _, rest = key.strip().partition(".")
    if head == "shapes" and rest in OLD_NAMES:
        return f"shapes.{OLD_NAMES[rest]}{sep}{value}"
    return override


def load_study(path: str | os.PathLike, overrides: list[str] = ()) -> StudyConfig:
    """A study from YAML with the command line's dotted overrides; its base run config is read and checked
    here, once."""
    raw = apply_overrides(_renamed_shape_keys(read_yaml_mapping(path)), [_renamed_override(o) for o in overrides])
    cfg = build_section(StudyConfig, raw)
    cfg.source = str(path)
    base_path = resolve_path(cfg.study.base_config, cfg.source)
    if not Path(base_path).is_file():
        raise ConfigError("study.base_config", f"no such run config: {cfg.study.base_config!r}")
    cfg.base = load_config(base_path, cfg.study.overrides, check=False)
    cfg.shape_list()  # lengths that do not divide into batches, or epochs of unknown size, fail here
    return cfg
