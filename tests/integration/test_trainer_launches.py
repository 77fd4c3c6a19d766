"""The DeepSpeed trainer on CPU: real `deepspeed` launches (2 ranks on gloo), a real MLflow store, real shards."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from train_helpers import (
    deepspeed_command,
    eval_loss_of_weights,
    expected_lr_scales,
    losses,
    python_command,
    result,
    run,
    run_env,
    run_ranks,
    write_config,
)
from warm_start import popen

from mutransfer.train.__main__ import main as train_main
from mutransfer.train.checkpoint import STATE_FILE, complete_checkpoints, read_state

pytestmark = pytest.mark.slow  # integration: real processes, engines or servers (make test-fast skips)


@pytest.fixture(scope="module")
def shards(shard_set) -> Path:
    return shard_set(768, 200, validation_per_shard=64)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_rank_zero_training_learns_and_keeps_group_lr_ratios(stage, shards, mlflow_uri, tmp_path) -> None:
    out = tmp_path / f"zero{stage}"
    config = write_config(tmp_path / "run.yaml", shards, out, mlflow_uri, deepspeed=dict(zero_stage=stage),
                          optim=dict(min_lr_ratio=0.5), run=dict(steps=30, eval_interval=15))
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    proc = run_ranks(python_command(config, f"tracking.run_name=zero{stage}"), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = result(out)
    assert res["status"] == "finished" and res["step"] == 30
    # no DeepSpeed shared-memory all-reduce file (66 MB of RAM per rank) is left in /dev/shm
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - shm_before == set()
    # loss falls: from about ln(10) = 2.30 to clearly lower within 30 steps on learnable synthetic data
    curve = losses(out)
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (28, 29, 30)) / 3
    assert first > 2.0 and last < first - 0.25, curve
    assert res["eval"]["eval/samples"] == 200  # each eval sample counted once across both ranks

    client = MlflowClient(mlflow_uri)
    mlrun = client.get_run(res["mlflow_run_id"])
    params = mlrun.data.params
    assert params["deepspeed.zero_stage"] == str(stage)
    assert params["parametrization"] == "depth_mup" and params["world_size"] == "2"
    assert float(params["m_N"]) == 2.0 and float(params["m_L"]) == 2.0
    assert mlrun.data.tags["mutransfer.status"] == "finished"
    assert len(client.get_metric_history(mlrun.info.run_id, "train/loss")) == 30
    assert {"eval/top1", "eval/top5", "perf/images_per_s", "perf/data_wait_frac"} <= set(mlrun.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"config.yaml", "deepspeed.json"} <= artifacts

    # after warmup and several cosine steps, every group's LR keeps the parametrization's ratio
    scales = expected_lr_scales()
    lrs = {k.removeprefix("lr/"): v for k, v in mlrun.data.metrics.items() if k.startswith("lr/")}
    assert set(lrs) == set(scales)
    assert len(set(scales.values())) >= 3  # the check means something only if the scales differ
    reference = "input/no_decay"
    for group, lr in lrs.items():
        assert lr / lrs[reference] == pytest.approx(scales[group] / scales[reference], rel=1e-9), group

    if stage == 3:  # export consolidates ZeRO-3 partitions into weights create_model loads
        weights = tmp_path / "zero3.safetensors"
        exported = run([str(Path(sys.executable).parent / "mutransfer"), "export", str(out), str(weights)],
                       tmp_path)
        assert exported.returncode == 0, exported.stderr[-2000:]
        assert eval_loss_of_weights(weights, shards) == pytest.approx(res["eval"]["eval/loss"], rel=1e-4)


def test_zero3_init_matches_single_process(shards, mlflow_uri, tmp_path) -> None:
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "unused", mlflow_uri)
    out = tmp_path / "stats.json"
    script = Path(__file__).with_name("zero3_init_stats.py")
    proc = run_ranks([sys.executable, str(script), str(config), str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    zero3 = json.loads(out.read_text())

    from mutransfer.train.config import load_config
    from mutransfer.train.engine import build_model, deepspeed_config

    cfg = load_config(config)
    model = build_model(cfg, deepspeed_config(cfg, 1), num_classes=10)
    assert set(zero3) == {n for n, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        full = param.detach().double()
        shape, total, abs_total, squares = zero3[name]
        assert shape == list(full.shape), name
        assert total == pytest.approx(full.sum().item(), rel=1e-9, abs=1e-12), name
        assert abs_total == pytest.approx(full.abs().sum().item(), rel=1e-9, abs=1e-12), name
        assert squares == pytest.approx((full**2).sum().item(), rel=1e-9, abs=1e-12), name


def test_resume_after_kill_equals_uninterrupted_run(shards, mlflow_uri, tmp_path) -> None:
    """fp32, one process, a DataLoader worker: killed at step >= 10, resumed, the losses match to 1e-6; MLflow
    holds every step once although metrics wait an hour to be sent (each checkpoint sends them first)."""
    sections = dict(data=dict(num_workers=1), run=dict(steps=24, checkpoint_interval=5, keep_checkpoints=2))
    # an MLflow server that is not there: training goes on and says so once
    dead = "http://127.0.0.1:9"
    straight = write_config(tmp_path / "a.yaml", shards, tmp_path / "straight", dead, **sections)
    proc = run(python_command(straight), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("cannot be reached") == 1
    reference = losses(tmp_path / "straight")

    killed_dir = tmp_path / "killed"
    killed = write_config(tmp_path / "b.yaml", shards, killed_dir, mlflow_uri, **sections,
                          tracking=dict(send_interval_s=3600.0))
    child = popen(python_command(killed), tmp_path, run_env(), stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while not (killed_dir / "checkpoints" / "step_00000010" / STATE_FILE).exists():
            assert child.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the process and its loader worker
        child.wait()
    before = losses(killed_dir)
    assert max(before) < 24, "killed too late to test resumption"
    proc = run(python_command(killed), tmp_path)  # run.resume=auto
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = losses(killed_dir)
    assert set(resumed) == set(reference)
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-6), step
    kept = complete_checkpoints(killed_dir)
    assert [p.name for p in kept] == ["step_00000020", "step_00000024"]  # keep_checkpoints=2
    history = MlflowClient(mlflow_uri).get_metric_history(result(killed_dir)["mlflow_run_id"], "train/loss")
    assert sorted(m.step for m in history) == sorted(reference)


def test_sigterm_saves_one_consistent_checkpoint_then_resumes(shards, mlflow_uri, tmp_path) -> None:
    out = tmp_path / "preempted"
    config = write_config(tmp_path / "run.yaml", shards, out, mlflow_uri, data=dict(num_workers=1),
                          deepspeed=dict(zero_stage=2), run=dict(steps=500))
    launcher = subprocess.Popen(deepspeed_command(config), cwd=tmp_path, env=run_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    try:
        while not (out / "metrics.jsonl").exists() or len(losses(out)) < 3:
            assert launcher.poll() is None, launcher.stdout.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        # as SLURM (and Ctrl-C in a terminal) do: the signal reaches every process of the job, loader
        # workers included. DeepSpeed's local runner does not forward signals itself.
        os.killpg(launcher.pid, signal.SIGTERM)
        output, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert "checkpoint saved" in output, output[-3000:]
    res = result(out)
    assert res["status"] == "preempted"
    saved = complete_checkpoints(out)
    assert len(saved) == 1
    state, _ = read_state(saved[0])
    assert state.status == "preempted" and state.step == res["step"] < 500
    assert {"rng_rank0.safetensors", "rng_rank1.safetensors"} <= {p.name for p in saved[0].iterdir()}
    # a relaunch continues from that step and finishes (its ranks started as torchrun starts them: the signal
    # was the launcher's part, and a second deepspeed launch costs 4 more fresh interpreters)
    proc = run_ranks(python_command(config, f"run.steps={state.step + 3}"), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finished = result(out)
    assert finished["status"] == "finished" and finished["step"] == state.step + 3
    assert finished["mlflow_run_id"] == res["mlflow_run_id"]  # the same MLflow run goes on


def test_divergence_stops_the_run(shards, mlflow_uri, tmp_path) -> None:
    out = tmp_path / "diverged"
    config = write_config(tmp_path / "run.yaml", shards, out, mlflow_uri,
                          optim=dict(name="sgd", lr=1e4, momentum=0.9, warmup_steps=0), run=dict(steps=200))
    proc = run(python_command(config), tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "diverged: training loss" in proc.stderr
    res = result(out)
    assert res["status"] == "diverged" and res["step"] < 200
    assert not math.isfinite(res["final_train_loss"]) or res["final_train_loss"] > 1e3
    assert MlflowClient(mlflow_uri).get_run(res["mlflow_run_id"]).data.tags["mutransfer.status"] == "diverged"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lrr=1", "optim.lrr"),
        ("optim.lr=fast", "optim.lr"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("model.parametrization=mupp", "model.parametrization"),
        ("data.shards_dir=/no/such/dir", "data.shards_dir"),
        ("deepspeed.config=/no/such.json", "deepspeed.config"),
        ("data.batch_size=0", "data.batch_size"),
        ("run.steps=null", "run.steps"),
    ],
)
def test_bad_config_exits_2_naming_the_key(override, key, shards, tmp_path, capsys) -> None:
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "out", "sqlite:///unused.db")
    assert train_main(["--config", str(config), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_bad_config_exit_code_from_the_command_line(shards, tmp_path) -> None:
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "out", "sqlite:///unused.db")
    proc = run(python_command(config, "run.bogus=1"), tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "run.bogus" in proc.stderr and "Traceback" not in proc.stderr
