"""One trial of a study as the sweep plans it: a shape and a grid point, the run config made from them, and
the key that names the trial in MLflow. The store reads the same fields back (`store.Trial.spec`).

A shape is everything a trial is trained as except its grid point and seed: the variant (a parametrization
with its knobs, spelled as a label such as `depth_mup+fle0.5`; see `models.parametrization.parse_label`), the
model's width and depth, the global batch (samples per optimizer step, over accumulation and ranks) and the
training length in optimizer steps (its canonical form; `Shape.samples` is steps x batch). Each length is
its own run with its own schedule: warmup, then decay to the end of its own steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, NamedTuple

from mutransfer import tags
from mutransfer.typed_config import with_values

if TYPE_CHECKING:  # the store reads trials without torch; building a run config needs it
    from mutransfer.train.config import RunConfig


class Shape(NamedTuple):
    """What a trial is trained as, apart from its grid point and seed; trials of one shape form a stack."""

    variant: str
    width: int
    depth: int
    batch_size: int
    """Global batch: samples per optimizer step (per-rank batch x accumulation x ranks)."""
    steps: int
    """Training length in optimizer steps."""

    @property
    def samples(self) -> int:
        """Training length in samples: steps x global batch."""
        return self.steps * self.batch_size


@dataclass(frozen=True)
class TrialSpec:
    """One trial of a study: a shape and a grid point."""

    variant: str
    width: int
    depth: int
    batch_size: int
    steps: int
    lr: float
    momentum: float
    weight_decay: float
    seed: int

    @classmethod
    def from_identity(cls, values: Any) -> TrialSpec:
        """The spec a run's `mutransfer.trial` tag holds (parsed JSON): every field present, of its type, with
        a value a trial can have; ValueError naming the first that is not. Nothing is filled in."""
        if not isinstance(values, dict):
            raise ValueError(f"not a JSON object: {values!r}")
        names = [f.name for f in fields(cls)]
        missing, unknown = [n for n in names if n not in values], sorted(set(values) - set(names))
        if missing or unknown:
            raise ValueError(f"missing {missing}" if missing else f"unknown {unknown}")
        for name in names:
            problem = _identity_problem(name, values[name])
            if problem:
                raise ValueError(f"{name} {values[name]!r} {problem}")
        return cls(**{name: float(values[name]) if name in FLOAT_FIELDS else values[name] for name in names})

    def identity_tags(self) -> dict[str, str]:
        """This trial as a run's identity tags (`tags.identity_tags`)."""
        return tags.identity_tags(asdict(self))

    @property
    def shape(self) -> Shape:
        """Every field but the grid point and the seed."""
        return Shape(self.variant, self.width, self.depth, self.batch_size, self.steps)

    @property
    def point(self) -> tuple[float, float, float]:
        """The grid point: (lr, momentum, weight_decay)."""
        return (self.lr, self.momentum, self.weight_decay)

    @property
    def key(self) -> str:
        return (f"{self.variant}_w{self.width}_d{self.depth}_b{self.batch_size}_t{self.steps}"
                f"_lr{self.lr:.6g}_m{self.momentum:g}_wd{self.weight_decay:g}_s{self.seed}")

    def values(self, base: RunConfig, ranks: int = 1) -> dict[str, Any]:
        """The trial's own settings as typed dotted values over `base` (see `typed_config.with_values`); the
        global batch is split over `ranks` and the base config's accumulation."""
        from mutransfer.models.parametrization import parse_label

        model = {f"model.{key}": value for key, value in parse_label(self.variant).items()}
        return {**model, "model.width": self.width, "model.depth": self.depth, "optim.lr": self.lr,
                f"optim.{base.optim.momentum_key}": self.momentum, "optim.weight_decay": self.weight_decay,
                "run.seed": self.seed, "data.batch_size": per_rank_batch(self.batch_size, base, ranks),
                "run.steps": self.steps, "run.epochs": None}

    def run_config(self, base: RunConfig, extra: dict[str, Any] | None = None, ranks: int = 1) -> RunConfig:
        """`base` with this trial's values (and `extra` ones), checked once more as a whole."""
        return with_values(base, {**self.values(base, ranks), **(extra or {})})


FLOAT_FIELDS = ("lr", "momentum", "weight_decay")
SIZE_FIELDS = ("width", "depth", "batch_size", "steps")


def _identity_problem(name: str, value: Any) -> str:
    """Why `value` cannot be the TrialSpec field `name` ('' when it can)."""
    if name == "variant":
        return "" if isinstance(value, str) and value else "is not a variant's label"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "is not a number"
    if name in FLOAT_FIELDS:
        valid = {"lr": lambda v: v > 0, "momentum": lambda v: 0 <= v < 1, "weight_decay": lambda v: v >= 0}[name]
        return "" if math.isfinite(value) and valid(value) else "is out of range"
    if not isinstance(value, int):
        return "is not a whole number"
    return "is not positive" if name in SIZE_FIELDS and value < 1 else ""


def global_batch(cfg: RunConfig, ranks: int = 1) -> int:
    """Samples per optimizer step of a run config on `ranks` data-parallel ranks."""
    return cfg.data.batch_size * cfg.optim.accumulation * ranks


def per_rank_batch(batch_size: int, base: RunConfig, ranks: int = 1) -> int:
    """data.batch_size that makes a global batch of `batch_size` with the base's accumulation on `ranks` ranks."""
    from mutransfer.errors import ConfigError

    split = base.optim.accumulation * ranks
    if batch_size % split:
        raise ConfigError("shapes.batch_sizes", f"batch {batch_size} does not split over accumulation "
                          f"{base.optim.accumulation} x {ranks} rank(s)")
    return batch_size // split


def samples_per_epoch(cfg: RunConfig) -> int:
    """Training samples in one epoch of a run config's data: data.train_num_samples, else the train split's
    size in the shards' _info.json. ConfigError when neither gives it."""
    from mutransfer.data.info import DataError, read_info
    from mutransfer.errors import ConfigError

    if cfg.data.train_num_samples:
        return cfg.data.train_num_samples
    try:
        return read_info(cfg.data.shards_dir).split(cfg.data.train_split).num_samples
    except (DataError, OSError, TypeError) as err:
        raise ConfigError("data.train_num_samples", f"a length in epochs needs the training split's size: set "
                          f"data.train_num_samples or give shards with an _info.json ({err})") from None


def run_steps(cfg: RunConfig, ranks: int = 1) -> int:
    """Optimizer steps a run config trains on `ranks` ranks: run.steps, or run.epochs x steps per epoch as the
    trainer counts them (batches per rank per epoch over accumulation)."""
    if cfg.run.steps is not None:
        return cfg.run.steps
    batches = cfg.data.batches_per_epoch or max(1, samples_per_epoch(cfg) // (cfg.data.batch_size * ranks))
    return cfg.run.epochs * max(1, batches // cfg.optim.accumulation)
