"""One trial of a study as the sweep plans it: a shape and a grid point, the run config made from them, and
the key that names the trial in MLflow. The store reads the same fields back (`store.Trial.spec`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mutransfer.typed_config import with_values

if TYPE_CHECKING:  # the store reads trials without torch; building a run config needs it
    from mutransfer.train.config import RunConfig


@dataclass(frozen=True)
class TrialSpec:
    """One trial of a study: a shape and a grid point."""

    parametrization: str
    width: int
    depth: int
    lr: float
    momentum: float
    weight_decay: float
    seed: int

    @property
    def point(self) -> tuple[float, float, float]:
        """The grid point: (lr, momentum, weight_decay)."""
        return (self.lr, self.momentum, self.weight_decay)

    @property
    def key(self) -> str:
        return (f"{self.parametrization}_w{self.width}_d{self.depth}_lr{self.lr:.6g}_m{self.momentum:g}"
                f"_wd{self.weight_decay:g}_s{self.seed}")

    def values(self, base: RunConfig) -> dict[str, Any]:
        """The trial's own settings as typed dotted values over `base` (see `typed_config.with_values`)."""
        from mutransfer.models.parametrization import parse_label

        model = {f"model.{key}": value for key, value in parse_label(self.parametrization).items()}
        return {**model, "model.width": self.width, "model.depth": self.depth, "optim.lr": self.lr,
                f"optim.{base.optim.momentum_key}": self.momentum, "optim.weight_decay": self.weight_decay,
                "run.seed": self.seed}

    def run_config(self, base: RunConfig, extra: dict[str, Any] | None = None) -> RunConfig:
        """`base` with this trial's values (and `extra` ones), checked once more as a whole."""
        return with_values(base, {**self.values(base), **(extra or {})})
