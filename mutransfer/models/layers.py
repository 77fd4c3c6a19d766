"""Building blocks shared by the ViT and the residual-MLP testbed.

Each module that owns parameters declares their roles with `own_param_info()` (names relative to itself);
`collect_param_info(model)` gathers them for the whole model. Roles are declared by the model code, never
guessed from shapes: under ZeRO-3 every parameter is shape (0,) and a shape rule would call it a vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

from mutransfer.errors import UsageError

from .parametrization import Parametrization, ParamInfo, Role


def require_positive_ints(**values: object) -> None:
    """Constructor argument check: each value must be an int >= 1, else ValueError naming it."""
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"{key} must be a positive integer, got {value!r}")


class Readout(nn.Linear):
    """The classification head: y = multiplier * (x W^T) + b, with multiplier alpha_out / m_N."""

    def __init__(self, in_features: int, out_features: int, multiplier: float = 1.0) -> None:
        super().__init__(in_features, out_features)
        self.multiplier = float(multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # one fused kernel: bias + multiplier * x @ W^T
            return torch.addmm(self.bias, x, self.weight.t(), alpha=self.multiplier)
        return F.linear(x, self.weight) * self.multiplier + self.bias

    def own_param_info(self) -> dict[str, ParamInfo]:
        return {
            "weight": ParamInfo(Role.READOUT, decay=True),
            "bias": ParamInfo(Role.READOUT_BIAS, decay=False),
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, multiplier={self.multiplier:g}"


class Attention(nn.Module):
    """Multi-head self-attention through SDPA with the parametrization's logit scale. `sdpa` is the attention
    kernel's entry point (a stack of models under vmap puts one with a batching rule there)."""

    sdpa = staticmethod(F.scaled_dot_product_attention)

    def __init__(self, dim: int, head_dim: int, scale: float, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % head_dim:
            raise UsageError(f"width {dim} is not divisible by head_dim {head_dim}")
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.scale = float(scale)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """The attention output of every token, or of the first `queries` tokens only (all of them still
        serve as keys and values)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if queries is not None:
            q = q[:, :, :queries]
        x = self.sdpa(q, k, v, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(batch, q.shape[2], dim))


def block_linear_info(first_layer: bool) -> dict[str, ParamInfo]:
    """A linear layer inside a residual branch: hidden weight, in-block bias."""
    return {
        "weight": ParamInfo(Role.HIDDEN, decay=True, first_layer=first_layer),
        "bias": ParamInfo(Role.BLOCK_VECTOR, decay=False, first_layer=first_layer),
    }


def norm_info(role: Role) -> dict[str, ParamInfo]:
    return {"weight": ParamInfo(role, decay=False), "bias": ParamInfo(role, decay=False)}


def prefixed(prefix: str, info: dict[str, ParamInfo]) -> dict[str, ParamInfo]:
    return {f"{prefix}.{name}": value for name, value in info.items()}


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth per block, timm's rule: rising linearly from 0 at the first block to `rate` at the
    last (torch.linspace(0, rate, depth) in timm's VisionTransformer)."""
    if not 0 <= rate < 1:
        raise ValueError(f"drop_path_rate must lie in [0, 1), got {rate}")
    return [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


def drop_path_layer(rate: float) -> nn.Module:
    """timm's DropPath (a per-sample mask, kept branches divided by 1 - rate; identity in eval mode), or
    nn.Identity at rate 0, as timm builds it: no RNG draw, the forward of a model without drop path."""
    return DropPath(rate) if rate > 0 else nn.Identity()


class TransformerBlock(nn.Module):
    """Pre-LN block; each residual branch is scaled by m_L ** -alpha (1 at base depth and under sp/mup).

    With stochastic depth, a branch is x <- x + m * (mask / (1 - p)) * F(x): the keep-rescale multiplies the
    branch multiplier, so the branch keeps its mean, and its extra variance over the L blocks sums to
    L * m ** 2 * p / (1 - p) = m_L ** (1 - 2 alpha) * p / (1 - p) times a branch's (docs/parametrizations.md)."""

    def __init__(
        self, dim: int, head_dim: int, mlp_ratio: float, attn_scale: float, branch_multiplier: float,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, head_dim, attn_scale)
        self.drop_path1 = drop_path_layer(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path2 = drop_path_layer(drop_path)
        self.branch_multiplier = float(branch_multiplier)

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """The block's output for every token, or for the first `queries` tokens only (each token's output
        past attention depends on that token alone, so the others need not be computed)."""
        branch = self.drop_path1(self.attn(self.norm1(x), queries))
        if queries is not None:
            x = x[:, :queries]
        # add(..., alpha=m) fuses the branch multiplier into the residual add: no extra kernel
        x = torch.add(x, branch, alpha=self.branch_multiplier)
        return torch.add(x, self.drop_path2(self.mlp(self.norm2(x))), alpha=self.branch_multiplier)

    def own_param_info(self) -> dict[str, ParamInfo]:
        return {
            **prefixed("norm1", norm_info(Role.BLOCK_VECTOR)),
            **prefixed("attn.qkv", block_linear_info(first_layer=True)),
            **prefixed("attn.proj", block_linear_info(first_layer=False)),
            **prefixed("norm2", norm_info(Role.BLOCK_VECTOR)),
            **prefixed("mlp.fc1", block_linear_info(first_layer=True)),
            **prefixed("mlp.fc2", block_linear_info(first_layer=False)),
        }


def collect_param_info(model: nn.Module) -> dict[str, ParamInfo]:
    """Every parameter's declared ParamInfo, keyed by its name in `model.named_parameters()`."""
    info: dict[str, ParamInfo] = {}
    for module_name, module in model.named_modules():
        declare = getattr(module, "own_param_info", None)
        if declare is None:
            continue
        for name, value in declare().items():
            info[f"{module_name}.{name}" if module_name else name] = value
    names = [name for name, _ in model.named_parameters()]
    missing = [name for name in names if name not in info]
    if missing:
        raise ValueError(f"{type(model).__name__} declares no role for parameters: {', '.join(missing)}")
    return {name: info[name] for name in names}


def init_block_linear(linear: nn.Linear, std: float) -> None:
    trunc_normal_(linear.weight, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def init_readout(head: Readout, param: Parametrization, width: int) -> None:
    if param.zero_readout:
        nn.init.zeros_(head.weight)
    else:
        trunc_normal_(head.weight, std=param.init_std_for(Role.READOUT, width))
    nn.init.zeros_(head.bias)


def init_norm(norm: nn.LayerNorm) -> None:
    nn.init.ones_(norm.weight)
    nn.init.zeros_(norm.bias)
