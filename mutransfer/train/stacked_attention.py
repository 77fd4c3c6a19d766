"""Attention for a stack of models under vmap: the kernel each member's `Attention.sdpa` calls.

torch has no batching rule for the CPU flash kernel and would loop over the members. `FoldedAttention` gives
it one: the stack's dimension folds into the batch dimension and one call serves every member. Short
sequences (a 32 px proxy with 8 px patches has 17 tokens) run as matmul-softmax-matmul on the folded
tensors instead: at that length the flash kernel's fixed cost per (image, head) outweighs its work, and its
backward needs the forward again, while the T x T scores autograd keeps are small (measured on 2 CPU cores,
forward and backward of 1,536 heads of 17 tokens: 7.2 ms against 12.4 ms; at 65 tokens and more the flash
kernel is as fast or faster and its memory stays linear in T). Either way each member computes what its
lone model computes, up to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

SHORT_SEQUENCE = 32  # tokens up to which the folded matmul-softmax-matmul beats the folded flash kernel


def plain_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention as ops autograd and inductor handle one by one (no dropout, no mask)."""
    return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1) @ v


class FoldedAttention(torch.autograd.Function):
    """SDPA with a vmap rule that folds the stack into the batch dimension. The backward of the folded flash
    call recomputes the forward and asks autograd for SDPA's own backward."""

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        q, k, v, scale = inputs
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in ctx.saved_tensors]
            out = F.scaled_dot_product_attention(*leaves, scale=ctx.scale)
        return (*torch.autograd.grad(out, leaves, grad), None)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             scale: float) -> tuple[torch.Tensor, int]:
        members = info.batch_size
        qkv = [t.movedim(d, 0) if d is not None else t.expand(members, *t.shape) for t, d in zip((q, k, v), in_dims)]
        if q.shape[-2] <= SHORT_SEQUENCE:
            return plain_sdpa(*qkv, scale), 0  # batched matmuls; autograd records them as it would anywhere
        out = FoldedAttention.apply(*(t.flatten(0, 1) for t in qkv), scale)
        return out.unflatten(0, (members, -1)), 0


def folded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """`Attention.sdpa` for an eager stacked model."""
    return FoldedAttention.apply(q, k, v, scale)
