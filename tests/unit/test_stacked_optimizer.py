"""Stacked trials (`train.stacked`) without a run: the batched optimizer steps like torch's with each member's
values, and configs that cannot stack are refused by name. Members of a real stack against their lone runs:
tests/integration/test_stacked.py."""

from __future__ import annotations

import pytest
import torch
from train_helpers import write_config

from mutransfer.models import create_model
from mutransfer.models.optim import OptimSection, build_optimizer
from mutransfer.train.config import ConfigError, load_config, with_values
from mutransfer.train.schedule import build_scheduler, lr_factor
from mutransfer.train.stacked import check_stack, stack_problem
from mutransfer.train.stacked_optim import MemberHypers, StackedOptimizer, groups_of


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_stacked_optimizer_steps_like_torchs_with_each_members_values(optimizer) -> None:
    """Three members (different lr, momentum and weight decay; one with none) against torch's foreach optimizer
    and LambdaLR schedule per member, over the parametrization's role groups."""
    kwargs = dict(img_size=32, num_classes=10, width=32, depth=2, head_dim=16, patch_size=8,
                  parametrization="completep", base_width=16, base_depth=1)
    hypers = [MemberHypers(1e-2, 0.9, 0.1), MemberHypers(3e-3, 0.7, 0.0), MemberHypers(3e-2, 0.8, 0.05)]
    models = []
    for seed in range(len(hypers)):
        torch.manual_seed(seed)
        models.append(create_model("vit", **kwargs))
    stacked = {name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]).requires_grad_()
               for name, _ in models[0].named_parameters()}
    optim = OptimSection(name=optimizer, beta2=0.99, eps=1e-8)
    stacked_optimizer = StackedOptimizer(stacked, groups_of(models[0], optim), optim, hypers)
    lone = [build_optimizer(m, with_values(optim, {"lr": h.lr, optim.momentum_key: h.momentum,
                                                   "weight_decay": h.weight_decay})) for m, h in zip(models, hypers)]
    schedules = [build_scheduler(opt, total_steps=6, warmup_steps=2) for opt in lone]
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for step in range(6):
        for k, (model, opt, schedule) in enumerate(zip(models, lone, schedules)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            for name, param in model.named_parameters():
                grad = stacked[name].grad if stacked[name].grad is not None else torch.zeros_like(stacked[name])
                grad[k] = param.grad
                stacked[name].grad = grad
            opt.step()
            schedule.step()
        stacked_optimizer.step(lr_factor(step, 6, 2, "cosine", 0.0))
        for param in stacked.values():
            param.grad = None
    for k, model in enumerate(models):
        for name, param in model.named_parameters():
            torch.testing.assert_close(stacked[name][k], param.detach(), rtol=1e-6, atol=1e-7, msg=name)


def test_configs_that_cannot_stack_are_refused_by_name(shard_set, tmp_path) -> None:
    cfg = load_config(write_config(tmp_path / "run.yaml", shard_set(256, 32), tmp_path / "a", "sqlite:///unused.db",
                                   model=dict(parametrization="mup"), deepspeed=dict(zero_stage=0),
                                   tracking=dict(enabled=False), run=dict(save_checkpoints=False)))
    assert stack_problem(cfg) is None
    assert "bf16" in stack_problem(with_values(cfg, {"deepspeed.bf16": True}))
    assert "save_checkpoints" in stack_problem(with_values(cfg, {"run.save_checkpoints": True}))
    assert stack_problem(with_values(cfg, {"run.compile": "model"})) is None  # a compiled stack
    assert "drop_path_rate" in stack_problem(with_values(cfg, {"run.compile": "model", "model.drop_path_rate": 0.1}))
    check_stack([cfg, with_values(cfg, {"optim.lr": 1.0, "run.seed": 3, "run.output_dir": str(tmp_path / "b")})])
    with pytest.raises(ConfigError, match="model"):
        check_stack([cfg, with_values(cfg, {"model.width": 64})])
    with pytest.raises(ConfigError, match="optim"):
        check_stack([cfg, with_values(cfg, {"optim.beta2": 0.9})])
    with pytest.raises(ConfigError, match="in run"):  # run.matmul_precision: members share one process
        check_stack([cfg, with_values(cfg, {"run.matmul_precision": "high"})])
