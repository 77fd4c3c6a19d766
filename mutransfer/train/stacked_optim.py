"""The optimizer of a stack of trials: AdamW or SGD with momentum over stacked parameters (one tensor of shape
[K, ...] per parameter, slice k for member k), each member with its own lr, momentum (SGD momentum or Adam's
beta1) and weight decay, each role group with the parametrization's lr / weight-decay / eps scales.

The update is the one a lone trial's DeepSpeed engine applies: DeepSpeed's fp32 gradient clipping (the global
norm of the member's own gradients, clip factor max_norm / (norm + 1e-6) when below 1), then torch's foreach
AdamW / SGD (`models.optim.build_optimizer`), op for op, with each member's scalars computed on the host in
float64 exactly as torch computes them. Where members share a scalar, the same kernel as torch's runs; where
their values differ, the scalar becomes a [K, 1, ...] tensor, and an op that torch fuses (add with alpha,
one rounding) becomes a multiply and an add (two): a difference in the last bit, within float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mutransfer.models.optim import OptimSection, param_groups
from mutransfer.models.parametrization import Optimizer

# each parameter's optimizer state, by optimizer (what a stack member costs in memory beside its weights)
STATE_SLOTS: dict[Optimizer, tuple[str, ...]] = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}


@dataclass(frozen=True)
class StackedGroup:
    """One per-role group of `models.optim.param_groups`: its parameters' names and its scales."""

    label: str
    names: tuple[str, ...]
    lr_scale: float
    wd_scale: float
    eps: float  # Adam's eps times the group's eps scale


@dataclass(frozen=True)
class MemberHypers:
    """What a stack member tunes: base lr, momentum (SGD momentum, or beta1 under AdamW), weight decay."""

    lr: float
    momentum: float
    weight_decay: float


def groups_of(model: torch.nn.Module, optim: OptimSection) -> list[StackedGroup]:
    """The model's per-role groups with their scales (from `param_groups`, so the scales are the lone trial's)."""
    return [StackedGroup(g["group"], tuple(g["names"]), g["lr_scale"], g["wd_scale"], g.get("eps", optim.eps))
            for g in param_groups(model, optim)]


def member_values(values: list[float], likes: list[torch.Tensor]) -> float | list[torch.Tensor]:
    """A python float when every member has the same value (torch's own scalar kernel runs), else one float32
    tensor [K] viewed as [K, 1, ...] for each tensor of `likes`, to broadcast over its member dimension."""
    if all(v == values[0] for v in values):
        return values[0]
    column = torch.tensor(values, dtype=torch.float32, device=likes[0].device)
    return [column.view(-1, *[1] * (like.dim() - 1)) for like in likes]


class StackedOptimizer:
    """AdamW or SGD (`optim.name`; Adam's beta2 from `optim`) over `params` (name -> [K, ...] leaf tensors), in
    `groups`; each member's lr, momentum and weight decay from `hypers`.

    `step(factor)` applies one update with every group's lr at (member lr x lr_scale) x factor, the product
    torch's LambdaLR forms; `group_lrs` gives those lrs for logging. `keep(indices)` drops the other members
    (a diverged one), states included.
    """

    def __init__(self, params: dict[str, torch.Tensor], groups: list[StackedGroup], optim: OptimSection,
                 hypers: list[MemberHypers], grad_clip: float = 0.0) -> None:
        self.params, self.groups = params, groups
        self.hypers, self.beta2, self.grad_clip = list(hypers), optim.beta2, grad_clip
        self.update = {"adamw": self._adamw, "sgd": self._sgd}[optim.name]
        self.steps = 0
        self.state = {n: {slot: torch.zeros_like(p, memory_format=torch.preserve_format)
                          for slot in STATE_SLOTS[optim.name]} for n, p in params.items()}

    def group_lrs(self, member: int, factor: float) -> dict[str, float]:
        return {g.label: (self.hypers[member].lr * g.lr_scale) * factor for g in self.groups}

    @torch.no_grad()
    def step(self, factor: float) -> None:
        if self.grad_clip > 0:
            self._clip()
        self.steps += 1
        for group in self.groups:
            names = [name for name in group.names if self.params[name].grad is not None]
            if names:
                lrs = [(h.lr * group.lr_scale) * factor for h in self.hypers]
                wds = [h.weight_decay * group.wd_scale for h in self.hypers]
                self.update([self.params[n] for n in names], [self.state[n] for n in names], lrs, wds, group)

    # Each update runs torch's per-tensor ops as foreach ops over the group's parameters: the same kernels on
    # each tensor (bit for bit), one Python call per op and group instead of per op and parameter.
    def _adamw(self, params: list[torch.Tensor], states: list[dict[str, torch.Tensor]], lrs: list[float],
               wds: list[float], group: StackedGroup) -> None:
        """torch's `_multi_tensor_adam` (decoupled weight decay, no amsgrad), one member per slice."""
        grads = [param.grad for param in params]
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        if any(wds):
            torch._foreach_mul_(params, member_values([1 - lr * wd for lr, wd in zip(lrs, wds)], params))
        torch._foreach_lerp_(exp_avgs, grads, member_values([1 - h.momentum for h in self.hypers], params))
        torch._foreach_mul_(exp_avg_sqs, self.beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - self.beta2)
        step_size = member_values([(lr / (1 - h.momentum ** float(self.steps))) * -1
                                   for lr, h in zip(lrs, self.hypers)], params)
        bias_correction2_sqrt = (1 - self.beta2 ** float(self.steps)) ** 0.5
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, bias_correction2_sqrt)
        torch._foreach_add_(denoms, group.eps)
        if isinstance(step_size, list):  # addcdiv computes (value * t1) / t2: here value 1 and t1 = step * exp_avg
            torch._foreach_addcdiv_(params, torch._foreach_mul(exp_avgs, step_size), denoms)
        else:
            torch._foreach_addcdiv_(params, exp_avgs, denoms, step_size)

    def _sgd(self, params: list[torch.Tensor], states: list[dict[str, torch.Tensor]], lrs: list[float],
             wds: list[float], group: StackedGroup) -> None:
        """torch's `_multi_tensor_sgd` (coupled weight decay, momentum, no dampening, no nesterov); SGD has no
        eps, so `group` is not read."""
        grads = [param.grad for param in params]
        buffers = [s["momentum_buffer"] for s in states]
        decay = member_values(wds, params)
        if isinstance(decay, list):
            grads = torch._foreach_add(grads, torch._foreach_mul(params, decay))
        elif decay:
            grads = torch._foreach_add(grads, params, alpha=decay)
        # the first step's buffer is the gradient itself: 0 * momentum + grad is exactly that
        torch._foreach_mul_(buffers, member_values([h.momentum for h in self.hypers], params))
        torch._foreach_add_(buffers, grads)
        step = member_values([-lr for lr in lrs], params)
        if isinstance(step, list):
            torch._foreach_add_(params, torch._foreach_mul(buffers, step))
        else:  # torch's own kernel: one rounding
            torch._foreach_add_(params, buffers, alpha=step)

    def _clip(self) -> None:
        """DeepSpeed's `clip_grad_norm_` at ZeRO-0 in fp32, per member: every parameter's gradient norm, their
        root sum of squares, and the factor min(1, max_norm / (norm + 1e-6)) on all the member's gradients."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(g.float().flatten(1), dim=1) for g in grads])
        total = norms.pow(2.0).sum(dim=0).float().pow(0.5)
        coefficient = torch.clamp(torch.full_like(total, self.grad_clip) / (total + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(coefficient.view(-1, *[1] * (grad.dim() - 1)))

    def keep(self, indices: list[int]) -> None:
        """Keep only the members at `indices` (positions in the current stack), parameters and states alike."""
        index = torch.tensor(indices, dtype=torch.long, device=next(iter(self.params.values())).device)
        for name, param in self.params.items():
            self.params[name] = param.detach().index_select(0, index).requires_grad_(param.requires_grad)
            self.state[name] = {slot: value.index_select(0, index) for slot, value in self.state[name].items()}
        self.hypers = [self.hypers[i] for i in indices]
