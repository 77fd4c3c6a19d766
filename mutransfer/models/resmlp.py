"""Residual MLP on flattened images: the seeds' theory setting, fast on CPU.

Blocks are one-layer, x <- x + m * W phi(x), or two-layer, x <- x + m * W2 phi(W1 x), with the branch
multiplier m = m_L ** -alpha. The two-layer form is where the NFD paper (arXiv 2512.21075) finds the first layer's feature learning
collapsing with depth under alpha = 1/2, and what `first_layer_lr_exponent` corrects.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp, trunc_normal_
from torch import nn

from mutransfer.errors import UsageError

from .layers import (
    Readout,
    block_linear_info,
    collect_param_info,
    init_block_linear,
    init_norm,
    init_readout,
    norm_info,
    prefixed,
    require_positive_ints,
)
from .parametrization import Parametrization, ParamInfo, Role, resolve_parametrization


class ResidualMLPBlock(nn.Module):
    def __init__(self, width: int, layers: int, branch_multiplier: float, mlp_ratio: float = 1.0) -> None:
        super().__init__()
        if layers not in (1, 2):
            raise UsageError(f"block_layers must be 1 or 2, got {layers}")
        self.layers = layers
        self.branch_multiplier = float(branch_multiplier)
        if layers == 1:
            self.act = nn.ReLU()
            self.fc = nn.Linear(width, width)
        else:
            self.mlp = Mlp(width, hidden_features=int(width * mlp_ratio), act_layer=nn.ReLU)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(x)) if self.layers == 1 else self.mlp(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(x, self.branch(x), alpha=self.branch_multiplier)

    def linears(self) -> list[nn.Linear]:
        return [self.fc] if self.layers == 1 else [self.mlp.fc1, self.mlp.fc2]

    def own_param_info(self) -> dict[str, ParamInfo]:
        if self.layers == 1:
            return prefixed("fc", block_linear_info(first_layer=False))
        return {
            **prefixed("mlp.fc1", block_linear_info(first_layer=True)),
            **prefixed("mlp.fc2", block_linear_info(first_layer=False)),
        }


class ResidualMLP(nn.Module):
    def __init__(
        self,
        *,
        img_size: int = 32,
        in_chans: int = 3,
        num_classes: int = 10,
        width: int = 256,
        depth: int = 8,
        block_layers: int = 2,
        mlp_ratio: float = 1.0,
        parametrization: str | Parametrization | None = None,
        base_width: int | None = None,
        base_depth: int | None = None,
        weight_init: bool = True,
        **parametrization_overrides,
    ) -> None:
        """`weight_init=False` leaves parameters as torch made them, for callers that initialise later
        (under ZeRO-3, parameters are partitioned at construction and init_weights must run gathered)."""
        super().__init__()
        require_positive_ints(width=width, depth=depth, img_size=img_size, num_classes=num_classes,
                              in_chans=in_chans)
        self.parametrization: Parametrization = resolve_parametrization(
            parametrization, base_width=base_width, base_depth=base_depth, **parametrization_overrides
        )
        param = self.parametrization
        self.width, self.depth, self.num_classes, self.img_size = width, depth, num_classes, img_size
        self.stem = nn.Linear(in_chans * img_size * img_size, width)
        self.blocks = nn.ModuleList(
            ResidualMLPBlock(width, block_layers, param.branch_multiplier(depth), mlp_ratio) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = Readout(width, num_classes, multiplier=param.readout_scale(width))
        if weight_init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        param, width = self.parametrization, self.width
        trunc_normal_(self.stem.weight, std=param.init_std_for(Role.INPUT, width))
        nn.init.zeros_(self.stem.bias)
        hidden_std = param.init_std_for(Role.HIDDEN, width)
        for block in self.blocks:
            for linear in block.linears():
                init_block_linear(linear, hidden_std)
        init_norm(self.norm)
        init_readout(self.head, param, width)

    def own_param_info(self) -> dict[str, ParamInfo]:
        return {
            "stem.weight": ParamInfo(Role.INPUT, decay=True),
            "stem.bias": ParamInfo(Role.INPUT, decay=False),
            **prefixed("norm", norm_info(Role.VECTOR)),
        }

    def param_info(self) -> dict[str, ParamInfo]:
        return collect_param_info(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.flatten(1))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
