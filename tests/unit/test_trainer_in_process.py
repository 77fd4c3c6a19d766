"""The trainer's parts in one process: optimizer kernels (foreach / fused) with the per-role groups intact,
per-block activation checkpointing, the DeepSpeed config, and the loop's sync points (logging, divergence
and SIGTERM once per run.log_interval), on real in-process runs over real shards."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from train_helpers import TINY_MODEL, losses, sigterms_reaching_the_process, write_config

from mutransfer.models import create_model
from mutransfer.models.optim import OptimSection, build_optimizer, param_groups
from mutransfer.train import trainer
from mutransfer.train.checkpoint import complete_checkpoints, read_state
from mutransfer.train.config import ConfigError, RunConfig, RunSection, load_config, with_values
from mutransfer.train.engine import build_model, deepspeed_config, merge_config
from mutransfer.train.hardware import set_matmul_precision
from mutransfer.train.schedule import build_scheduler

TINY = {k: v for k, v in TINY_MODEL.items() if k != "name"}


def tiny_vit(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("vit", img_size=32, num_classes=10, **{**TINY, **overrides})


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_kernels_keep_the_group_scales(fused: bool) -> None:
    """foreach (fused, where torch has it on CPU) steps exactly like torch's per-tensor loop over the same
    groups, and the LR ratios between groups survive the schedule."""
    model, reference = tiny_vit(), tiny_vit()
    optimizer = build_optimizer(model, OptimSection(lr=1e-2, weight_decay=0.05), fused=fused)
    kernel = "fused" if fused else "foreach"
    assert all(group[kernel] for group in optimizer.param_groups)
    loop = torch.optim.AdamW(param_groups(reference, OptimSection(lr=1e-2, weight_decay=0.05)), foreach=False)
    scales = {g["group"]: g["lr_scale"] for g in optimizer.param_groups}
    assert len(set(scales.values())) >= 3  # the check means something only if the scales differ
    scheduler = build_scheduler(optimizer, total_steps=10, warmup_steps=2)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for _ in range(3):
        for group in loop.param_groups:  # the reference follows the same schedule
            group["lr"] = next(g["lr"] for g in optimizer.param_groups if g["group"] == group["group"])
        for net, opt in ((model, optimizer), (reference, loop)):
            opt.zero_grad()
            F.cross_entropy(net(images), labels).backward()
            opt.step()
        scheduler.step()
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        # fused kernels round differently (measured: up to 3e-6); a wrong group LR moves weights by ~1e-2
        torch.testing.assert_close(mine, theirs, rtol=1e-4 if fused else 1e-6, atol=1e-5 if fused else 1e-7, msg=name)
    lrs = {g["group"]: g["lr"] for g in optimizer.param_groups}
    for group, lr in lrs.items():
        assert lr / lrs["input/no_decay"] == pytest.approx(scales[group] / scales["input/no_decay"], rel=1e-12)


def test_grad_checkpointing_recomputes_blocks_and_keeps_gradients() -> None:
    plain, checkpointed = tiny_vit(), tiny_vit()
    checkpointed.set_grad_checkpointing(True)
    calls = []
    checkpointed.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for model in (plain, checkpointed):
        F.cross_entropy(model(images), labels).backward()
    assert len(calls) == 2  # the forward, and its recomputation in the backward pass
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
    with torch.no_grad():  # no recomputation outside training
        checkpointed(images)
    assert len(calls) == 3


def test_grad_checkpointing_config_reaches_the_model_and_needs_a_vit() -> None:
    cfg = with_values(RunConfig(run=RunSection(steps=1)), {
        "model.name": "vit", "model.width": 32, "model.depth": 1, "model.grad_checkpointing": True,
        "model.head_dim": 16, "model.patch_size": 8, "data.img_size": 32})
    assert build_model(cfg, deepspeed_config(cfg, 1), num_classes=10).grad_checkpointing
    cfg = with_values(cfg, {"model.name": "resmlp", "model.head_dim": None, "model.patch_size": None})
    with pytest.raises(ConfigError, match="model.grad_checkpointing"):
        build_model(cfg, deepspeed_config(cfg, 1), num_classes=10)


def test_deepspeed_config_merge_and_bf16_without_overflow_sync(tmp_path: Path) -> None:
    assert merge_config({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"c": 5}, "e": 6}) == {"a": {"b": 1, "c": 5}, "d": 3,
                                                                                       "e": 6}
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 7}, "train_batch_size": 1}))
    cfg = with_values(RunConfig(run=RunSection(steps=1)),
                      {"deepspeed.bf16": True, "deepspeed.zero_stage": 2, "deepspeed.config": str(extra)})
    config = deepspeed_config(cfg, world_size=4)
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 7}
    assert config["train_batch_size"] == cfg.data.batch_size * 4  # batch sizes always follow the data config


# --- the loop's sync points, on real in-process runs -------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(shard_set) -> Path:
    return shard_set(256, 32)


def in_process_config(tmp_path: Path, shards: Path, **sections) -> RunConfig:
    sections = {key: dict(values) for key, values in sections.items()}
    tmp_path.mkdir(parents=True, exist_ok=True)
    sections.setdefault("tracking", {})["enabled"] = False
    sections.setdefault("deepspeed", {}).setdefault("zero_stage", 0)
    return load_config(write_config(tmp_path / "run.yaml", shards, tmp_path / "out", "sqlite:///unused.db",
                                    **sections))


def metric_steps(output_dir: Path) -> list[int]:
    rows = map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())
    return [row["step"] for row in rows if "train/loss" in row]


def spy_on_sync(monkeypatch) -> list[int]:
    steps: list[int] = []
    real = trainer.sync

    def sync(run, stop):
        steps.append(run.state.step)
        return real(run, stop)

    monkeypatch.setattr(trainer, "sync", sync)
    return steps


def test_training_installs_the_deepspeed_wait_fixes(shards, tmp_path) -> None:
    """build_engine puts mutransfer.train.deepspeed_sync in place (that it removes the waits shows on a GPU)."""
    from deepspeed.runtime.zero import stage_1_and_2

    from mutransfer.train import deepspeed_sync

    deepspeed_sync.uninstall()
    assert trainer.train(in_process_config(tmp_path, shards, run=dict(steps=1))).status == "finished"
    assert stage_1_and_2.mask_nan_or_inf_with_val_inplace is deepspeed_sync.mask_invalid_norm
    assert stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads is deepspeed_sync.unscale_and_clip_grads


def test_a_run_sets_its_matmul_precision_and_the_next_run_its_own(shards, tmp_path) -> None:
    """run.matmul_precision is set at the start of every run, so a sweep's next trial never inherits it."""
    import torch

    try:
        for mode, products, tf32_convolutions in [("high", "high", True), ("default", "highest", True),
                                                  ("highest", "highest", False)]:
            cfg = in_process_config(tmp_path / mode, shards, run=dict(steps=1, matmul_precision=mode))
            assert trainer.train(cfg).status == "finished"
            assert torch.get_float32_matmul_precision() == products
            assert torch.backends.cudnn.allow_tf32 is tf32_convolutions
    finally:
        set_matmul_precision("default")


def test_sync_points_are_the_logging_eval_and_checkpoint_steps(shards, tmp_path, monkeypatch) -> None:
    synced = spy_on_sync(monkeypatch)
    cfg = in_process_config(tmp_path, shards, run=dict(steps=10, log_interval=4, checkpoint_interval=3))
    result = trainer.train(cfg)
    assert result.status == "finished" and result.step == 10
    assert synced == [3, 4, 6, 8, 9, 10]
    assert metric_steps(tmp_path / "out") == [4, 8, 10]


def test_divergence_is_found_at_the_next_sync_point(shards, tmp_path, monkeypatch) -> None:
    synced = spy_on_sync(monkeypatch)
    cfg = in_process_config(tmp_path, shards, optim=dict(name="sgd", lr=1e4, momentum=0.9, warmup_steps=0),
                            run=dict(steps=200, log_interval=5))
    result = trainer.train(cfg)
    assert result.status == "diverged" and result.step % 5 == 0 and result.step < 200
    assert synced[-1] == result.step
    first_bad = int(result.message.split(" at step ")[1].split()[0])
    assert result.step - 5 < first_bad <= result.step
    assert not (result.final_train_loss < 1e3)  # NaN or above the bound


def test_sigterm_stops_at_the_next_sync_point_and_checkpoints(shards, tmp_path, monkeypatch) -> None:
    real_step = trainer.train_step

    def step_then_signal(run):
        real_step(run)
        if run.state.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    cfg = in_process_config(tmp_path, shards, run=dict(steps=40, log_interval=4, checkpoint_interval=7))
    result = trainer.train(cfg)
    # stopped at the first sync point after the signal (a checkpoint step), with every trained step logged
    assert result.status == "preempted" and result.step == 7
    assert metric_steps(tmp_path / "out") == [4, 7]
    (saved,) = complete_checkpoints(tmp_path / "out")
    state, _ = read_state(saved)
    assert state.step == 7 and state.status == "preempted" and state.batch_in_epoch == 7



def test_a_second_sigterm_during_the_preemption_checkpoint_is_held(shards, tmp_path, monkeypatch) -> None:
    """A preempted rank often gets SIGTERM twice (SLURM signals every process; DeepSpeed's launcher passes
    its own on). The second, arriving while the preemption checkpoint is written, reached the process's own
    handler, by default death without a checkpoint (a flaky two-node test: a rank gone mid-checkpoint)."""
    real_step, real_save = trainer.train_step, trainer.save_checkpoint

    def step_then_signal(run):
        real_step(run)
        if run.state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    def signal_then_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    monkeypatch.setattr(trainer, "save_checkpoint", signal_then_save)
    with sigterms_reaching_the_process() as reached:
        result = trainer.train(in_process_config(tmp_path, shards, run=dict(steps=40, log_interval=4)))
    assert reached == []
    assert result.status == "preempted" and result.step == 4
    (saved,) = complete_checkpoints(tmp_path / "out")
    assert read_state(saved)[0].status == "preempted"


def test_an_inactive_tracker_never_opens_the_store(tmp_path: Path) -> None:
    """Ranks other than 0 (and runs with tracking.enabled=false) log through an inactive Tracker: had it
    opened the sqlite store, two ranks would create and migrate the same file at once."""
    from mutransfer.train.tracking import Tracker

    store = tmp_path / "mlflow.db"
    tracker = Tracker(f"sqlite:///{store}", "tests", active=False)
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    tracker.end("finished")
    assert not store.exists()


def test_resume_is_exact_with_augmentation_in_the_training_process(shards, tmp_path) -> None:
    """data.num_workers=0: crops and flips draw from this process's RNGs, which the replay of the data order
    on resume also draws from; the saved RNG states must be restored after the replay, not before the
    second batch (which drew the first resumed batch's augmentation twice)."""
    sections = dict(optim=dict(schedule="constant"), run=dict(steps=6, log_interval=1))
    straight = trainer.train(in_process_config(tmp_path / "straight", shards, **sections))
    sections["run"]["steps"] = 3
    trainer.train(in_process_config(tmp_path / "resumed", shards, **sections))
    sections["run"]["steps"] = 6
    resumed = trainer.train(in_process_config(tmp_path / "resumed", shards, **sections))
    assert straight.status == resumed.status == "finished"
    reference, continued = losses(tmp_path / "straight" / "out"), losses(tmp_path / "resumed" / "out")
    assert sorted(continued) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert continued[step] == pytest.approx(reference[step], abs=1e-6), step
