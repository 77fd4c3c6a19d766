"""The model zoo: `create_model(name, **overrides)`, mirrored into timm as `mutransfer_<name>`.

Each entry is a constructor plus its defaults; any constructor argument can be overridden, including the
parametrization (`parametrization="depth_mup", base_width=128, base_depth=4, alpha=0.75, ...`).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from timm.models import register_model
from torch import nn

from mutransfer.errors import UsageError

from .parametrization import Parametrization
from .resmlp import ResidualMLP
from .vit import VisionTransformer

TIMM_PREFIX = "mutransfer_"
MODEL_METADATA_KEY = "mutransfer_model"  # safetensors metadata: {"name": zoo name, "kwargs": {...}}
PARAMETRIZATION_KEYS = frozenset(f.name for f in fields(Parametrization)) - {"name"}


@dataclass(frozen=True)
class ZooEntry:
    name: str
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def arguments(self) -> set[str]:
        accepted = set(inspect.signature(self.builder).parameters) - {"self", "parametrization_overrides"}
        return accepted | PARAMETRIZATION_KEYS


_ZOO: dict[str, ZooEntry] = {}


def register(name: str, builder: Callable[..., nn.Module], description: str = "", **defaults: Any) -> ZooEntry:
    """Add a zoo entry and its timm twin `mutransfer_<name>`."""
    entry = ZooEntry(name, builder, defaults, description)
    _ZOO[name] = entry

    def timm_entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise UsageError(f"{TIMM_PREFIX}{name} has no pretrained weights; train one with mutransfer")
        for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(timm_only, None)
        return create_model(name, **kwargs)

    timm_entrypoint.__name__ = timm_entrypoint.__qualname__ = f"{TIMM_PREFIX}{name}"
    timm_entrypoint.__module__ = __name__
    setattr(sys.modules[__name__], timm_entrypoint.__name__, timm_entrypoint)
    register_model(timm_entrypoint)
    return entry


def list_models() -> list[str]:
    return sorted(_ZOO)


def zoo_entry(name: str) -> ZooEntry:
    if name not in _ZOO:
        raise UsageError(f"unknown model {name!r}; the zoo has: {', '.join(list_models())}")
    return _ZOO[name]


def create_model(name: str, checkpoint_path: str | None = None, **overrides: Any) -> nn.Module:
    """Build a zoo model; with `checkpoint_path`, load its weights from a safetensors file (strict).

    Unknown names and arguments raise ValueError naming them.
    """
    entry = zoo_entry(name)
    unknown = sorted(set(overrides) - entry.arguments())
    if unknown:
        raise UsageError(
            f"model {name!r} takes no argument(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(entry.arguments()))}"
        )
    kwargs = {**entry.defaults, **{k: v for k, v in overrides.items() if v is not None}}
    model = entry.builder(**kwargs)
    if checkpoint_path is not None:
        load_weights(model, checkpoint_path)
    return model


def load_weights(model: nn.Module, path: str) -> None:
    """Load a safetensors state dict into `model`; names and shapes must match exactly."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = model.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    if mismatched:
        raise UsageError(f"{path} does not fit {type(model).__name__}: shape of {', '.join(mismatched[:6])}")
    result = model.load_state_dict(state, strict=False)
    problems = [f"missing {k}" for k in result.missing_keys] + [f"unexpected {k}" for k in result.unexpected_keys]
    if problems:
        raise UsageError(f"{path} does not fit {type(model).__name__}: {', '.join(problems[:6])}")


def load_model(path: str) -> nn.Module:
    """Rebuild a model from a file written by `mutransfer export` (its metadata names model and arguments)."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
    if MODEL_METADATA_KEY not in metadata:
        raise UsageError(f"{path} was not written by mutransfer export (no {MODEL_METADATA_KEY} metadata)")
    spec = json.loads(metadata[MODEL_METADATA_KEY])
    return create_model(spec["name"], checkpoint_path=path, **spec["kwargs"])


_VIT = VisionTransformer
register("vit", _VIT, "generic ViT: width, depth, head_dim, mlp_ratio, patch_size, img_size, ...",
         width=384, depth=12, head_dim=64, patch_size=16, img_size=224)
register("vit_tiny_patch16", _VIT, "ViT-Ti/16", width=192, depth=12, head_dim=64, patch_size=16)
register("vit_small_patch16", _VIT, "ViT-S/16", width=384, depth=12, head_dim=64, patch_size=16)
register("vit_base_patch16", _VIT, "ViT-B/16", width=768, depth=12, head_dim=64, patch_size=16)
register("vit_large_patch16", _VIT, "ViT-L/16", width=1024, depth=24, head_dim=64, patch_size=16)
register("vit_huge_patch14", _VIT, "ViT-H/14", width=1280, depth=32, head_dim=80, patch_size=14)
register("resmlp", ResidualMLP, "residual MLP on flattened images (one- or two-layer blocks)",
         width=256, depth=8, block_layers=2, img_size=32, num_classes=10)
