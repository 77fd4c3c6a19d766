"""Weight EMA (run.ema_decay) on real 2-rank DeepSpeed runs: the average equals one computed by hand from the
checkpointed weights at ZeRO 0 and ZeRO 3, it is evaluated and exported, it survives resume, and it leaves
training alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import eval_loss_of_weights, losses, python_command, result, run, run_ranks, write_config

from mutransfer.train.ema import EMA_FILE, ema_decay_at
from mutransfer.train.export import consolidated_state_dict

STEPS = 5


@pytest.fixture(scope="module")
def shards(shard_set) -> Path:
    return shard_set(768, 200, validation_per_shard=64)


def launch(tmp_path: Path, shards: Path, name: str, stage: int, **run_values) -> Path:
    """A 2-rank run of STEPS steps, a checkpoint after every step, evaluated at steps 2 and 4 and the end."""
    out = tmp_path / name
    deepspeed = dict(zero_stage=stage)
    if stage == 3:  # both ZeRO-3 paths: biases and norms (32 entries) persistent, held gathered; weights
        # partitioned and released after each use (nothing kept live or for reuse), gathered from the partitions
        ds_json = tmp_path / "ds.json"
        ds_json.write_text(json.dumps({"zero_optimization": {
            "stage3_param_persistence_threshold": 100, "stage3_max_live_parameters": 0,
            "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}}))
        deepspeed["config"] = str(ds_json)
    config = write_config(tmp_path / f"{name}.yaml", shards, out, "", deepspeed=deepspeed,
                          run=dict(steps=STEPS, checkpoint_interval=1, keep_checkpoints=STEPS, eval_interval=2,
                                   **run_values), tracking=dict(enabled=False))
    proc = run_ranks(python_command(config), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result(out)["status"] == "finished"
    return out


def checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


def hand_computed_ema(out: Path, stage: int, decay: float, warmup: bool) -> dict[int, dict[str, torch.Tensor]]:
    """ema_t = d_t ema_(t-1) + (1 - d_t) w_t from the consolidated weights of every step's checkpoint."""
    averages, ema = {}, None
    for step in range(1, STEPS + 1):
        weights = consolidated_state_dict(checkpoint(out, step), stage, bf16=False)
        d = ema_decay_at(step, decay, warmup)
        ema = {k: d * ema[k].double() + (1 - d) * w.double() if ema else w.double() for k, w in weights.items()}
        averages[step] = ema
    return averages


def exported_eval_loss(out: Path, tmp_path: Path, shards: Path, *flags: str) -> float:
    weights = tmp_path / f"{out.name}{'_'.join(flags)}.safetensors"
    proc = run([str(Path(sys.executable).parent / "mutransfer"), "export", str(out), str(weights), *flags], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return eval_loss_of_weights(weights, shards)


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tolerance: float) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert (got[name].double() - tensor.double()).abs().max().item() < tolerance, name


@pytest.fixture(scope="module")
def zero3_ema(shards, tmp_path_factory) -> Path:
    """One ZeRO-3 run with a warmed-up EMA (decay 0.9): checked against the hand-computed average, and the
    uninterrupted run the resumed one must match."""
    return launch(tmp_path_factory.mktemp("zero3_ema"), shards, "straight", 3, ema_decay=0.9, ema_warmup=True)


@pytest.mark.slow
@pytest.mark.parametrize("stage,decay,warmup", [(0, 0.6, False), (3, 0.9, True)])
def test_ema_equals_hand_computed_average(stage, decay, warmup, shards, tmp_path, request) -> None:
    out = (request.getfixturevalue("zero3_ema") if stage == 3
           else launch(tmp_path, shards, f"zero{stage}", stage, ema_decay=decay, ema_warmup=warmup))
    expected = hand_computed_ema(out, stage, decay, warmup)
    for step, average in expected.items():
        folder = checkpoint(out, step)
        assert EMA_FILE in json.loads((folder / "mutransfer_state.json").read_text())["files"]
        assert_same_tensors(load_file(str(folder / EMA_FILE)), average, 1e-6)
    last = consolidated_state_dict(checkpoint(out, STEPS), stage, bf16=False)
    assert max((expected[STEPS][k] - w.double()).abs().max().item() for k, w in last.items()) > 1e-3  # it averages

    metrics = result(out)["eval"]
    assert {"eval/ema_loss", "eval/ema_top1", "eval/ema_top5"} <= set(metrics)
    assert metrics["eval/ema_loss"] != metrics["eval/loss"]
    # what the trainer evaluated (the average swapped into the engine) is what export --ema writes
    assert exported_eval_loss(out, tmp_path, shards, "--ema") == pytest.approx(metrics["eval/ema_loss"], rel=1e-4)
    assert exported_eval_loss(out, tmp_path, shards) == pytest.approx(metrics["eval/loss"], rel=1e-4)


@pytest.mark.slow
def test_ema_survives_resume_and_leaves_training_alone(shards, zero3_ema, tmp_path) -> None:
    """ZeRO-3: resumed from step 3, the average at the end is the uninterrupted run's; evaluating the
    average at steps 2 and 4 (swapped into the partitions and back) changes no training loss."""
    straight = zero3_ema
    resumed = launch(tmp_path, shards, "resumed", 3, ema_decay=0.9, ema_warmup=True,
                     resume=str(checkpoint(straight, 3)))
    assert min(losses(resumed)) == 4  # it did resume
    assert_same_tensors(load_file(str(checkpoint(resumed, STEPS) / EMA_FILE)),
                        load_file(str(checkpoint(straight, STEPS) / EMA_FILE)), 1e-6)
    without = launch(tmp_path, shards, "without", 3)
    assert not (checkpoint(without, STEPS) / EMA_FILE).exists()
    reference, with_ema = losses(without), losses(straight)
    assert set(reference) == set(with_ema) == set(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert with_ema[step] == pytest.approx(loss, abs=1e-6), step
