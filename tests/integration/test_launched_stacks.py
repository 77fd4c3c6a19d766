"""Launched sweeps stack too (`mutransfer sweep --launcher torchrun --parallel 2`): each slot trains a stack of
one shape in one process of its own (`study.stack_worker`), recorded exactly as the in-process stacked sweep
records it; a SIGTERM leaves every member interrupted and the rerun completes them in their own child runs.
Job arrays run a stack per task (`--stack-index I`), planned the same in every task."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from train_helpers import BIN, run, run_env, write_proxy_config, write_study
from warm_start import popen

from mutransfer.errors import UsageError
from mutransfer.launch.slurm import SlurmOptions, sweep_script
from mutransfer.study.config import load_study
from mutransfer.study.store import latest_per_key, load_trials
from mutransfer.study.sweep import check_sweep_arguments, run_sweep
from mutransfer.study.sweep_array import array_units

STUDY = "launched"
LRS = [1e-3, 1e-2]
HARD_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def shards(shard_set) -> Path:
    return shard_set(512, 100, validation_per_shard=50)


def make_study(root: Path, shards: Path, steps: int = 6, log_interval: int = 2) -> Path:
    """root/study.yaml: mup ViTs at widths 16 and 32, depth 1, two lrs, seed 0 (two shapes of two trials)."""
    root.mkdir(parents=True, exist_ok=True)
    base = write_proxy_config(root, shards, f"sqlite:///{root / 'mlflow.db'}", steps=steps)
    config = yaml.safe_load(base.read_text())
    config["run"]["log_interval"] = log_interval
    base.write_text(yaml.safe_dump(config))
    return write_study(root, base, STUDY, "tests", LRS, steps=steps)


def uri_of(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def trials_of(root: Path) -> dict:
    return {t.key: t for t in latest_per_key(load_trials(MlflowClient(uri_of(root)), STUDY, "tests"))}


def history(root: Path, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri_of(root)).get_metric_history(run_id, "train/loss"))


@pytest.mark.slow
def test_a_launched_stacked_sweep_records_what_the_in_process_one_does(shards, tmp_path) -> None:
    inproc_root, launched_root = tmp_path / "inprocess", tmp_path / "launched"
    inproc = run_sweep(load_study(make_study(inproc_root, shards)), tracking_uri=uri_of(inproc_root), progress=False)
    launched = run_sweep(load_study(make_study(launched_root, shards)), launcher="torchrun", parallel=2,
                         tracking_uri=uri_of(launched_root), progress=False)
    assert launched.exit_code == 0 and set(launched.statuses.values()) == {"finished"}
    assert launched.statuses == inproc.statuses and len(launched.ran) == 4
    plans = sorted((launched_root / "trials" / "stacks").glob("*+1.json"))  # two stacks of two, one per slot
    assert len(plans) == 2 and all(len(json.loads(p.read_text())["trials"]) == 2 for p in plans)
    client = MlflowClient(uri_of(launched_root))
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                              filter_string="tags.`mutransfer.role` = 'proxy'")
    assert len(runs) == 4  # one child run per trial
    mine, theirs = trials_of(launched_root), trials_of(inproc_root)
    assert sorted(mine) == sorted(theirs)
    for key, trial in mine.items():
        assert trial.status == "finished"
        assert trial.metrics["final/eval_loss"] == pytest.approx(theirs[key].metrics["final/eval_loss"], rel=1e-4)
        ours, in_process = history(launched_root, trial.run_id), history(inproc_root, theirs[key].run_id)
        assert [s for s, _ in ours] == [s for s, _ in in_process]
        assert [v for _, v in ours] == pytest.approx([v for _, v in in_process], rel=1e-4)


@pytest.mark.slow
def test_a_stack_index_runs_exactly_its_stack(shards, tmp_path) -> None:
    cfg = load_study(make_study(tmp_path, shards))
    units = array_units(cfg, None)  # no --stack: every trial of a shape in one stack
    assert [[t.width for t in unit] for unit in units] == [[16, 16], [32, 32]]
    assert [len(u) for u in array_units(cfg, 1)] == [1] * 4 and [len(u) for u in array_units(cfg, 3)] == [2, 2]
    with pytest.raises(UsageError, match="indices 0-1"):
        run_sweep(cfg, tracking_uri=uri_of(tmp_path), progress=False, stack_index=2)
    summary = run_sweep(cfg, tracking_uri=uri_of(tmp_path), progress=False, stack_index=1)
    assert sorted(summary.ran) == sorted(t.key for t in units[1]) and summary.exit_code == 0
    assert {t.key: t.status for t in trials_of(tmp_path).values()} == {t.key: "finished" for t in units[1]}
    again = run_sweep(cfg, tracking_uri=uri_of(tmp_path), progress=False, stack_index=1)
    assert again.ran == [] and sorted(again.skipped) == sorted(t.key for t in units[1])


def test_array_scripts_run_a_stack_per_task_and_a_trial_with_stack_1(tmp_path) -> None:
    def srun_line(stack: int | None) -> str:
        text = sweep_script(tmp_path / "study.yaml", ["study.steps=3"], [0, 1], tmp_path, "http://h:5000",
                            SlurmOptions(job_name="s"), stack=stack)
        (line,) = [line for line in text.splitlines() if line.startswith("srun ")]
        return line

    assert '--stack-index "$SLURM_ARRAY_TASK_ID" study.steps=3 &' in srun_line(None)
    assert '--stack-index "$SLURM_ARRAY_TASK_ID" --stack 4 study.steps=3 &' in srun_line(4)
    assert '--trial-index "$SLURM_ARRAY_TASK_ID" study.steps=3 &' in srun_line(1) and "--stack" not in srun_line(1)


def test_multi_gpu_trials_must_train_one_per_launch() -> None:
    with pytest.raises(UsageError, match="add --stack 1"):
        check_sweep_arguments("torchrun", 2, 2, None)
    with pytest.raises(UsageError, match="add --stack 1"):
        check_sweep_arguments("deepspeed", 1, 4, 3)
    check_sweep_arguments("deepspeed", 2, 2, 1)
    check_sweep_arguments("torchrun", 2, 1, None)


def train_rows(folder: Path) -> int:
    path = folder / "metrics.jsonl"
    return sum("train/loss" in line for line in path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_sigterm_leaves_launched_stack_members_interrupted_and_a_rerun_completes_them(shards, tmp_path) -> None:
    """A stack still training when the signal comes ends its members preempted; one that ended before it (the
    narrower shape's stack may) ends finished; no member's run is left RUNNING, and the rerun completes the
    preempted ones in their own child runs."""
    steps = 60
    study = make_study(tmp_path, shards, steps=steps, log_interval=1)
    command = [str(BIN / "mutransfer"), "sweep", "--config", str(study), "--tracking-uri", uri_of(tmp_path),
               "--launcher", "torchrun", "--parallel", "2"]
    sweep = popen(command, tmp_path, run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                  start_new_session=True)
    folders = {t.key: tmp_path / "trials" / t.key for t in load_study(study).trials()}
    try:
        deadline = time.monotonic() + HARD_TIMEOUT_S
        while not all(train_rows(folder) >= 3 for folder in folders.values()):  # both stacks have trained
            assert sweep.poll() is None, sweep.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the stacks did not start training"
            time.sleep(0.2)
        os.kill(sweep.pid, signal.SIGTERM)
        output, _ = sweep.communicate(timeout=HARD_TIMEOUT_S)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 128 + signal.SIGTERM, output[-3000:]
    stopped = trials_of(tmp_path)
    cut = {key for key, folder in folders.items() if train_rows(folder) < steps}
    assert len(stopped) == 4 and cut, output[-3000:]
    assert {key: t.status for key, t in stopped.items()} == {
        key: "preempted" if key in cut else "finished" for key in folders}, output[-3000:]
    assert not list((tmp_path / "trials" / "claims").iterdir())  # every claim released

    again = run(command, tmp_path, timeout=HARD_TIMEOUT_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"ran {len(cut)}, skipped {4 - len(cut)}" in again.stdout
    done = trials_of(tmp_path)
    assert {t.status for t in done.values()} == {"finished"}
    assert {k: t.run_id for k, t in done.items()} == {k: t.run_id for k, t in stopped.items()}  # continued
    for trial in done.values():
        assert [s for s, _ in history(tmp_path, trial.run_id)] == list(range(1, steps + 1))  # each step once


def test_a_stack_is_pinned_to_its_gpu_among_those_the_sweep_sees(monkeypatch) -> None:
    from mutransfer.launch.trials import pinned_environment

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert pinned_environment([1])["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert pinned_environment([3])["CUDA_VISIBLE_DEVICES"] == "3"
