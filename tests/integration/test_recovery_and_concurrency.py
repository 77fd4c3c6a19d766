"""Recovery and concurrency probes: damaged or foreign checkpoints passed over on resume, a torn metrics
file, a checkpoint that cannot be written, concurrent sweeps of one study and concurrent creation of one
store, the array task that closes a study, and the all-reduce buffers a DeepSpeed launch leaves in
/dev/shm on one rank. Each probe runs the real thing (shards on disk, real commands and DeepSpeed ranks, real
MLflow stores); README.md's "Reliability" table lists them. The probes that need no process of their own:
tests/unit/test_bad_input.py and tests/unit/test_trial_claims.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def shards(shard_set) -> Path:
    return shard_set(256, 64, validation_per_shard=32)


# --- 5. concurrent sweeps of one study: each trial claimed once, the store created once ----------------------
STORE_RACE = """
import sys, time
from mutransfer.train.tracking import mlflow_client
uri, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    pass
mlflow_client(uri).search_experiments()
"""


@pytest.mark.slow  # four processes import MLflow and set up one store together
def test_processes_creating_one_sqlite_store_at_once_all_succeed(tmp_path) -> None:
    import sys
    import time

    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    start = time.time() + 8  # after every process has imported MLflow
    procs = [subprocess.Popen([sys.executable, "-c", STORE_RACE, uri, str(start)], stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], "\n".join(e[-1500:] for e in errors)


@pytest.mark.slow  # two sweeps in subprocesses
def test_two_sweeps_of_one_study_at_once_train_each_trial_once(shards, tmp_path) -> None:
    from mlflow.tracking import MlflowClient
    from train_helpers import BIN, run_env, write_proxy_config, write_study
    from warm_start import popen

    from mutransfer.study.config import load_study
    from mutransfer.study.store import find_study_run, load_trials

    uri = f"sqlite:///{tmp_path / 'fresh.db'}"  # does not exist yet: both sweeps create it
    study = write_study(tmp_path, write_proxy_config(tmp_path, shards, uri, steps=6), "twice", "tests",
                        lrs=[1e-3, 3e-3, 1e-2], steps=6)
    command = [str(BIN / "mutransfer"), "sweep", "--config", str(study), "--tracking-uri", uri]
    sweeps = [popen(command, tmp_path, run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in sweeps]
    for proc, (out, err) in zip(sweeps, outputs):
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err
        assert "Skip logging GPU metrics" not in out + err  # a sweep's console: progress and our own lines
    client = MlflowClient(uri)
    trials = load_trials(client, "twice", "tests")
    keys = sorted(t.key for t in load_study(study).trials())
    assert sorted(t.key for t in trials) == keys  # one child run per trial key, no second one
    assert all(t.status == "finished" for t in trials)
    for trial in trials:
        steps = sorted(m.step for m in client.get_metric_history(trial.run_id, "train/loss"))
        assert steps == [2, 4, 6], (trial.key, steps)
    ran = [int(out.split("ran ")[1].split(",")[0]) for out, _ in outputs]
    assert sum(ran) == len(keys)  # between them, each trial trained once
    parent = find_study_run(client, "twice", "tests")
    assert parent.info.status == "FINISHED" and parent.data.tags["mutransfer.status"] == "finished"
    assert not list((tmp_path / "trials" / "claims").iterdir())


@pytest.mark.slow  # trains two tiny trials in process
def test_the_array_task_that_finishes_the_last_trial_closes_the_study(shards, tmp_path) -> None:
    from train_helpers import write_proxy_config, write_study

    from mutransfer.study.config import load_study
    from mutransfer.study.store import client_for, find_study_run
    from mutransfer.study.sweep import run_sweep

    uri = f"sqlite:///{tmp_path / 'db'}"
    cfg = load_study(write_study(tmp_path, write_proxy_config(tmp_path, shards, uri, steps=2), "array2", "tests",
                                 lrs=[1e-3], steps=2))
    run_sweep(cfg, tracking_uri=uri, progress=False, trial_index=0)
    parent = find_study_run(client_for(uri), "array2", "tests")
    assert parent.info.status == "RUNNING"  # one of two trials done: the other task closes it
    run_sweep(cfg, tracking_uri=uri, progress=False, trial_index=1)
    parent = find_study_run(client_for(uri), "array2", "tests")
    assert parent.info.status == "FINISHED" and parent.data.tags["mutransfer.status"] == "finished"


# --- 2, 3. checkpoints: checksums, load failures, folders that are not ours ---------------------------------
def checkpointed_run(shards: Path, root: Path, **run_values) -> Path:
    from train_helpers import write_config

    return write_config(root / "run.yaml", shards, root / "out", f"sqlite:///{root / 'db'}",
                        data=dict(num_workers=0), deepspeed=dict(zero_stage=0),
                        run={"steps": 8, "checkpoint_interval": 2, "keep_checkpoints": 2, "progress": False,
                             **run_values})


def train_here(config: Path, *overrides: str) -> str:
    """Train in this process (as a sweep does: the process group stays up between runs); the run's status."""
    from mutransfer.train.config import load_config
    from mutransfer.train.trainer import train

    return train(load_config(config, list(overrides))).status


def xor_middle(path: Path, size: int = 4096) -> None:
    """Flip 4 KiB in the middle of a file: the size stays, the content does not."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + size] = bytes(b ^ 0xFF for b in data[middle:middle + size])
    path.write_bytes(bytes(data))


@pytest.mark.slow  # trains in process, twice
def test_a_changed_checkpoint_is_passed_over_and_folders_of_the_user_are_left_alone(shards, tmp_path, capsys) -> None:
    import shutil

    from train_helpers import losses, result

    from mutransfer.train.checkpoint import complete_checkpoints

    config = checkpointed_run(shards, tmp_path)
    out = tmp_path / "out"
    users = out / "checkpoints" / "step_00000001"
    users.mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    assert train_here(config) == "finished"
    reference = losses(out)
    assert (users / "notes.txt").read_text() == "mine"  # pruned checkpoints 2 and 4, not the user's folder
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000006", "step_00000008"]
    newest = out / "checkpoints" / "step_00000008"
    shutil.copytree(newest, out / "checkpoints" / "step_best")  # a user's copy: sorts last, is not ours
    xor_middle(newest / "mp_rank_00_model_states.pt")
    capsys.readouterr()

    assert train_here(config, "run.steps=10") == "finished"
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is damaged (mp_rank_00_model_states.pt has changed since it was written" in err
    again = losses(out)
    for step in (7, 8):  # trained again from step 6, as the first run did
        assert again[step] == pytest.approx(reference[step], abs=1e-6), step
    assert result(out)["status"] == "finished" and result(out)["step"] == 10
    assert (out / "checkpoints" / "step_best").is_dir() and (users / "notes.txt").read_text() == "mine"


@pytest.mark.slow  # trains in process, twice
def test_a_checkpoint_that_fails_to_load_falls_back_to_the_one_before(shards, tmp_path, capsys) -> None:
    """A checkpoint whose listed sizes and checksums all match, but whose model file torch cannot read (it was
    written so: a bug or a foreign writer), is passed over like a damaged one."""
    import json

    from train_helpers import losses, result

    from mutransfer.train.checkpoint import file_digest


    config = checkpointed_run(shards, tmp_path, steps=4)
    out = tmp_path / "out"
    assert train_here(config) == "finished"
    reference = losses(out)
    newest = out / "checkpoints" / "step_00000004"
    model_file = newest / "mp_rank_00_model_states.pt"
    model_file.write_bytes(b"\0" * 64 + model_file.read_bytes()[64:])  # the zip header is gone
    state_file = newest / "mutransfer_state.json"
    state = json.loads(state_file.read_text())
    state["files"][model_file.name]["sha256"] = file_digest(model_file)
    state_file.write_text(json.dumps(state))
    capsys.readouterr()

    assert train_here(config, "run.steps=6") == "finished"
    err = capsys.readouterr()
    assert f"checkpoint {newest} could not be loaded (" in err.err
    assert "Traceback" not in err.err
    assert losses(out)[4] == pytest.approx(reference[4], abs=1e-6)  # step 4 trained again from step 2
    assert result(out)["step"] == 6


# --- 4. torn metrics ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # trains in process, twice
def test_a_torn_last_metrics_line_is_dropped_and_the_run_resumes(shards, tmp_path, capsys) -> None:
    from mlflow.tracking import MlflowClient
    from train_helpers import result


    config = checkpointed_run(shards, tmp_path, steps=2)
    out = tmp_path / "out"
    assert train_here(config) == "finished"
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "train/lo')  # kill -9 while a line was written
    capsys.readouterr()
    assert train_here(config, "run.steps=4") == "finished"
    assert "dropped 1 line(s) that were cut short" in capsys.readouterr().err
    res = result(out)
    assert res["status"] == "finished" and res["step"] == 4
    assert MlflowClient(f"sqlite:///{tmp_path / 'db'}").get_run(res["mlflow_run_id"]).info.status == "FINISHED"


# --- weak: a checkpoint that cannot be written -----------------------------------------------------------------
@pytest.mark.slow  # trains in subprocesses
def test_a_checkpoint_write_failure_is_one_line_and_leaves_no_stale_result(shards, tmp_path) -> None:
    import shlex

    from train_helpers import python_command, result, run, run_env

    config = checkpointed_run(shards, tmp_path, steps=2)
    out = tmp_path / "out"
    first = run(python_command(config, "tracking.enabled=false"), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert result(out)["status"] == "finished"
    # resumed for more steps under a 200 KB file size limit: the model file of step 4 cannot be written
    command = "ulimit -f 200; exec " + shlex.join(python_command(config, "tracking.enabled=false", "run.steps=4"))
    failed = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=run_env(), capture_output=True, text=True,
                            timeout=600)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mutransfer.train: could not write checkpoint {out / 'checkpoints' / 'step_00000004'}, "
                           "file mp_rank_00_model_states.pt (")
    assert "the file size limit (ulimit -f) is 204800 bytes" in last
    assert not (out / "result.json").exists()  # the finished run's result.json does not outlive this one


# --- 8. /dev/shm on one rank, and no op built at a machine's first launch ---------------------------------------
@pytest.mark.slow  # a deepspeed launch
def test_a_one_rank_deepspeed_launch_builds_no_op_and_leaves_nothing_in_dev_shm(shards, tmp_path, monkeypatch) -> None:
    """DeepSpeed's CPU shared-memory all-reduce (inference only) is neither built nor mapped: an empty
    extensions folder stays empty (it used to take 65 s to compile there) and no 66 MB buffer is left."""
    from train_helpers import deepspeed_command, run

    extensions = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))  # as on a machine that has built nothing yet
    config = checkpointed_run(shards, tmp_path, steps=2)
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    done = run(deepspeed_command(config, "tracking.enabled=false", "run.save_checkpoints=false", procs=1), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - before == set()
    assert not any(extensions.rglob("*")), sorted(extensions.rglob("*"))

