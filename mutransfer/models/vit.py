"""Vision Transformer whose init, multipliers and attention scale follow a Parametrization.

Single-device model code: distribution, compile and checkpointing wrap it from `mutransfer.train`.
Under `sp` at any shape (and under every parametrization at its base shape) it is timm's ViT: pre-LN
blocks, class token, learned position embedding, GELU MLP, trunc-normal(0.02) linears.
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from mutransfer.errors import UsageError

from .layers import (
    Readout,
    TransformerBlock,
    collect_param_info,
    drop_path_rates,
    init_block_linear,
    init_norm,
    init_readout,
    norm_info,
    require_positive_ints,
)
from .parametrization import Parametrization, ParamInfo, Role, resolve_parametrization


class VisionTransformer(nn.Module):
    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        width: int = 384,
        depth: int = 12,
        head_dim: int = 64,
        mlp_ratio: float = 4.0,
        parametrization: str | Parametrization | None = None,
        base_width: int | None = None,
        base_depth: int | None = None,
        drop_path_rate: float = 0.0,
        weight_init: bool = True,
        **parametrization_overrides,
    ) -> None:
        """`drop_path_rate`: stochastic depth of the last block, rising linearly from 0 at the first (timm's
        rule). `weight_init=False` leaves parameters as torch made them, for callers that initialise later
        (under ZeRO-3, parameters are partitioned at construction and init_weights must run gathered)."""
        super().__init__()
        require_positive_ints(width=width, depth=depth, head_dim=head_dim, patch_size=patch_size,
                              img_size=img_size, num_classes=num_classes)
        if img_size % patch_size:
            raise UsageError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if not mlp_ratio > 0:
            raise UsageError(f"mlp_ratio must be positive, got {mlp_ratio}")
        self.parametrization: Parametrization = resolve_parametrization(
            parametrization, base_width=base_width, base_depth=base_depth, **parametrization_overrides
        )
        param = self.parametrization
        self.width, self.depth, self.head_dim = width, depth, head_dim
        self.num_classes, self.img_size, self.patch_size, self.mlp_ratio = num_classes, img_size, patch_size, mlp_ratio
        self.drop_path_rate = float(drop_path_rate)

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=width)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, width))
        self.blocks = nn.ModuleList(
            TransformerBlock(
                width,
                head_dim,
                mlp_ratio,
                attn_scale=param.attention_scale(head_dim),
                branch_multiplier=param.branch_multiplier(depth),
                drop_path=rate,
            )
            for rate in drop_path_rates(drop_path_rate, depth)
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = Readout(width, num_classes, multiplier=param.readout_scale(width))
        self.grad_checkpointing = False
        self.skip_unread_tokens = True  # see `forward`; the coordinate check turns it off to see every token
        if weight_init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter. Under ZeRO-3, call it inside GatheredParameters."""
        param, width = self.parametrization, self.width
        self.patch_embed.proj.reset_parameters()  # torch's conv init: its fan-in does not grow with width
        trunc_normal_(self.pos_embed, std=param.init_std_for(Role.INPUT, width))
        nn.init.normal_(self.cls_token, std=1e-6)
        hidden_std = param.init_std_for(Role.HIDDEN, width)
        for block in self.blocks:
            init_norm(block.norm1)
            init_norm(block.norm2)
            for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                init_block_linear(linear, hidden_std)
            if param.zero_query:
                block.attn.qkv.weight[:width].zero_()
        init_norm(self.norm)
        init_readout(self.head, param, width)

    def own_param_info(self) -> dict[str, ParamInfo]:
        return {
            "cls_token": ParamInfo(Role.INPUT, decay=False),
            "pos_embed": ParamInfo(Role.INPUT, decay=False),
            "patch_embed.proj.weight": ParamInfo(Role.INPUT, decay=True),
            "patch_embed.proj.bias": ParamInfo(Role.INPUT, decay=False),
            **{f"norm.{k}": v for k, v in norm_info(Role.VECTOR).items()},
        }

    def param_info(self) -> dict[str, ParamInfo]:
        return collect_param_info(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block (timm's convention): in training, each block's activations are
        recomputed in the backward pass instead of kept. Gradients are unchanged."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor, class_token_only: bool = False) -> torch.Tensor:
        """The normalised tokens [N, T, width] after the last block; with `class_token_only`, the class token
        alone [N, 1, width], the last block computing no other token's output."""
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            queries = 1 if class_token_only and index == last else None
            # non-reentrant: works under torch.compile and with ZeRO-3's parameter hooks
            x = checkpoint(block, x, queries, use_reentrant=False) \
                if self.grad_checkpointing and torch.is_grad_enabled() else block(x, queries)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the class token, the one token the head reads: unless `skip_unread_tokens` is off, the
        last block computes that token's output only (the same logits; at depth 4 a fifth less compute)."""
        return self.head(self.forward_features(x, class_token_only=self.skip_unread_tokens)[:, 0])

    def flops_per_image(self, performed: bool = False) -> float:
        """Training FLOPs per image (forward + backward = 3x forward, 2 FLOPs per MAC) from the shapes: the
        architecture's count, as timm and MFU conventions take it, or with `performed` what `forward`
        computes (the last block's attention, projection and MLP for the class token only)."""
        tokens = self.patch_embed.num_patches + 1
        w, hidden = self.width, int(self.width * self.mlp_ratio)
        patch = self.patch_embed.num_patches * w * self.patch_embed.proj.in_channels * self.patch_size**2
        per_block = tokens * (4 * w * w + 2 * w * hidden) + 2 * tokens * tokens * w
        last_block = per_block
        if performed and self.skip_unread_tokens:
            last_block = tokens * 3 * w * w + 2 * tokens * w + w * w + 2 * w * hidden
        macs = patch + (self.depth - 1) * per_block + last_block + w * self.num_classes
        return 3 * 2 * macs
