"""The scaling rules against docs/parametrizations.md's formulas, written out again here independently of RULES."""

from __future__ import annotations

import math

import pytest
import torch

from mutransfer.errors import ConfigError
from mutransfer.models import Parametrization, Role, create_model
from mutransfer.models.optim import OptimSection, build_optimizer, param_groups

BASE_WIDTH, BASE_DEPTH = 32, 2
M_N, M_L = 4, 4  # the shape the issue asks the rules to be checked at
ETA, LAMBDA, EPS = 1e-3, 0.1, 1e-8


def tiny_vit(name: str, width: int, depth: int, **kw):
    """The bare rules table: the first-layer correction only where a test asks for it."""
    kw.setdefault("first_layer_lr_exponent", 0.0)
    return create_model(
        "vit", width=width, depth=depth, head_dim=16, img_size=16, patch_size=8, num_classes=7,
        parametrization=name, base_width=BASE_WIDTH, base_depth=BASE_DEPTH, **kw,
    )


def design_adamw(role: str, m_n: float, m_l: float, a: float) -> tuple[float, float, float]:
    """(lr, wd, eps) multipliers from docs/parametrizations.md for AdamW."""
    in_block_eps = 1 / m_n * m_l**-a
    return {
        "input": (1, 1, 1),
        "hidden": (1 / m_n * m_l ** (a - 1), m_n, in_block_eps),
        "block_vector": (m_l ** (a - 1), 1, in_block_eps),
        "vector": (1, 1, 1),
        "readout": (1, 1, 1),
        "readout_bias": (1, 1, 1),
    }[role]


def design_sgd(role: str, m_n: float, m_l: float, a: float) -> tuple[float, float]:
    """(lr, wd) multipliers for SGD; wd keeps lr * wd width-free (our reading, see parametrization.py)."""
    return {
        "input": (m_n, 1 / m_n),
        "hidden": (m_l ** (2 * a - 1), 1),
        "block_vector": (m_n * m_l ** (2 * a - 1), 1 / m_n),
        "vector": (m_n, 1 / m_n),
        "readout": (m_n, 1 / m_n),
        "readout_bias": (1, 1),
    }[role]


# name -> (m_N seen by the rules, m_L seen by the rules, alpha)
EFFECTIVE = {"sp": (1, 1, 0.0), "mup": (M_N, 1, 0.0), "depth_mup": (M_N, M_L, 0.5), "completep": (M_N, M_L, 1.0)}


@pytest.mark.parametrize("name", list(EFFECTIVE))
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_rules_match_design_at_4x_width_and_depth(name: str, optimizer: str) -> None:
    model = tiny_vit(name, BASE_WIDTH * M_N, BASE_DEPTH * M_L)
    m_n, m_l, a = EFFECTIVE[name]
    groups = param_groups(model, OptimSection(name=optimizer, lr=ETA, weight_decay=LAMBDA, eps=EPS))
    seen_roles = set()
    for group in groups:
        seen_roles.add(group["role"])
        decays = "no_decay" not in group["group"]
        if optimizer == "adamw":
            lr, wd, eps = design_adamw(group["role"], m_n, m_l, a)
            assert group["eps"] == pytest.approx(EPS * eps, rel=1e-12), group["group"]
        else:
            lr, wd = design_sgd(group["role"], m_n, m_l, a)
            assert "eps" not in group
        assert group["lr"] == pytest.approx(ETA * lr, rel=1e-12), group["group"]
        assert group["lr_scale"] == pytest.approx(lr, rel=1e-12)
        assert group["weight_decay"] == pytest.approx(LAMBDA * wd if decays else 0.0, rel=1e-12), group["group"]
    assert seen_roles == {r.value for r in Role}


def test_groups_hold_every_parameter_once_and_name_it() -> None:
    model = tiny_vit("completep", 64, 4)
    groups = param_groups(model, OptimSection(lr=ETA))
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    for g in groups:
        assert len(g["names"]) == len(g["params"])
        lookup = dict(model.named_parameters())
        assert all(lookup[n] is p for n, p in zip(g["names"], g["params"]))
    for tensor in model.parameters():  # nothing stored on the tensors
        assert not any(k in vars(tensor) for k in ("lr_scale", "role", "infshape"))


def test_no_decay_follows_timm_convention() -> None:
    model = tiny_vit("mup", 64, 2)
    groups = param_groups(model, OptimSection(lr=ETA, weight_decay=LAMBDA))
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {"cls_token", "pos_embed", "norm.weight", "head.bias", "blocks.0.attn.qkv.bias"} <= no_decay
    assert "blocks.0.attn.qkv.weight" not in no_decay and "head.weight" not in no_decay


def test_default_is_the_recommended_depth_mup_with_the_first_layer_correction() -> None:
    model = create_model("vit", width=64, depth=8, head_dim=16, img_size=16, patch_size=8, num_classes=7)
    assert model.parametrization.label == "depth_mup+fle0.5"
    assert create_model("vit", width=64, depth=8, head_dim=16, img_size=16, patch_size=8, num_classes=7,
                        parametrization="completep").parametrization.label == "completep"


@pytest.mark.parametrize("exponent", [0.5, 1.0])
def test_first_layer_correction_multiplies_qkv_and_fc1_lr(exponent: float) -> None:
    plain = {g["group"]: g for g in param_groups(tiny_vit("depth_mup", 64, 8), OptimSection(lr=ETA))}
    corrected = param_groups(tiny_vit("depth_mup", 64, 8, first_layer_lr_exponent=exponent), OptimSection(lr=ETA))
    m_l = 8 / BASE_DEPTH
    for g in corrected:
        factor = m_l**exponent if g["first_layer"] else 1.0
        assert g["lr"] == pytest.approx(plain[g["group"]]["lr"] * factor, rel=1e-12)
        if g["first_layer"]:
            assert all(".qkv." in n or ".fc1." in n for n in g["names"])
    resmlp = create_model("resmlp", width=32, depth=8, img_size=8, parametrization="depth_mup", base_width=32,
                          base_depth=2, first_layer_lr_exponent=0.5)
    first = [n for g in param_groups(resmlp, OptimSection(name="sgd", lr=ETA)) if g["first_layer"] for n in g["names"]]
    assert first and all(".mlp.fc1." in n for n in first)


@pytest.mark.parametrize("name", ["mup", "depth_mup", "completep"])
def test_base_shape_equals_sp(name: str) -> None:
    """At base width and depth: same outputs, same groups, same first update as sp (same zero-init flags)."""
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for zero in (False, True):
        torch.manual_seed(0)
        model = tiny_vit(name, BASE_WIDTH, BASE_DEPTH, zero_readout=zero, zero_query=zero)
        torch.manual_seed(0)
        base = tiny_vit(Parametrization("sp", zero_readout=zero, zero_query=zero), BASE_WIDTH, BASE_DEPTH)
        assert torch.equal(model.forward_features(images), base.forward_features(images))
        assert torch.equal(model(images), base(images))
        for optimizer in ("adamw", "sgd"):
            mine = param_groups(model, OptimSection(name=optimizer, lr=ETA, weight_decay=LAMBDA))
            theirs = param_groups(base, OptimSection(name=optimizer, lr=ETA, weight_decay=LAMBDA))
            strip = [{k: v for k, v in g.items() if k != "params"} for g in mine]
            assert strip == [{k: v for k, v in g.items() if k != "params"} for g in theirs]
    # one training step moves both models identically
    models = []
    for p in (name, Parametrization("sp", zero_readout=False, zero_query=False)):
        torch.manual_seed(0)
        m = tiny_vit(p, BASE_WIDTH, BASE_DEPTH, **({"zero_readout": False, "zero_query": False} if p == name else {}))
        opt = build_optimizer(m, OptimSection(lr=1e-2, weight_decay=0.05))
        torch.nn.functional.cross_entropy(m(images), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
        models.append(m)
    for (n, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.equal(a, b), n


def test_forward_multipliers_and_init() -> None:
    torch.manual_seed(0)
    width, depth = BASE_WIDTH * M_N, BASE_DEPTH * M_L
    for name, branch in (("depth_mup", M_L**-0.5), ("completep", 1 / M_L), ("mup", 1.0), ("sp", 1.0)):
        model = tiny_vit(name, width, depth)
        assert all(b.branch_multiplier == pytest.approx(branch) for b in model.blocks), name
        assert model.head.multiplier == pytest.approx(1 / M_N if name != "sp" else 1.0)
        assert model.blocks[0].attn.scale == pytest.approx(16**-0.5)  # head_dim fixed: scale stays 1/sqrt(d)
    mup = tiny_vit("mup", width, depth)
    assert torch.count_nonzero(mup.head.weight) == 0
    assert torch.count_nonzero(mup.blocks[0].attn.qkv.weight[:width]) == 0
    assert torch.count_nonzero(mup.blocks[0].attn.qkv.weight[width:]) > 0
    sp = tiny_vit("sp", width, depth)
    assert torch.count_nonzero(sp.head.weight) > 0
    # hidden init std: sigma / sqrt(m_N) under mup, sigma under sp (measured on 2*width*4*width entries)
    assert mup.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02 / math.sqrt(M_N), rel=0.05)
    assert sp.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    # no depth-dependent init: fc2 of the last block has the same std as the first block's
    assert mup.blocks[-1].mlp.fc2.weight.std().item() == pytest.approx(0.02 / math.sqrt(M_N), rel=0.05)


def test_attention_scale_is_one_over_d_away_from_base_head_dim() -> None:
    p = Parametrization("mup", base_head_dim=16)
    assert p.attention_scale(16) == pytest.approx(16**-0.5)
    assert p.attention_scale(64) == pytest.approx(4 / 64)
    assert Parametrization("sp").attention_scale(64) == pytest.approx(1 / 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "mupp"}, "unknown parametrization 'mupp'"),
        ({"name": "depth_mup", "alpha": 0.3}, "alpha must lie in [1/2, 1]"),
        ({"name": "completep", "alpha": 1.5}, "alpha must lie in [1/2, 1]"),
        ({"name": "mup", "alpha": 0.5}, "has no residual scaling"),
        ({"name": "mup", "base_width": 0}, "base_width must be a positive integer"),
    ],
)
def test_bad_parametrization_raises_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Parametrization(**kwargs)


def test_alpha_override_in_range() -> None:
    model = tiny_vit("depth_mup", 64, 8, alpha=0.75)
    assert model.parametrization.alpha == 0.75
    assert model.blocks[0].branch_multiplier == pytest.approx((8 / BASE_DEPTH) ** -0.75)


def test_bad_optimizer_and_values_are_refused_by_the_section_the_optimizer_is_built_from() -> None:
    with pytest.raises(ConfigError, match="name: must be one of adamw, sgd, got 'lamb'"):
        OptimSection(name="lamb")
    with pytest.raises(ConfigError, match="lr: must be a positive number"):
        OptimSection(lr=float("nan"))
    with pytest.raises(ConfigError, match=r"momentum: must lie in \[0, 1\)"):
        OptimSection(name="sgd", lr=0.1, momentum=1.5)
    with pytest.raises(ConfigError, match="weight_decay: must be finite"):
        OptimSection(weight_decay=float("inf"))
