"""Optimizer param groups that carry the parametrization's per-role scales.

The scales live in the param-group dicts as plain keys (`lr_scale`, `wd_scale`, `eps_scale`, `role`,
`names`), never on tensors: ZeRO-3 partitions parameters, FSDP flattens them and torch.compile fakes them,
and all of them drop tensor attributes. A schedule must multiply each group's own base LR
(`base_lr * lr_scale`), which keeps the ratios between groups.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mutransfer.errors import UsageError
from mutransfer.models.parametrization import OPTIMIZERS, Parametrization, ParamInfo, Role


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
        raise ValueError(
            f"{type(model).__name__} is not a mutransfer model: it needs .parametrization, .width, .depth"
        ) from err


def param_groups(
    model: nn.Module,
    optimizer: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
) -> list[dict[str, Any]]:
    """torch param-group dicts, one per (role, first_layer, decay), with scaled lr / weight_decay / eps."""
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    for key, value in (("lr", lr), ("weight_decay", weight_decay), ("eps", eps)):
        if not (value >= 0 and value == value and value != float("inf")):
            raise UsageError(f"{key} must be a finite non-negative number, got {value!r}")
    param, width, depth = _model_shape(model)
    infos = model.param_info()
    groups: dict[str, dict[str, Any]] = {}
    for name, tensor in model.named_parameters():
        if not tensor.requires_grad:
            continue
        info = infos[name]
        label = _group_label(info)
        if label not in groups:
            lr_scale, wd_scale, eps_scale = param.optimizer_scales(info, optimizer, width, depth)
            group: dict[str, Any] = {
                "params": [],
                "names": [],
                "group": label,
                "role": info.role.value,
                "first_layer": info.first_layer,
                "lr": lr * lr_scale,
                "lr_scale": lr_scale,
                "weight_decay": weight_decay * wd_scale,
                "wd_scale": wd_scale,
            }
            if optimizer == "adamw":
                group["eps"] = eps * eps_scale
                group["eps_scale"] = eps_scale
            groups[label] = group
        groups[label]["params"].append(tensor)
        groups[label]["names"].append(name)
    order = {role.value: i for i, role in enumerate(Role)}
    return sorted(groups.values(), key=lambda g: (order[g["role"]], g["group"]))


def build_optimizer(
    model: nn.Module,
    optimizer: str = "adamw",
    lr: float = 1e-3,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    nesterov: bool = False,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """torch AdamW or SGD (with momentum) over `param_groups`.

    `fused=True`: torch's fused kernels (one kernel per step for all tensors; for parameters that step on a
    GPU). Otherwise the foreach implementation (a few multi-tensor kernels per group, on CPU and GPU).
    Both step each group with its own lr / weight_decay / eps, so the per-role scales hold either way.
    """
    groups = param_groups(model, optimizer, lr=lr, weight_decay=weight_decay, eps=eps)
    kernels: dict[str, Any] = {"fused": True} if fused else {"foreach": True}
    if optimizer == "adamw":
        if not all(0 <= b < 1 for b in betas):
            raise UsageError(f"betas must lie in [0, 1), got {betas}")
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kernels)
    if not 0 <= momentum < 1:
        raise UsageError(f"momentum must lie in [0, 1), got {momentum}")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                           **kernels)
