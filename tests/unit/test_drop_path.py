"""Stochastic depth (`model.drop_path_rate`): off is the model as it was, on it is timm's DropPath with timm's
linear rule, riding on the parametrization's branch multiplier, and the depth parametrizations stay flat.

Coordinate-check thresholds (depth 2 -> 16, x8, seeds 0-2, last block's mean |output| at step 3, drop path
in train mode): depth_mup measured x1.09-x1.17 and completep x0.93-x1.06, with a fixed rate 0.2 and with a
rate that grows with depth (0.05 -> 0.4), while sp without a branch multiplier grew x3.0-x5.8 (sqrt(8) = 2.8
expected). A bound of 1.5 on the flat side and 2 on the growing side sits well between them.
"""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

from mutransfer.errors import ConfigError
from mutransfer.models import create_model
from mutransfer.models.coord_check import run_coord_check
from mutransfer.models.layers import drop_path_rates
from mutransfer.models.timm_export import folded_state_dict, timm_model_args
from mutransfer.train.config import ModelSection, config_from_dict

SHAPE = dict(width=32, depth=6, head_dim=16, patch_size=8, img_size=16, num_classes=10, base_width=16,
             base_depth=2)
FLAT, GROWS = 1.5, 2.0


def trained_looking(rate: float, parametrization: str = "depth_mup") -> torch.nn.Module:
    """Every weight non-zero (the zero-initialised readout would hide any difference in the logits)."""
    torch.manual_seed(0)
    model = create_model("vit", parametrization=parametrization, drop_path_rate=rate, **SHAPE)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    return model


def images() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def reference_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ViT's forward as it was before stochastic depth, written out."""
    x = model.patch_embed(x)
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + model.pos_embed
    for block in model.blocks:
        x = torch.add(x, block.attn(block.norm1(x)), alpha=block.branch_multiplier)
        x = torch.add(x, block.mlp(block.norm2(x)), alpha=block.branch_multiplier)
    return model.head(model.norm(x)[:, 0])


def test_drop_path_off_is_the_model_as_it_was_bit_for_bit() -> None:
    model = trained_looking(0.0).train()
    model.skip_unread_tokens = False  # every token, as the reference computes them (test_zoo tests the skip)
    x = images()
    rng_before = torch.get_rng_state()
    out = model(x)
    assert torch.equal(torch.get_rng_state(), rng_before)  # no mask drawn, so later draws are unchanged too
    assert torch.equal(out, reference_forward(model, x))
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in model.blocks)
    with_rate = create_model("vit", drop_path_rate=0.3, **SHAPE)
    assert model.state_dict().keys() == with_rate.state_dict().keys()  # checkpoints load either way


def test_drop_path_changes_the_train_forward_not_the_eval_forward() -> None:
    off, on = trained_looking(0.0), trained_looking(0.3)
    x = images()
    with torch.no_grad():
        assert torch.equal(on.eval()(x), off.eval()(x))
        torch.manual_seed(2)
        first = on.train()(x)
        assert not torch.allclose(first, off.train()(x))
        assert not torch.allclose(first, on(x))  # a new mask each forward
        torch.manual_seed(2)
        assert torch.equal(first, on(x))  # drawn from torch's RNG: a run's seed and resume reproduce it


def test_rates_rise_linearly_over_blocks_as_in_timm() -> None:
    assert drop_path_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert drop_path_rates(0.3, 1) == [0.0]
    model = create_model("vit", drop_path_rate=0.3, **{**SHAPE, "depth": 4})
    assert [b.drop_path2.drop_prob if i else 0.0 for i, b in enumerate(model.blocks)] == pytest.approx(
        [0.0, 0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="drop_path_rate must lie in"):
        create_model("vit", drop_path_rate=1.0, **SHAPE)


@pytest.mark.parametrize("parametrization", ["sp", "depth_mup", "completep"])
def test_train_forward_is_timms_drop_path_on_the_folded_branch(parametrization: str) -> None:
    """timm's ViT with drop_path_rate, holding our weights with the branch multiplier folded in, draws the
    same masks from the same seed: mask / (1 - p) and the multiplier commute, the rule over blocks matches."""
    ours = trained_looking(0.4, parametrization).train()
    theirs = TimmViT(**timm_model_args(ours), drop_path_rate=0.4)
    theirs.load_state_dict(folded_state_dict(ours), strict=True)
    x = images()
    with torch.no_grad():
        torch.manual_seed(3)
        expected = theirs.train()(x)
        torch.manual_seed(3)
        got = ours(x)
    assert (got - expected).abs().max().item() < 1e-5
    assert not torch.allclose(got, ours.eval()(x))  # the masks did drop something


def test_config_checks_the_rate() -> None:
    assert ModelSection(drop_path_rate=0.1).create_kwargs(224, 10)["drop_path_rate"] == 0.1
    assert "drop_path_rate" not in ModelSection().create_kwargs(224, 10)  # models without it take the kwargs
    with pytest.raises(ConfigError, match="drop_path_rate"):
        ModelSection(drop_path_rate=1.5)
    with pytest.raises(ConfigError, match="takes no argument.*drop_path_rate"):  # the residual MLP has none
        config_from_dict({"model": {"name": "resmlp", "drop_path_rate": 0.1}, "run": {"steps": 1}})


def depth_growth(parametrization: str, rates: tuple[float, float], seed: int = 0) -> float:
    """Last block's mean |output| at depth 16 over depth 2, both trained 3 steps with drop path on."""
    last = []
    for depth, rate in zip((2, 16), rates):
        records = run_coord_check("vit", parametrization, "depth", [depth, depth], steps=4, width=64,
                                  base_width=64, base_depth=2, head_dim=16, img_size=16, patch_size=8,
                                  num_classes=10, batch_size=8, seed=seed, progress=False, drop_path_rate=rate)
        rows = [r for r in records if r.step == 3 and r.layer == f"block.{depth - 1}"]
        last.append(rows[0].mean_abs)
    return last[1] / last[0]


FIXED, GROWING = (0.2, 0.2), (0.05, 0.4)  # the rate held over depth; the rate grown with depth (DeiT-III's habit)


@pytest.mark.parametrize("rates", [FIXED, GROWING], ids=["fixed_rate", "rate_grows_with_depth"])
@pytest.mark.parametrize("parametrization", ["depth_mup", "completep"])
def test_depth_parametrizations_stay_flat_with_drop_path(parametrization: str, rates: tuple) -> None:
    assert 1 / FLAT < depth_growth(parametrization, rates) < FLAT


@pytest.mark.parametrize("rates", [FIXED, GROWING], ids=["fixed_rate", "rate_grows_with_depth"])
def test_sp_without_branch_scaling_grows_with_drop_path_negative_control(rates: tuple) -> None:
    assert depth_growth("sp", rates) > GROWS


def test_activation_checkpointing_replays_the_same_masks() -> None:
    """The recomputed forward draws the masks of the first (torch's checkpoint restores the RNG state)."""
    model, x = trained_looking(0.4).train(), images()
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(5)
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        assert torch.allclose(plain, checkpointed, rtol=1e-5, atol=1e-7)
