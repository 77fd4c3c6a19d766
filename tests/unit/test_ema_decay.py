"""Weight EMA (run.ema_decay) without a run: the decay at each step follows timm's ModelEmaV3, and the config
checks the decay. The average itself, on real 2-rank DeepSpeed runs: tests/integration/test_ema.py."""

from __future__ import annotations

import pytest
import torch

from mutransfer.errors import ConfigError
from mutransfer.train.config import RunSection
from mutransfer.train.ema import ema_decay_at


def test_decay_follows_timm_model_ema_v3() -> None:
    """timm's ModelEmaV3.get_decay(step), step = num_updates after the optimizer step (1-based)."""
    from timm.utils.model_ema import ModelEmaV3

    reference = {warmup: ModelEmaV3(torch.nn.Linear(1, 1), decay=0.999, use_warmup=warmup) for warmup in (False, True)}
    for warmup, timm_ema in reference.items():
        for step in (1, 2, 3, 10, 1000, 10**6):
            assert ema_decay_at(step, 0.999, warmup) == pytest.approx(timm_ema.get_decay(step), abs=1e-15)
    assert ema_decay_at(1, 0.9, False) == 0.0  # the average starts as the weights after the first step
    assert ema_decay_at(2, 0.9, True) == pytest.approx(1 - 2 ** (-2 / 3))


def test_config_checks_the_decay() -> None:
    with pytest.raises(ConfigError, match="ema_decay"):
        RunSection(steps=1, ema_decay=1.0)
    with pytest.raises(ConfigError, match="ema_warmup"):
        RunSection(steps=1, ema_warmup=True)
