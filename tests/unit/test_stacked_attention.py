"""A stack's attention kernel under vmap: each member gets what SDPA gives it alone, values and gradients,
on both paths (short sequences as batched matmuls, longer ones through the folded SDPA call)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from mutransfer.train.stacked_attention import SHORT_SEQUENCE, folded_sdpa

MEMBERS, BATCH, HEADS, HEAD_DIM, SCALE = 3, 2, 2, 8, 0.3


def member_inputs(tokens: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(tokens)
    return [torch.randn(MEMBERS, BATCH, HEADS, tokens, HEAD_DIM, generator=generator, requires_grad=True)
            for _ in range(3)]


@pytest.mark.parametrize("tokens", [17, SHORT_SEQUENCE + 9])
def test_each_member_attends_as_alone(tokens: int) -> None:
    stacked = member_inputs(tokens)
    out = vmap(lambda q, k, v: folded_sdpa(q, k, v, SCALE))(*stacked)
    weights = torch.randn_like(out)
    stacked_grads = torch.autograd.grad((out * weights).sum(), stacked)
    for member in range(MEMBERS):
        alone = [t[member].detach().requires_grad_() for t in stacked]
        expected = F.scaled_dot_product_attention(*alone, scale=SCALE)
        torch.testing.assert_close(out[member], expected, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad((expected * weights[member]).sum(), alone)
        for got, want in zip(stacked_grads, grads):
            torch.testing.assert_close(got[member], want, rtol=1e-5, atol=1e-6)


def test_a_query_shared_by_the_members_meets_each_members_keys() -> None:
    q, k, v = member_inputs(17)
    out = vmap(lambda k, v: folded_sdpa(q[0], k, v, SCALE))(k, v)
    for member in range(MEMBERS):
        torch.testing.assert_close(out[member], F.scaled_dot_product_attention(q[0], k[member], v[member], scale=SCALE))
