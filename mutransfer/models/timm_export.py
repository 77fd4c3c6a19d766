"""Our ViT as a plain timm `VisionTransformer`: every parametrization multiplier folded into the weights.

Our forward differs from timm's in exactly three places, each a constant factor on a linear map:

- the residual branches: `x + m_L^-alpha * F(x)`, with F ending in `attn.proj` or `mlp.fc2`: the
  multiplier goes into that layer's weight and bias;
- the readout: `alpha_out / m_N * (x W^T) + b`: the multiplier goes into the head's weight, not its bias;
- the attention logits: `scale * q.k` where timm uses `q.k / sqrt(head_dim)`: `scale * sqrt(head_dim)` goes
  into the query rows (the first `width` rows) of `qkv`, weight and bias, so that timm's default gives the
  same logits.

Everything else (patch embedding, class token, position embedding over class token and patches, pre-LN
blocks with LayerNorm eps 1e-6, GELU MLP, final norm, class-token pooling) is timm's ViT already. The folding
is done in float64 and rounded once to float32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mutransfer.errors import UsageError

from .vit import VisionTransformer

# timm architectures whose defaults match a standard shape (width, depth, heads); anything else is built
# from vit_base_patch16_224 with every dimension given explicitly (config.json records them all).
_TIMM_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large",
               (1280, 32, 16): "huge"}
FALLBACK_ARCHITECTURE = "vit_base_patch16_224"


def timm_model_args(model: VisionTransformer) -> dict[str, Any]:
    """The keyword arguments of timm's VisionTransformer that give our model's shapes and pooling."""
    return dict(img_size=model.img_size, patch_size=model.patch_size, in_chans=model.patch_embed.proj.in_channels,
                num_classes=model.num_classes, embed_dim=model.width, depth=model.depth,
                num_heads=model.width // model.head_dim, mlp_ratio=model.mlp_ratio, qkv_bias=True,
                class_token=True, no_embed_class=False, global_pool="token")


def timm_architecture(model: VisionTransformer) -> str:
    import timm

    size = _TIMM_SIZES.get((model.width, model.depth, model.width // model.head_dim))
    name = f"vit_{size}_patch{model.patch_size}_{model.img_size}"
    return name if size and model.mlp_ratio == 4.0 and timm.is_model(name) else FALLBACK_ARCHITECTURE


def folded_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Our state dict with the multipliers folded in, under timm's names (which are ours), float32."""
    if not isinstance(model, VisionTransformer):
        raise UsageError(f"only the ViT models export to timm, not {type(model).__name__}")
    state = {k: v.detach().to("cpu", torch.float64).clone() for k, v in model.state_dict().items()}
    width = model.width
    for i, block in enumerate(model.blocks):
        prefix = f"blocks.{i}."
        for layer in ("attn.proj", "mlp.fc2"):
            state[f"{prefix}{layer}.weight"] *= block.branch_multiplier
            state[f"{prefix}{layer}.bias"] *= block.branch_multiplier
        query_factor = block.attn.scale * math.sqrt(block.attn.head_dim)
        state[f"{prefix}attn.qkv.weight"][:width] *= query_factor
        state[f"{prefix}attn.qkv.bias"][:width] *= query_factor
    state["head.weight"] *= model.head.multiplier
    return {k: v.to(torch.float32).contiguous() for k, v in state.items()}


def to_timm(model: VisionTransformer) -> nn.Module:
    """A timm VisionTransformer (eval mode) computing the same function as `model`, loaded with strict=True."""
    import timm

    timm_model = timm.create_model(timm_architecture(model), pretrained=False, **timm_model_args(model))
    timm_model.load_state_dict(folded_state_dict(model), strict=True)
    return timm_model.eval()


def save_timm(model: VisionTransformer, out_dir: str | Path, data_config: dict[str, Any],
              provenance: dict[str, Any]) -> Path:
    """Write `model.safetensors` + `config.json` (timm's own Hugging Face layout) into `out_dir`.

    `data_config` is the eval preprocessing (input_size, interpolation, mean, std, crop_pct), which timm's
    `resolve_data_config` hands back to whoever loads the folder; `provenance` goes under the "mutransfer"
    key of config.json (timm ignores it).
    """
    from timm.models._hub import save_for_hf

    out_dir = Path(out_dir)
    timm_model = to_timm(model)
    save_for_hf(timm_model, str(out_dir), safe_serialization=True, data_config=data_config)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    # the factory copied the source architecture's pretrained tag and licence: these weights are ours
    config["pretrained_cfg"].pop("license", None)
    config["pretrained_cfg"]["tag"] = "mutransfer"
    config["mutransfer"] = provenance
    config_path.write_text(json.dumps(config, indent=2))
    return out_dir
