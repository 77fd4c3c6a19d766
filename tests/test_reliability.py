"""Fault probes, round two (issue 21): shell injection through generated scripts, damaged or foreign
checkpoints, foreign or torn run files, concurrent sweeps of one study, config checks across sections, and
/dev/shm on one rank. Each probe runs the real thing (shards on disk, real commands and DeepSpeed ranks, real
MLflow stores); README.md's "Reliability" table lists them. Probes that start processes are marked slow."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from train_helpers import write_config

from mutransfer.cli import main as cli_main


def cli(*args: str) -> tuple[int, str, str]:
    """`mutransfer ...` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def shards(shard_set) -> Path:
    return shard_set(256, 64, validation_per_shard=32)


def fake_slurm_bin(folder: Path) -> Path:
    """srun, scontrol and deepspeed that do nothing: a generated script can run to its end here."""
    folder.mkdir()
    for name in ("srun", "scontrol", "sbatch"):
        (folder / name).write_text("#!/bin/sh\nexit 0\n")
        (folder / name).chmod(0o755)
    return folder


def run_script(script: Path, cwd: Path, fake_bin: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1",
               SLURM_ARRAY_JOB_ID="7", SLURM_ARRAY_TASK_ID="0", SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1")
    return subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


# --- 1. no shell injection through generated sbatch scripts ------------------------------------------------------
@pytest.mark.parametrize("where", ["launch", "sweep"])
def test_a_newline_in_a_path_is_refused_before_any_script_is_written(where, shards, tmp_path) -> None:
    evil = "runs/x\nid > pwned.txt #"
    config = write_config(tmp_path / "evil.yaml", shards, tmp_path / "unused", f"sqlite:///{tmp_path / 'db'}")
    script = tmp_path / "job.sbatch"
    if where == "launch":
        raw = yaml.safe_load(config.read_text())
        raw["run"]["output_dir"] = evil
        config.write_text(yaml.safe_dump(raw))
        args = ["launch", "--config", str(config), "--slurm", "--num-nodes", "1", "--gpus-per-node", "1"]
    else:
        study = tmp_path / "study.yaml"
        study.write_text(yaml.safe_dump({"study": {"name": "evil", "base_config": str(config), "output_dir": evil},
                                         "shapes": {"widths": [16], "depths": [1]}, "grid": {"lr": [1e-3]}}))
        args = ["sweep", "--config", str(study), "--slurm", "--tracking-uri", "http://127.0.0.1:9"]
    code, _, err = cli(*args, "--script", str(script))
    assert code == 2, err
    assert "output_dir: a path must not contain a newline" in err and len(err.strip().splitlines()) == 1
    assert not script.exists() and not (tmp_path / "pwned.txt").exists()


def test_shell_characters_in_paths_stay_text_when_the_script_runs(shards, tmp_path) -> None:
    """A path full of shell syntax (but one line) is legal: the script quotes it, and running the script
    (with do-nothing srun and scontrol) executes none of it."""
    folder = tmp_path / "runs $(touch pwned1) `touch pwned2`; touch pwned3 #"
    config = write_config(tmp_path / "odd.yaml", shards, folder, f"sqlite:///{tmp_path / 'db'}")
    script = tmp_path / "job.sbatch"
    code, _, err = cli("launch", "--config", str(config), "--slurm", "--num-nodes", "1", "--gpus-per-node", "1",
                       "--script", str(script))
    assert code == 0, err
    done = run_script(script, tmp_path, fake_slurm_bin(tmp_path / "bin"))
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob("pwned*")) and not list(Path.cwd().glob("pwned*"))
    assert (folder / "hostfile-7").is_file()  # the script did run, with the path as one word


def test_script_values_with_a_newline_are_refused() -> None:
    from mutransfer.errors import ConfigError
    from mutransfer.launch.slurm import check_script_values

    check_script_values(cwd=Path("/a b/$(c)"), overrides=["x=1"], tracking_uri=None)
    for bad in ({"cwd": Path("/a\nb")}, {"overrides": ["ok=1", "x=1\rid"]}, {"tracking_uri": "http://h\0"}):
        with pytest.raises(ConfigError, match="newline or NUL"):
            check_script_values(**bad)


# --- 7. cross-field constraints of model and data at config time ---------------------------------------------
def test_an_image_size_the_patches_do_not_tile_is_a_config_error(shards, tmp_path, capsys) -> None:
    from mutransfer.train.__main__ import main as train_main

    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "out", f"sqlite:///{tmp_path / 'db'}")
    assert train_main(["--config", str(config), "data.img_size=33"]) == 2
    err = capsys.readouterr().err
    assert "data.img_size: 33 is not divisible by the model's patch_size 8" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_other_model_constraints_are_config_errors_naming_the_model(shards, tmp_path) -> None:
    from mutransfer.errors import ConfigError
    from mutransfer.train.config import load_config

    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "out", f"sqlite:///{tmp_path / 'db'}")
    with pytest.raises(ConfigError, match="^data.img_size: 40 is not divisible"):
        load_config(config, ["model.patch_size=16", "data.img_size=40"])
    load_config(config, ["model.patch_size=16", "data.img_size=48"])  # fits


# --- weak: study names that escape their folder -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", "."])
def test_a_study_name_of_dots_is_refused(name, shards, tmp_path) -> None:
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "unused", f"sqlite:///{tmp_path / 'db'}")
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"study": {"name": name, "base_config": str(config)},
                                     "shapes": {"widths": [16], "depths": [1]}, "grid": {"lr": [1e-3]}}))
    code, _, err = cli("sweep", "--config", str(study), "--tracking-uri", f"sqlite:///{tmp_path / 'db'}")
    assert code == 2 and "study.name: must be" in err and "not dots alone" in err


# --- 5. concurrent sweeps of one study: each trial claimed once, the store created once ----------------------
def test_a_claim_is_held_once_and_released(tmp_path) -> None:
    from mutransfer.study.claims import TrialClaims

    with TrialClaims(tmp_path) as mine, TrialClaims(tmp_path) as other:
        assert mine.take("t1") and not other.take("t1") and not mine.take("t1")
        mine.release("t1")
        assert other.take("t1")
    assert not list(tmp_path.iterdir())  # every claim released on exit, no drafts left


def test_a_claim_whose_holder_is_gone_is_taken_over(tmp_path) -> None:
    """Same host: a claim of a pid that no longer runs (kill -9) is taken at once; another host's claim only
    once its heartbeat is older than stale_s."""
    import json
    import time

    from mutransfer.study.claims import TrialClaims

    dead = subprocess.Popen(["true"])
    dead.wait()
    with TrialClaims(tmp_path, stale_s=60) as claims:
        (tmp_path / "dead.claim").write_text(json.dumps({"host": claims.holder["host"], "pid": dead.pid}))
        (tmp_path / "remote.claim").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
        (tmp_path / "old.claim").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
        old = time.time() - 61
        os.utime(tmp_path / "old.claim", (old, old))
        assert claims.take("dead") and claims.take("old") and not claims.take("remote")
        assert json.loads((tmp_path / "dead.claim").read_text())["pid"] == os.getpid()


CLAIM_RACE = """
import sys, time
from pathlib import Path
from mutransfer.study.claims import TrialClaims
folder, start = Path(sys.argv[1]), float(sys.argv[2])
with TrialClaims(folder) as claims:
    while time.time() < start:
        pass
    won = [key for key in map(str, range(40)) if claims.take(key)]
    print(",".join(won))
    time.sleep(0.5)  # hold them while the others try
"""


def test_racing_processes_each_take_a_different_set_of_claims(tmp_path) -> None:
    import sys
    import time

    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM_RACE, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    won = [p.communicate(timeout=60)[0].strip() for p in procs]
    keys = [key for line in won for key in line.split(",") if key]
    assert sorted(keys, key=int) == [str(i) for i in range(40)]  # every key once, none twice


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

    from mutransfer.study.config import load_study
    from mutransfer.study.store import find_study_run, load_trials

    uri = f"sqlite:///{tmp_path / 'fresh.db'}"  # does not exist yet: both sweeps create it
    study = write_study(tmp_path, write_proxy_config(tmp_path, shards, uri, steps=6), "twice", "tests",
                        lrs=[1e-3, 3e-3, 1e-2], steps=6)
    command = [str(BIN / "mutransfer"), "sweep", "--config", str(study), "--tracking-uri", uri]
    sweeps = [subprocess.Popen(command, cwd=tmp_path, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
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


# --- 4. run folders with files of another kind, torn metrics -------------------------------------------------
@pytest.mark.parametrize("case", ["user_files", "a_file", "torn_metrics_only"])
def test_an_output_dir_of_another_kind_is_refused_before_anything_is_written(case, shards, tmp_path, capsys) -> None:
    from mutransfer.train.__main__ import main as train_main

    config = checkpointed_run(shards, tmp_path)
    out = tmp_path / "out"
    if case == "a_file":
        out.write_text("a file of the user's")
        expected = "is a file, not a folder"
    else:
        out.mkdir()
        (out / "metrics.jsonl").write_text("epoch,loss\n1,0.5\n" if case == "torn_metrics_only" else "")
        if case == "user_files":
            (out / "config.yaml").write_text("learning_rate: 0.1\n")
        expected = "that mutransfer did not write"
    before = {p: p.read_bytes() for p in ([out] if out.is_file() else out.iterdir())}
    assert train_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in ([out] if out.is_file() else out.iterdir())} == before


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


# --- 8. /dev/shm on one rank -----------------------------------------------------------------------------------
@pytest.mark.slow  # a deepspeed launch
def test_a_one_rank_deepspeed_launch_leaves_nothing_in_dev_shm(shards, tmp_path) -> None:
    from train_helpers import deepspeed_command, run

    config = checkpointed_run(shards, tmp_path, steps=2)
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    done = run(deepspeed_command(config, "tracking.enabled=false", "run.save_checkpoints=false", procs=1), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - before == set()


# --- errors: what a user can fix is one line; a bug keeps its traceback ---------------------------------------
def test_a_user_error_is_one_line_with_exit_2_and_a_bug_keeps_its_traceback(monkeypatch, capsys) -> None:
    import sys
    import types

    from mutransfer import cli as top
    from mutransfer.errors import ConfigError, DataError, UsageError

    raised = {"config": ConfigError("optim.lr", "must be positive"), "data": DataError("no shards"),
              "usage": UsageError("--flag is wrong"), "bug": ValueError("an internal invariant broke")}

    def register(subparsers) -> None:
        probe = subparsers.add_parser("probe")
        probe.add_argument("kind")
        probe.set_defaults(func=lambda args: (_ for _ in ()).throw(raised[args.kind]))

    monkeypatch.setitem(sys.modules, "probe_commands", types.SimpleNamespace(register=register))
    monkeypatch.setitem(top.COMMANDS, "probe", ("probe_commands", "a probe"))
    for kind in ("config", "data", "usage"):
        assert top.main(["probe", kind]) == 2
        err = capsys.readouterr().err
        assert err == f"mutransfer probe: error: {raised[kind]}\n"
    with pytest.raises(ValueError, match="an internal invariant broke"):
        top.main(["probe", "bug"])
