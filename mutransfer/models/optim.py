"""The optimizer section of a run config (`OptimSection`, `cfg.optim`) and the torch optimizer it builds over
param groups that carry the parametrization's per-role scales.

The section lives here, beside the optimizer it configures, so that every optimizer of the package (a
training run's, a stack's, a coordinate check's) is built from the same typed values; `train.config`
places it in `RunConfig`.

The scales live in the param-group dicts as plain keys (`lr_scale`, `wd_scale`, `eps_scale`, `role`,
`names`), never on tensors: ZeRO-3 partitions parameters, FSDP flattens them and torch.compile fakes them,
and all of them drop tensor attributes. A schedule must multiply each group's own base LR
(`base_lr * lr_scale`), which keeps the ratios between groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mutransfer.errors import ConfigError
from mutransfer.typed_config import Section, check_at_least, check_in_unit_interval

from .parametrization import Optimizer, Parametrization, ParamInfo, Role

Schedule = Literal["cosine", "constant"]

# the field a study's momentum sets under each optimizer
MOMENTUM_KEY: dict[Optimizer, str] = {"adamw": "beta1", "sgd": "momentum"}


@dataclass
class OptimSection(Section):
    """The optimizer, its base hyperparameters (scaled per role by the parametrization) and the LR schedule."""

    name: Optimizer = "adamw"
    """AdamW, or SGD with momentum."""
    lr: float = 1e-3
    """Base learning rate eta; each role group gets eta * its lr_scale."""
    momentum: float = 0.9
    """SGD momentum (the momentum a study tunes under SGD)."""
    beta1: float = 0.9
    """Adam's first-moment decay (the momentum a study tunes under AdamW)."""
    beta2: float = 0.999
    """Adam's second-moment decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 (SGD), scaled per role; norms and biases get none."""
    eps: float = 1e-8
    """Adam's epsilon, scaled per role by the parametrization."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps; give this or warmup_epochs."""
    warmup_epochs: float | None = None
    """Linear warmup over this many epochs, turned into steps once the data's epoch length is known."""
    schedule: Schedule = "cosine"
    """After warmup: cosine decay to min_lr_ratio at the last step, or constant."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of each group's own LR."""
    grad_clip: float = 0.0
    """Global grad-norm clip; 0 turns it off (DeepSpeed's own default would clip at 1.0)."""
    accumulation: int = 1
    """Micro-batches per optimizer step."""

    @property
    def momentum_key(self) -> str:
        """The field a study's momentum sets: `momentum` under SGD, `beta1` under AdamW."""
        return MOMENTUM_KEY[self.name]

    @property
    def momentum_value(self) -> float:
        """The momentum a sweep tunes: SGD momentum or Adam beta1."""
        return getattr(self, self.momentum_key)

    def warmup_steps_for(self, steps_per_epoch: int) -> int:
        """Warmup in optimizer steps, from warmup_epochs when given."""
        if self.warmup_epochs is None:
            return self.warmup_steps
        return round(self.warmup_epochs * steps_per_epoch)

    def check(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError("lr", f"must be a positive number, got {self.lr}")
        for key in ("momentum", "beta1", "beta2"):
            check_in_unit_interval(key, getattr(self, key))
        for key in ("weight_decay", "eps", "grad_clip", "warmup_steps", "warmup_epochs"):
            check_at_least(key, getattr(self, key), 0)
        for key in ("weight_decay", "eps"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(key, f"must be finite, got {getattr(self, key)}")
        if self.warmup_steps and self.warmup_epochs is not None:
            raise ConfigError("warmup_epochs", "give warmup_steps or warmup_epochs, not both")
        check_in_unit_interval("min_lr_ratio", self.min_lr_ratio, closed=True)
        check_at_least("accumulation", self.accumulation, 1)


def _group_label(info: ParamInfo) -> str:
    label = info.role.value
    if info.first_layer:
        label += "/first_layer"
    if not info.decay:
        label += "/no_decay"
    return label


def _model_shape(model: nn.Module) -> tuple[Parametrization, int, int]:
    try:
        return model.parametrization, int(model.width), int(model.depth)
    except AttributeError as err:
        raise TypeError(
            f"{type(model).__name__} is not a mutransfer model: it needs .parametrization, .width, .depth"
        ) from err


def _new_group(info: ParamInfo, label: str, scales: tuple[float, float, float | None],
               optim: OptimSection) -> dict[str, Any]:
    lr_scale, wd_scale, eps_scale = scales
    group: dict[str, Any] = {
        "params": [], "names": [], "group": label, "role": info.role.value, "first_layer": info.first_layer,
        "lr": optim.lr * lr_scale, "lr_scale": lr_scale,
        "weight_decay": optim.weight_decay * wd_scale, "wd_scale": wd_scale,
    }
    if eps_scale is not None:
        group.update(eps=optim.eps * eps_scale, eps_scale=eps_scale)
    return group


def param_groups(model: nn.Module, optim: OptimSection) -> list[dict[str, Any]]:
    """torch param-group dicts, one per (role, first_layer, decay), with scaled lr / weight_decay / eps."""
    param, width, depth = _model_shape(model)
    infos = model.param_info()
    groups: dict[str, dict[str, Any]] = {}
    for name, tensor in model.named_parameters():
        if not tensor.requires_grad:
            continue
        info = infos[name]
        label = _group_label(info)
        if label not in groups:
            scales = param.optimizer_scales(info, optim.name, width, depth)
            groups[label] = _new_group(info, label, scales, optim)
        groups[label]["params"].append(tensor)
        groups[label]["names"].append(name)
    order = {role.value: i for i, role in enumerate(Role)}
    return sorted(groups.values(), key=lambda g: (order[g["role"]], g["group"]))


def _adamw(groups: list[dict[str, Any]], optim: OptimSection, kernels: dict[str, bool]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             weight_decay=optim.weight_decay, **kernels)


def _sgd(groups: list[dict[str, Any]], optim: OptimSection, kernels: dict[str, bool]) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                           **kernels)


TORCH_OPTIMIZERS: dict[Optimizer, Callable[..., torch.optim.Optimizer]] = {"adamw": _adamw, "sgd": _sgd}


def build_optimizer(model: nn.Module, optim: OptimSection, fused: bool = False) -> torch.optim.Optimizer:
    """torch AdamW or SGD (with momentum) over `param_groups`, as `optim` (a checked section) says.

    `fused=True`: torch's fused kernels (one kernel per step for all tensors; for parameters that step on a
    GPU). Otherwise the foreach implementation (a few multi-tensor kernels per group, on CPU and GPU).
    Both step each group with its own lr / weight_decay / eps, so the per-role scales hold either way.
    """
    kernels = {"fused": True} if fused else {"foreach": True}
    return TORCH_OPTIMIZERS[optim.name](param_groups(model, optim), optim, kernels)
