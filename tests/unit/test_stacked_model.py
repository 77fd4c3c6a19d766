"""A stack's evaluation forward (`StackedModel.logits`): every member's logits as its own model gives them,
whether the images go through in one call or in the cache-sized chunks it splits large batches into."""

from __future__ import annotations

import pytest
import torch

from mutransfer.models import create_model
from mutransfer.train import stacked_model
from mutransfer.train.stacked_model import StackedModel, widest_activation

MEMBERS, IMAGES, SIZE, CLASSES = 3, 10, 32, 10


def tiny_vits() -> list[torch.nn.Module]:
    models = []
    for seed in range(MEMBERS):
        torch.manual_seed(seed)
        models.append(create_model("vit", width=32, depth=2, head_dim=16, patch_size=8, img_size=SIZE,
                                   num_classes=CLASSES, parametrization="mup"))
    return models


def test_the_widest_activation_is_the_mlp_hidden_layer_of_one_image() -> None:
    with torch.device("meta"):
        model = create_model("vit", width=32, depth=2, head_dim=16, patch_size=8, img_size=SIZE, num_classes=CLASSES)
    assert widest_activation(model, (3, SIZE, SIZE)) == 17 * 4 * 32  # 16 patches + class token, mlp_ratio 4


@pytest.mark.parametrize("chunk_floats", [10**9, 3 * 17 * 128 * 4])  # one call; chunks of 4 images
@pytest.mark.parametrize("shared", [True, False])
def test_each_members_logits_are_its_own_models(monkeypatch, chunk_floats: int, shared: bool) -> None:
    monkeypatch.setattr(stacked_model, "EVAL_CHUNK_FLOATS", chunk_floats)
    models = tiny_vits()
    stack = StackedModel(models, torch.device("cpu"))
    images = torch.randn(IMAGES if shared else MEMBERS * IMAGES, 3, SIZE, SIZE)
    batch = images if shared else images.view(MEMBERS, IMAGES, 3, SIZE, SIZE)
    assert stack.eval_chunk(MEMBERS, (3, SIZE, SIZE)) == (4 if chunk_floats < 10**9 else 10**9 // (MEMBERS * 2176))
    with torch.no_grad():
        logits = stack.logits(batch, shared=shared)
        for member, model in enumerate(models):
            own = model.eval()(images if shared else batch[member])
            torch.testing.assert_close(logits[member], own, rtol=1e-5, atol=1e-6)
    assert logits.shape == (MEMBERS, IMAGES, CLASSES)
