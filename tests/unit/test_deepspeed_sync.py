"""mutransfer.train.deepspeed_sync gives DeepSpeed's own numbers without its host waits: its replacements
against DeepSpeed's originals on a real ZeRO-1 optimizer (one process, gloo, CPU), for finite, inf, NaN and
negative norms, clipping on and off, and on whole training steps. (That the waits are gone shows only on a GPU:
tests/integration/test_gpu.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from deepspeed.runtime.zero import stage_1_and_2

from mutransfer.train import deepspeed_sync
from mutransfer.train.distributed import init_distributed


@pytest.fixture
def originals():
    """DeepSpeed's own functions, with the replacements installed for the test and removed after it."""
    deepspeed_sync.uninstall()
    own = (stage_1_and_2.mask_nan_or_inf_with_val_inplace, stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads)
    assert deepspeed_sync.install()
    assert stage_1_and_2.mask_nan_or_inf_with_val_inplace is deepspeed_sync.mask_invalid_norm
    yield own
    deepspeed_sync.uninstall()
    assert stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads is own[1]


def zero1_engine(clip: float, seed: int = 0):
    import deepspeed

    init_distributed()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": clip, "zero_optimization": {"stage": 1},
              "bf16": {"enabled": False}, "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


@pytest.mark.parametrize("value", [0.0, 1.5, math.inf, -math.inf, math.nan])
def test_masking_matches_deepspeed(originals, value: float) -> None:
    own_mask, _ = originals
    mine, theirs = torch.tensor(value), torch.tensor(value)
    deepspeed_sync.mask_invalid_norm(mine, device="cpu")
    own_mask(theirs, device="cpu")
    assert torch.equal(mine, theirs)


@pytest.mark.parametrize("loss_scale", [1.0, 1024.0])
@pytest.mark.parametrize("clip", [0.0, 0.5])
@pytest.mark.parametrize("norm", [0.2, 3.0, math.inf, math.nan, -1.0])
def test_unscale_and_clip_matches_deepspeed(originals, clip: float, norm: float, loss_scale: float) -> None:
    _, own_clip = originals
    optimizer = zero1_engine(clip).optimizer
    assert isinstance(optimizer, stage_1_and_2.DeepSpeedZeroOptimizer)
    optimizer.override_loss_scale(loss_scale)  # as fp16 training's scaler would have it
    assert optimizer.loss_scale == loss_scale
    grads = torch.randn(2, 37)
    mine, theirs = [grads[0].clone(), [grads[1].clone()]], [grads[0].clone(), [grads[1].clone()]]
    deepspeed_sync.unscale_and_clip_grads(optimizer, mine, torch.tensor(norm))
    own_clip(optimizer, theirs, torch.tensor(norm))
    assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1][0], theirs[1][0])
    if (clip and norm == 3.0) or loss_scale != 1.0:  # the check means something only where gradients change
        assert not torch.equal(mine[0], grads[0])


def train_weights(steps: int = 4) -> list[torch.Tensor]:
    engine = zero1_engine(clip=0.05)  # clips every step
    torch.manual_seed(1)
    for _ in range(steps):
        inputs, targets = torch.randn(4, 8), torch.randn(4, 4)
        engine.backward(torch.nn.functional.mse_loss(engine(inputs), targets))
        engine.step()
    return [p.detach().clone() for p in engine.module.parameters()]


def test_zero1_training_is_bit_for_bit_the_same(originals) -> None:
    patched = train_weights()
    deepspeed_sync.uninstall()
    own = train_weights()
    assert all(torch.equal(a, b) for a, b in zip(patched, own))
