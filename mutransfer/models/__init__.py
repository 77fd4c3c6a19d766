"""Single-device model code: parametrizations (the RULES table), per-role optimizer param groups (`optim`),
the ViT zoo (registered in timm too), the residual-MLP testbed, timm export and coordinate checks.

It imports only the leaf modules (`errors`, `typed_config`, `tags`, `netutil`); DeepSpeed, compile and
checkpoints wrap it from `mutransfer.train`."""

from .layers import collect_param_info
from .parametrization import (
    NAMES,
    RULES,
    Parametrization,
    ParamInfo,
    Powers,
    Role,
    RoleRule,
    resolve_parametrization,
)
from .resmlp import ResidualMLP
from .vit import VisionTransformer
from .zoo import TIMM_PREFIX, create_model, list_models, load_model, load_weights, zoo_entry

__all__ = [
    "NAMES",
    "RULES",
    "TIMM_PREFIX",
    "ParamInfo",
    "Parametrization",
    "ResidualMLP",
    "Role",
    "RoleRule",
    "Powers",
    "VisionTransformer",
    "collect_param_info",
    "create_model",
    "list_models",
    "load_model",
    "load_weights",
    "resolve_parametrization",
    "zoo_entry",
]
