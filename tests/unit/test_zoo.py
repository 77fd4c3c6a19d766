"""Every zoo entry gets forward/backward checks at a tiny size; the timm registry mirrors the zoo."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from mutransfer.models import TIMM_PREFIX, collect_param_info, create_model, list_models, zoo_entry

PARAMETRIZATIONS = ["sp", "mup", "depth_mup", "completep"]


def tiny_overrides(name: str) -> dict:
    """Shrink an entry to a CPU-sized model while keeping its head_dim and patch size."""
    defaults = zoo_entry(name).defaults
    if "head_dim" in defaults:
        patch = defaults["patch_size"]
        return {"width": 2 * defaults["head_dim"], "depth": 2, "img_size": 2 * patch, "num_classes": 5}
    return {"width": 32, "depth": 2, "img_size": 8, "num_classes": 5}


def test_zoo_holds_the_issue_names() -> None:
    assert {"vit", "vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16", "vit_large_patch16",
            "vit_huge_patch14", "resmlp"} <= set(list_models())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_forward_backward_every_entry(name: str, parametrization: str) -> None:
    torch.manual_seed(0)
    kwargs = tiny_overrides(name)
    # non-zero readout so that gradients reach every layer on the first backward
    model = create_model(name, parametrization=parametrization, zero_readout=False, **kwargs)
    assert model.parametrization.name == parametrization
    images = torch.randn(3, 3, kwargs["img_size"], kwargs["img_size"])
    logits = model(images)
    assert logits.shape == (3, kwargs["num_classes"])
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    nonzero = sum(bool(p.grad.abs().sum() > 0) for p in model.parameters())
    # zero-init query weights get no gradient through a uniform attention only if keys are constant;
    # everything else must move
    assert nonzero >= len(list(model.parameters())) - 1


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.3])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_skipping_the_unread_tokens_keeps_logits_and_gradients(drop_path_rate: float, checkpointing: bool) -> None:
    """The last block computing the class token's output alone gives the logits and gradients of computing
    every token's (float32 rounding apart), in training (stochastic depth draws alike) and in eval."""
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    results = []
    for skip in (False, True):
        torch.manual_seed(0)
        model = create_model("vit", width=32, depth=3, head_dim=16, patch_size=4, img_size=16, num_classes=5,
                             parametrization="depth_mup", zero_readout=False, drop_path_rate=drop_path_rate)
        model.skip_unread_tokens = skip
        model.set_grad_checkpointing(checkpointing)
        logits = model(images)
        nn.functional.cross_entropy(logits, labels).backward()
        model.eval()
        with torch.no_grad():
            results.append((logits.detach(), model(images), {n: p.grad for n, p in model.named_parameters()}))
    (train_all, eval_all, grads_all), (train_one, eval_one, grads_one) = results
    torch.testing.assert_close(train_one, train_all, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eval_one, eval_all, rtol=1e-5, atol=1e-6)
    for name, grad in grads_all.items():
        torch.testing.assert_close(grads_one[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_performed_flops_leave_out_the_unread_tokens() -> None:
    model = create_model("vit", width=64, depth=4, head_dim=16, patch_size=8, img_size=32)
    assert model.flops_per_image(performed=True) < 0.85 * model.flops_per_image()
    model.skip_unread_tokens = False
    assert model.flops_per_image(performed=True) == model.flops_per_image()


@pytest.mark.parametrize("name", list_models())
def test_every_parameter_declares_a_role(name: str) -> None:
    model = create_model(name, **tiny_overrides(name))
    info = collect_param_info(model)
    assert set(info) == {n for n, _ in model.named_parameters()}


def test_undeclared_parameter_is_an_error() -> None:
    model = create_model("vit", **tiny_overrides("vit_tiny_patch16"), patch_size=16, head_dim=64)
    model.extra_scale = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="declares no role for parameters: extra_scale"):
        collect_param_info(model)


@pytest.mark.parametrize("name", list_models())
def test_timm_registry_mirrors_the_zoo(name: str) -> None:
    assert f"{TIMM_PREFIX}{name}" in timm.list_models(f"{TIMM_PREFIX}*")
    model = timm.create_model(f"{TIMM_PREFIX}{name}", parametrization="mup", **tiny_overrides(name))
    assert type(model) is type(create_model(name, **tiny_overrides(name)))
    assert model.parametrization.name == "mup"
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(f"{TIMM_PREFIX}{name}", pretrained=True)


def test_registry_defaults_are_the_published_shapes() -> None:
    shapes = {n: (zoo_entry(n).defaults["width"], zoo_entry(n).defaults["depth"]) for n in list_models()}
    assert shapes["vit_base_patch16"] == (768, 12)
    assert shapes["vit_large_patch16"] == (1024, 24)
    assert shapes["vit_huge_patch14"] == (1280, 32)
    # ViT-B/16 at 224 px: 17.6 GMACs forward -> ~105 GFLOP per training image (timm's published GMACs)
    flops = create_model("vit_base_patch16", depth=1).flops_per_image()
    per_block = create_model("vit_base_patch16", depth=2).flops_per_image() - flops
    total = flops + 11 * per_block
    assert total / 6 / 1e9 == pytest.approx(17.6, rel=0.01)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("vit_gigantic", {}, "unknown model 'vit_gigantic'; the zoo has:"),
        ("vit", {"width": 100, "head_dim": 64}, "width 100 is not divisible by head_dim 64"),
        ("vit", {"img_size": 30, "patch_size": 16}, "img_size 30 is not divisible by patch_size 16"),
        ("vit", {"parametrization": "depth_mup", "alpha": 2.0}, r"alpha must lie in \[1/2, 1\]"),
        ("vit", {"widht": 128}, "takes no argument\\(s\\) widht"),
        ("vit", {"depth": 0}, "depth must be a positive integer"),
        ("resmlp", {"block_layers": 3}, "block_layers must be 1 or 2"),
    ],
)
def test_bad_model_requests_raise_value_error(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model(name, **kwargs)
