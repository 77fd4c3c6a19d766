"""Stacked trials (`train.stacked`): a member of a stack follows the same config trained alone by
`trainer.train` (the DeepSpeed path), step for step, for every parametrization and both optimizers, with
stochastic depth and a weight EMA, and compiled (run.compile); a diverged member leaves the stack and the others still follow their lone
runs. The batched optimizer and the configs
that cannot stack, without a run: tests/unit/test_stacked_optimizer.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import write_config

from mutransfer.models import NAMES
from mutransfer.train import trainer
from mutransfer.train.config import RunConfig, load_config, with_values
from mutransfer.train.stacked import train_stacked

STEPS = 20
# two members that differ in everything a member may differ in: lr, momentum, weight decay and seed (so their
# data order and augmentation differ too). grad_clip 0.05 lies below every gradient norm of these runs, so
# DeepSpeed clips at every step.
MEMBERS = [dict(lr=3e-2, momentum=0.9, weight_decay=0.01, seed=0), dict(lr=1e-2, momentum=0.8, weight_decay=0.0, seed=1)]


@pytest.fixture(scope="module")
def shards(shard_set) -> Path:
    return shard_set(256, 32)


def member_config(root: Path, shards: Path, parametrization: str, optimizer: str, member: dict, name: str,
                  grad_clip: float = 0.0, model: dict | None = None, data: dict | None = None,
                  **run: object) -> RunConfig:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    momentum_key = "momentum" if optimizer == "sgd" else "beta1"
    optim = dict(name=optimizer, lr=member["lr"], weight_decay=member["weight_decay"], grad_clip=grad_clip,
                 **{momentum_key: member["momentum"]})
    return load_config(write_config(
        folder / "run.yaml", shards, folder / "out", "sqlite:///unused.db",
        model=dict(parametrization=parametrization, **(model or {})),
        optim=optim, deepspeed=dict(zero_stage=0), tracking=dict(enabled=False), data=data or {},
        run={"steps": STEPS, "log_interval": 1, "seed": member["seed"], "save_checkpoints": False, "progress": False,
             **run}))


def lone_run(cfg: RunConfig) -> tuple[list[float], trainer.RunResult]:
    """Every step's training loss (run.log_interval=1) and the result of `cfg` trained alone."""
    result = trainer.train(cfg)
    rows = [json.loads(line) for line in (Path(cfg.run.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in rows if "train/loss" in row], result


def assert_follows(stacked, lone_losses: list[float], lone_result) -> None:
    assert stacked.status == lone_result.status == "finished"
    assert len(stacked.losses) == len(lone_losses) == STEPS
    assert stacked.losses == pytest.approx(lone_losses, rel=1e-4)
    assert stacked.eval["eval/loss"] == pytest.approx(lone_result.eval["eval/loss"], rel=1e-4)
    assert stacked.eval["eval/samples"] == lone_result.eval["eval/samples"]


@pytest.mark.slow  # two in-process DeepSpeed runs per case
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("parametrization", NAMES)
def test_stack_members_follow_their_lone_runs(parametrization, optimizer, shards, tmp_path) -> None:
    clip = 0.05 if optimizer == "sgd" else 0.0  # clipping by each member's own norm, under one optimizer each
    cfgs = [member_config(tmp_path, shards, parametrization, optimizer, m, f"m{i}", grad_clip=clip)
            for i, m in enumerate(MEMBERS)]
    outcomes = train_stacked(cfgs)
    lone = [lone_run(cfg) for cfg in cfgs]
    assert lone[0][0] != pytest.approx(lone[1][0], rel=1e-3)  # the members do train differently
    for outcome, (losses, result) in zip(outcomes, lone):
        assert_follows(outcome, losses, result)


@pytest.mark.slow
def test_a_diverged_member_leaves_the_stack_and_the_others_go_on(shards, tmp_path) -> None:
    """The huge-lr member goes NaN between sync points; it ends where and as its lone run ends, and its NaNs
    reach no other member."""
    huge = dict(MEMBERS[0], lr=1e4)
    members = [MEMBERS[0], huge, MEMBERS[1]]
    cfgs = [member_config(tmp_path, shards, "depth_mup", "adamw", m, f"m{i}", log_interval=5)
            for i, m in enumerate(members)]
    outcomes = train_stacked(cfgs)
    lone_diverged = trainer.train(cfgs[1])
    assert outcomes[1].status == lone_diverged.status == "diverged"
    assert outcomes[1].step == lone_diverged.step < STEPS
    assert outcomes[1].message == lone_diverged.message
    assert not all(loss == loss and abs(loss) < float("inf") for loss in outcomes[1].losses)  # NaN or inf was met
    for index in (0, 2):
        cfg = with_values(cfgs[index], {"run.log_interval": 1, "run.output_dir": str(tmp_path / f"lone{index}")})
        assert_follows(outcomes[index], *lone_run(cfg))


@pytest.mark.slow
def test_members_follow_their_lone_runs_with_stochastic_depth_and_a_weight_ema(shards, tmp_path) -> None:
    """Two members of seed 0 and one of seed 1: each seed's members draw their lone runs' drop-path masks
    (which differ between seeds), and eval/ema_* of each member's average is its lone run's."""
    members = [MEMBERS[0], dict(MEMBERS[0], lr=1e-2), MEMBERS[1]]
    cfgs = [member_config(tmp_path, shards, "depth_mup", "adamw", m, f"m{i}", model=dict(drop_path_rate=0.3),
                          ema_decay=0.8, eval_interval=10) for i, m in enumerate(members)]
    outcomes = train_stacked(cfgs)
    for outcome, cfg in zip(outcomes, cfgs):
        losses, result = lone_run(cfg)
        assert_follows(outcome, losses, result)
        assert result.eval["eval/ema_loss"] != pytest.approx(result.eval["eval/loss"], rel=1e-3)
        for key in ("eval/ema_loss", "eval/ema_top1"):
            assert outcome.eval[key] == pytest.approx(result.eval[key], rel=1e-4)
    without = trainer.train(with_values(cfgs[0], {"model.drop_path_rate": 0.0, "run.output_dir": str(tmp_path / "no_dp")}))
    assert without.eval["eval/loss"] != pytest.approx(outcomes[0].eval["eval/loss"], rel=1e-3)  # the masks do act


@pytest.mark.slow
def test_members_follow_their_lone_runs_with_mixup_cutmix_label_smoothing_and_random_erasing(shards, tmp_path) -> None:
    """timm's batch augmentations draw from each seed's own RNG streams in the stack as they do alone."""
    augment = dict(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, re_prob=0.5)
    cfgs = [member_config(tmp_path, shards, "mup", "adamw", m, f"m{i}", data=augment) for i, m in enumerate(MEMBERS)]
    outcomes = train_stacked(cfgs)
    for outcome, cfg in zip(outcomes, cfgs):
        assert_follows(outcome, *lone_run(cfg))


@pytest.fixture
def one_thread():
    """Torch on one thread, as the ranks of the tests' launches run (OMP_NUM_THREADS=1 in `run_env`): inductor
    writes its kernels for the thread count, so the lone runs' model compiles to the kernels that
    test_compile.py's ranks compiled (same model, batch and eval batch), and loads them from inductor's cache
    when that test ran first (as in the suite) instead of compiling them again: 126 -> 75 s on a slow machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # inductor compiles the stack's loss and each lone model (about a minute on 2 cores)
def test_a_compiled_stack_follows_its_compiled_lone_runs(shards, tmp_path, one_thread) -> None:
    cfgs = [member_config(tmp_path, shards, "depth_mup", "adamw", m, f"m{i}", compile="model")
            for i, m in enumerate(MEMBERS)]
    outcomes = train_stacked(cfgs)
    for outcome, cfg in zip(outcomes, cfgs):
        assert_follows(outcome, *lone_run(cfg))


def test_a_stack_sets_its_members_matmul_precision(shards, tmp_path) -> None:
    """A stack sets run.matmul_precision as a lone run does (members share it: tests/unit/test_stacked_optimizer.py)."""
    from mutransfer.train.hardware import set_matmul_precision

    cfgs = [with_values(member_config(tmp_path, shards, "mup", "adamw", m, f"m{i}"),
                        {"run.steps": 2, "run.matmul_precision": "high"}) for i, m in enumerate(MEMBERS)]
    try:
        assert [o.status for o in train_stacked(cfgs)] == ["finished", "finished"]
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        set_matmul_precision("default")
