"""Parametrizations that make hyperparameters transfer across width and depth.

Every scaling rule lives in ONE table, `RULES`, keyed by the role a parameter plays (see `Role`). A rule
entry is a `Powers`: the product m_N ** width * m_L ** (depth + depth_per_alpha * alpha), where
m_N = width / base_width, m_L = depth / base_depth and alpha is the residual-branch exponent (each branch is
x <- x + m_L ** -alpha * F(x)). The table of docs/parametrizations.md written as data:

    role           init std      forward mult     AdamW LR               SGD LR
    input          sigma         1                eta                    eta * m_N
    hidden         sigma/sqrt(mN) 1               eta/m_N * m_L^(a-1)    eta * m_L^(2a-1)
    block_vector   as SP         1                eta * m_L^(a-1)        eta * m_N * m_L^(2a-1)
    vector         as SP         1                eta                    eta * m_N
    readout        zero|sigma    alpha_out / m_N  eta                    eta * m_N
    readout_bias   zero          1                eta                    eta

How the named parametrizations read the table (docs/parametrizations.md):
- sp: m_N = m_L = 1 (no multipliers, one LR for all, attention 1/sqrt(d_head)).
- mup: alpha = 0 and m_L = 1 (Tensor Programs V); attention sqrt(d_base_head) / d_head; zero readout, query.
- depth_mup: alpha = 1/2 (Tensor Programs VI, Bordelon et al. 2023).
- completep: alpha = 1 (Dey et al. 2025).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Literal, get_args

from mutransfer.errors import UsageError


class Role(str, Enum):
    """What a parameter does in the network; decides its init, multiplier, LR, weight decay and eps."""

    INPUT = "input"  # patch embedding, pos_embed, cls token: fan-in fixed as width grows
    HIDDEN = "hidden"  # matrices inside residual blocks: fan-in and fan-out grow with width
    BLOCK_VECTOR = "block_vector"  # biases and LayerNorm gains inside residual blocks
    VECTOR = "vector"  # vectors outside blocks (the final LayerNorm)
    READOUT = "readout"  # classification head weight
    READOUT_BIAS = "readout_bias"  # classification head bias


IN_BLOCK_ROLES = frozenset({Role.HIDDEN, Role.BLOCK_VECTOR})


@dataclass(frozen=True)
class Powers:
    """A rule's factor as the powers of the width and depth multipliers it is made of:
    m_N ** width * m_L ** (depth + depth_per_alpha * alpha). `Powers(width=-1)` is 1 / m_N."""

    width: float = 0.0
    depth: float = 0.0
    depth_per_alpha: float = 0.0

    def __call__(self, m_width: float, m_depth: float, alpha: float) -> float:
        return m_width**self.width * m_depth ** (self.depth + self.depth_per_alpha * alpha)


ONE = Powers()


Optimizer = Literal["adamw", "sgd"]
OPTIMIZERS: tuple[Optimizer, ...] = get_args(Optimizer)


@dataclass(frozen=True)
class OptimizerRule:
    """An optimizer's entries in one row: each multiplies the base value (eta, lambda, eps)."""

    lr: Powers
    weight_decay: Powers
    eps: Powers | None = None  # None: the optimizer has no eps (SGD)


@dataclass(frozen=True)
class RoleRule:
    """One row of the table: init std and forward multiplier (times sigma and 1), and per optimizer its
    lr / weight-decay / eps entries. A new optimizer is a new key in every row's `optimizers`."""

    init_std: Powers
    multiplier: Powers
    optimizers: dict[Optimizer, OptimizerRule]


# Weight decay (torch's coupled form, applied as lr * wd * w): AdamW's hidden weights get
# lambda * m_N so that lr * wd does not change with width. We apply the same principle to every other row,
# so each role's wd scale is the inverse of the width part of its LR scale (for SGD too, where the papers are
# silent). Depth is left out of wd on purpose.
# AdamW eps inside blocks follows the gradient's size there: eps * m_N^-1 * m_L^-alpha (CompleteP Table 1).
IN_BLOCK_EPS = Powers(width=-1, depth_per_alpha=-1)
# input, vector and readout (outside the blocks, fan-in fixed or a vector): AdamW as SP, SGD lr x m_N
OUTSIDE_BLOCKS = {"adamw": OptimizerRule(lr=ONE, weight_decay=ONE, eps=ONE),
                  "sgd": OptimizerRule(lr=Powers(width=1), weight_decay=Powers(width=-1))}
RULES: dict[Role, RoleRule] = {
    Role.INPUT: RoleRule(init_std=ONE, multiplier=ONE, optimizers=OUTSIDE_BLOCKS),
    Role.HIDDEN: RoleRule(
        init_std=Powers(width=-0.5),
        multiplier=ONE,
        optimizers={
            "adamw": OptimizerRule(lr=Powers(width=-1, depth=-1, depth_per_alpha=1), weight_decay=Powers(width=1),
                                   eps=IN_BLOCK_EPS),
            "sgd": OptimizerRule(lr=Powers(depth=-1, depth_per_alpha=2), weight_decay=ONE),
        },
    ),
    Role.BLOCK_VECTOR: RoleRule(
        init_std=ONE,
        multiplier=ONE,
        optimizers={
            "adamw": OptimizerRule(lr=Powers(depth=-1, depth_per_alpha=1), weight_decay=ONE, eps=IN_BLOCK_EPS),
            "sgd": OptimizerRule(lr=Powers(width=1, depth=-1, depth_per_alpha=2), weight_decay=Powers(width=-1)),
        },
    ),
    Role.VECTOR: RoleRule(init_std=ONE, multiplier=ONE, optimizers=OUTSIDE_BLOCKS),
    Role.READOUT: RoleRule(
        init_std=ONE,  # used only when the readout is not zero-initialised
        multiplier=Powers(width=-1),  # times alpha_out
        optimizers=OUTSIDE_BLOCKS,
    ),
    Role.READOUT_BIAS: RoleRule(
        init_std=ONE,
        multiplier=ONE,
        optimizers={"adamw": OptimizerRule(lr=ONE, weight_decay=ONE, eps=ONE),
                    "sgd": OptimizerRule(lr=ONE, weight_decay=ONE)},
    ),
}


@dataclass(frozen=True)
class ParamInfo:
    """What the model declares about one parameter. Kept off the tensor (ZeRO-3, FSDP, compile drop it)."""

    role: Role
    decay: bool = True  # timm's convention: no weight decay on biases, norms, pos_embed and cls token
    first_layer: bool = False  # first layer inside a two-layer residual branch (qkv, fc1): the NFD correction, docs/parametrizations.md


ParametrizationName = Literal["sp", "mup", "depth_mup", "completep"]
NAMES: tuple[ParametrizationName, ...] = get_args(ParametrizationName)
# alpha of each name; None means the name has no depth scaling at all (m_L is held at 1).
_NAMED_ALPHA: dict[ParametrizationName, float | None] = {"sp": None, "mup": None, "depth_mup": 0.5, "completep": 1.0}
DEPTH_AWARE: tuple[ParametrizationName, ...] = tuple(n for n, alpha in _NAMED_ALPHA.items() if alpha is not None)

# The product's default for ViTs, from the transfer studies in docs/results.md: depth_mup with the first layer
# of every two-layer branch (qkv, fc1) at lr x sqrt(m_L). The only variant whose optimal lr held over width x8
# and showed no significant drift over depth 4 -> 16, and the lowest loss of the deep proxies. What a model
# gets when no parametrization is named; a name alone always means its knobs at their plain values
# (`depth_mup` is alpha 1/2 with first_layer_lr_exponent 0, in a run config as in a study label).
RECOMMENDED = "depth_mup"
RECOMMENDED_KNOBS = {"first_layer_lr_exponent": 0.5}

DEFAULT_BASE_WIDTH = 128
DEFAULT_BASE_DEPTH = 4
DEFAULT_INIT_STD = 0.02  # timm's trunc-normal std for ViT linears


@dataclass(frozen=True)
class Parametrization:
    """A parametrization plus the base shape it is measured against.

    At base width and base depth every parametrization gives the same model and the same optimizer
    groups as `sp` with the same zero-init flags; away from the base the rules in `RULES` apply.
    """

    name: ParametrizationName = "sp"
    alpha: float | None = None  # residual exponent; defaults by name, overridable in [1/2, 1] for depth-aware names
    base_width: int = DEFAULT_BASE_WIDTH
    base_depth: int = DEFAULT_BASE_DEPTH
    base_head_dim: int | None = None  # None: the model's own head_dim, so the attention scale is 1/sqrt(d)
    readout_multiplier: float = 1.0  # alpha_out in alpha_out / m_N
    init_std: float = DEFAULT_INIT_STD  # sigma: the base init std of matrices
    zero_readout: bool | None = None  # default: True for every name but sp
    zero_query: bool | None = None  # default: True for every name but sp
    first_layer_lr_exponent: float = 0.0  # NFD correction: LR of qkv / fc1 times m_L ** this

    def __post_init__(self) -> None:
        if self.name not in _NAMED_ALPHA:
            raise UsageError(f"unknown parametrization {self.name!r}; choose one of {', '.join(NAMES)}")
        named_alpha = _NAMED_ALPHA[self.name]
        if named_alpha is None:
            if self.alpha not in (None, 0, 0.0):
                raise UsageError(
                    f"parametrization {self.name!r} has no residual scaling; alpha={self.alpha} is only "
                    "meaningful for depth_mup or completep"
                )
            object.__setattr__(self, "alpha", 0.0)
        else:
            alpha = named_alpha if self.alpha is None else float(self.alpha)
            if not 0.5 <= alpha <= 1.0:
                raise UsageError(f"alpha must lie in [1/2, 1] for {self.name!r}, got {alpha}")
            object.__setattr__(self, "alpha", alpha)
        for key in ("base_width", "base_depth"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"{key} must be a positive integer, got {value!r}")
        if self.base_head_dim is not None and self.base_head_dim < 1:
            raise UsageError(f"base_head_dim must be a positive integer, got {self.base_head_dim!r}")
        if not self.init_std > 0:
            raise UsageError(f"init_std must be positive, got {self.init_std}")
        if not math.isfinite(self.first_layer_lr_exponent):
            raise UsageError("first_layer_lr_exponent must be finite")
        zero_default = self.name != "sp"
        if self.zero_readout is None:
            object.__setattr__(self, "zero_readout", zero_default)
        if self.zero_query is None:
            object.__setattr__(self, "zero_query", zero_default)

    # --- the shape multipliers -------------------------------------------------------------------------
    @property
    def scales_width(self) -> bool:
        return self.name != "sp"

    @property
    def scales_depth(self) -> bool:
        return _NAMED_ALPHA[self.name] is not None

    def width_mult(self, width: int) -> float:
        """m_N as the rules see it (1 under sp)."""
        return width / self.base_width if self.scales_width else 1.0

    def depth_mult(self, depth: int) -> float:
        """m_L as the rules see it (1 under sp and mup)."""
        return depth / self.base_depth if self.scales_depth else 1.0

    # --- forward-pass rules ----------------------------------------------------------------------------
    def branch_multiplier(self, depth: int) -> float:
        """The residual-branch multiplier m_L ** -alpha."""
        return self.depth_mult(depth) ** -self.alpha

    def readout_scale(self, width: int) -> float:
        rule = RULES[Role.READOUT].multiplier
        return self.readout_multiplier * rule(self.width_mult(width), 1.0, self.alpha)

    def attention_scale(self, head_dim: int) -> float:
        """sp: 1/sqrt(d_head). muP family: sqrt(d_base) / d_head, so 1/sqrt(d) at the base head dim."""
        if not self.scales_width:
            return head_dim**-0.5
        base = self.base_head_dim or head_dim
        return math.sqrt(base) / head_dim

    def init_std_for(self, role: Role, width: int) -> float:
        return self.init_std * RULES[role].init_std(self.width_mult(width), 1.0, self.alpha)

    # --- optimizer rules -------------------------------------------------------------------------------
    def optimizer_scales(
        self, info: ParamInfo, optimizer: Optimizer, width: int, depth: int
    ) -> tuple[float, float, float | None]:
        """(lr_scale, weight_decay_scale, eps_scale) for a parameter, relative to the base values; eps_scale
        is None for an optimizer without eps."""
        rule = RULES[info.role].optimizers[optimizer]
        m_n, m_l, alpha = self.width_mult(width), self.depth_mult(depth), self.alpha
        lr_scale = rule.lr(m_n, m_l, alpha)
        if info.first_layer:
            lr_scale *= m_l**self.first_layer_lr_exponent
        wd_scale = rule.weight_decay(m_n, m_l, alpha) if info.decay else 0.0
        eps_scale = rule.eps(m_n, m_l, alpha) if rule.eps is not None else None
        return lr_scale, wd_scale, eps_scale

    def with_overrides(self, **overrides) -> Parametrization:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def label(self) -> str:
        """The name plus each knob that changes the scaling rules, e.g. 'depth_mup+fle0.5': what a study
        groups its proxies by, and what `transfer` matches a target against (see `parse_label`)."""
        label = self.name
        if self.scales_depth and self.alpha != _NAMED_ALPHA[self.name]:
            label += f"+alpha{self.alpha:g}"
        if self.first_layer_lr_exponent:
            label += f"+fle{self.first_layer_lr_exponent:g}"
        return label


LABEL_KNOBS = {"alpha": "alpha", "fle": "first_layer_lr_exponent"}


def parse_label(label: str) -> dict[str, Any]:
    """'depth_mup+fle0.5' -> {'parametrization': 'depth_mup', 'first_layer_lr_exponent': 0.5}; checked by
    building the Parametrization, so a label that names an impossible variant is an error here."""
    name, *knobs = label.split("+")
    fields: dict[str, Any] = {"parametrization": name, "first_layer_lr_exponent": 0.0}  # a bare name means 0
    for knob in knobs:
        key = next((k for k in LABEL_KNOBS if knob.startswith(k)), None)
        try:
            value = float(knob[len(key):]) if key else None
        except ValueError:
            value = None
        if value is None:
            raise UsageError(f"bad parametrization label {label!r}: {knob!r} is not one of "
                             + ", ".join(f"+{k}<number>" for k in LABEL_KNOBS))
        fields[LABEL_KNOBS[key]] = value
    Parametrization(name=name, **{k: v for k, v in fields.items() if k != "parametrization"})
    return fields


def resolve_parametrization(
    parametrization: str | Parametrization | None = None, **overrides
) -> Parametrization:
    """A Parametrization from a name or an instance, with keyword overrides (None means keep).

    No name means `RECOMMENDED` with `RECOMMENDED_KNOBS` (depth_mup, first_layer_lr_exponent 0.5); a name means
    that name with its knobs at their plain values (first_layer_lr_exponent 0), as in a study label.
    """
    fields = {k: v for k, v in overrides.items() if v is not None}
    if parametrization is None:
        return Parametrization(name=RECOMMENDED, **{**RECOMMENDED_KNOBS, **fields})
    if isinstance(parametrization, str):
        return Parametrization(name=parametrization, **fields)
    if isinstance(parametrization, Parametrization):
        return parametrization.with_overrides(**overrides)
    raise ValueError(f"parametrization must be a name or a Parametrization, got {type(parametrization).__name__}")
