"""Fault injection, each probe against the real thing (shards on disk, the `python -m mutransfer.train` and
`mutransfer sweep` commands in subprocesses, a real `mlflow server` on 127.0.0.1 started and stopped by pid,
DeepSpeed ranks on gloo). README.md's "Reliability" section lists the probes and what each one shows. Every
process a test starts leads its own session and is killed by group. The probes that need no process of their
own (damaged tars read in this process, bad input refused before any work): tests/unit/test_bad_input.py."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from train_helpers import (
    BIN,
    EVAL_PER_SHARD,
    EVAL_SAMPLES,
    copy_shards,
    cut_in_half,
    losses,
    python_command,
    rank_env,
    result,
    run,
    run_env,
    write_config,
)
from warm_start import popen

from mutransfer.netutil import free_port
from mutransfer.study.store import load_trials
from mutransfer.study.ui import start_server
from mutransfer.train.__main__ import main as train_main
from mutransfer.train.checkpoint import complete_checkpoints
from mutransfer.train.tracking import Tracker

HARD_TIMEOUT_S = 300  # a probe process still alive after this has hung (startup alone takes a minute on a busy 2-core box)


@pytest.fixture(scope="module")
def shards(shard_set) -> Path:
    return shard_set(512, EVAL_SAMPLES, validation_per_shard=EVAL_PER_SHARD)


class Job:
    """A process in its own session whose output is read line by line as it comes."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.process = popen(command, cwd, env or run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line)

    @property
    def output(self) -> str:
        while not self._queue.empty():
            self.lines.append(self._queue.get())
        return "".join(self.lines)

    def wait_for(self, condition, what: str, timeout: float = HARD_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"ended before {what}: {self.output[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s: {self.output[-3000:]}"
            time.sleep(0.1)

    def wait(self, timeout: float = HARD_TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running after {timeout} s (hung): {self.output[-3000:]}")

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def rows(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- 1. a run that fails while its loader workers are alive exits --------------------------------------------
@pytest.mark.slow  # trains in a subprocess or in process: an integration probe
def test_zero_byte_shards_exit_2_with_one_clear_error_and_no_worker_left(shards, tmp_path) -> None:
    broken = copy_shards(shards, tmp_path / "zero")
    for tar in broken.glob("train-*.tar"):
        tar.write_bytes(b"")
    config = write_config(tmp_path / "run.yaml", broken, tmp_path / "out", "sqlite:///unused.db",
                          data=dict(num_workers=2), run=dict(progress=False), tracking=dict(enabled=False))
    job = Job(python_command(config), tmp_path)
    code = job.wait()  # fails the test, instead of hanging it, past the hard timeout
    assert code == 2, job.output[-3000:]
    errors = [line for line in job.output.splitlines() if line.startswith("mutransfer.train:")]
    assert errors == [errors[0]] and "data error" in errors[0] and "gave no sample" in errors[0], job.output[-3000:]
    assert "Traceback" not in job.output
    assert not group_alive(job.process.pid), "a loader worker outlived its trainer"


@pytest.mark.slow
def test_a_rank_whose_peer_died_exits(shards, tmp_path) -> None:
    """Ranks started per node without the deepspeed launcher (as `mutransfer launch --no-ssh` does): kill -9
    one, the other must exit soon with an error, its loader worker with it."""
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "out", "sqlite:///unused.db",
                          data=dict(num_workers=1), run=dict(steps=2000, progress=False),
                          tracking=dict(enabled=False))
    port = free_port()
    jobs = []
    for rank in (0, 1):
        jobs.append(Job(python_command(config), tmp_path, rank_env(rank, 2, port)))
    try:
        jobs[0].wait_for(lambda: len(rows(tmp_path / "out")) >= 3, "three logged steps")
        jobs[1].kill()
        code = jobs[0].wait(timeout=120)
        assert code != 0 and "by peer" in jobs[0].output, jobs[0].output[-3000:]
        assert not group_alive(jobs[0].process.pid), "a loader worker outlived its trainer"
    finally:
        for job in jobs:
            job.kill()


# --- 2. a run over damaged or truncated tars says what it lost -----------------------------------------------
@pytest.mark.slow  # trains in a subprocess or in process: an integration probe
def test_eval_states_its_coverage_and_the_run_summary_counts_skips_by_kind(damaged, tmp_path) -> None:
    """A one-epoch run over the damaged shards: console and MLflow show samples evaluated against
    _info.json, the shortfall names the shards, and the per-run summary counts what was skipped by kind."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", damaged, out, uri,  # resampled=False: every train shard is read
                          data=dict(num_workers=1, batch_size=32, resampled=False),
                          run=dict(steps=None, epochs=1, progress=False))
    proc = run(python_command(config), tmp_path, timeout=HARD_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = result(out)
    evaluated = res["eval"]["eval/samples"]
    assert res["eval"]["eval/samples_expected"] == EVAL_SAMPLES > evaluated
    (warning,) = [line for line in proc.stderr.splitlines() if "_info.json lists" in line]
    assert f"evaluated {int(evaluated)} of the {EVAL_SAMPLES} samples" in warning
    assert "validation-000001.tar" in warning and "validation-000002.tar" in warning
    assert "validation-000000.tar" not in warning
    skipped = res["skipped"]
    assert skipped["data/eval_unread_samples"] > 0, skipped
    assert sum(v for k, v in skipped.items() if k.startswith("data/train_")) > 0, skipped  # a one-epoch run too
    assert evaluated + sum(v for k, v in skipped.items() if k.startswith("data/eval_")) == EVAL_SAMPLES
    assert "data skipped in this run" in proc.stderr
    metrics = MlflowClient(uri).get_run(res["mlflow_run_id"]).data.metrics
    assert metrics["eval/samples"] == evaluated and metrics["eval/samples_expected"] == EVAL_SAMPLES
    assert metrics["data/eval_unread_samples"] == skipped["data/eval_unread_samples"]


# --- 3. a sweep reads numbers as people write them, and does not exit 0 when a trial fails -------------------
@pytest.mark.slow  # trains in a subprocess or in process: an integration probe
def test_sweep_reads_1e_05_and_exits_1_when_a_trial_fails(shards, tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = write_config(tmp_path / "proxy.yaml", shards, tmp_path / "unused", uri,
                        model=dict(parametrization="mup", base_width=16, base_depth=1, first_layer_lr_exponent=None),
                        run=dict(steps=2, save_checkpoints=False), deepspeed=dict(zero_stage=0))
    study = tmp_path / "study.yaml"  # written by hand, as people write it
    study.write_text(f"study: {{name: numbers, experiment: tests, base_config: {base}, steps: 2,\n"
                     f"        output_dir: {tmp_path / 'trials'}}}\n"
                     "shapes:\n  list:\n    - {parametrization: mup, width: 16, depth: 1}\n"
                     "    - {parametrization: mup, width: 24, depth: 1}   # 24 is no multiple of head_dim 16\n"
                     "grid: {lr: [1e-5, 1.0e-3], momentum: [0.9]}\n")
    proc = run([str(BIN / "mutransfer"), "sweep", "--config", str(study), "--tracking-uri", uri], tmp_path,
               timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 failed, 2 finished" in proc.stdout and "trial(s) failed (exit 1)" in proc.stderr
    trials = load_trials(MlflowClient(uri), "numbers")
    finished = sorted(t.spec.lr for t in trials if t.status == "finished")
    assert finished == [1e-5, 1e-3] and all(t.spec.width == 16 for t in trials if t.status == "finished")


# --- 4. tracking survives a server restart, or says what it could not record ---------------------------------
@pytest.fixture
def mlflow_store(tmp_path) -> str:
    uri = f"sqlite:///{tmp_path / 'served.db'}"
    MlflowClient(uri).search_experiments()  # creates the store the server serves
    return uri


def kill_server(server) -> None:
    """A crash, not a shutdown: SIGKILL to the server's process group (it leads its own)."""
    os.killpg(server.pid, signal.SIGKILL)
    server.stop()  # reaps it


@pytest.mark.slow
def test_a_run_whose_server_restarts_ends_with_its_final_status_and_every_metric(shards, mlflow_store,
                                                                                 tmp_path) -> None:
    out = tmp_path / "run"
    server = start_server(mlflow_store)
    port = server.port
    config = write_config(tmp_path / "run.yaml", shards, out, server.url, data=dict(num_workers=1),
                          run=dict(steps=60, eval_interval=20, progress=False), tracking=dict(wait_at_end_s=240))
    job = Job(python_command(config), tmp_path)
    try:
        job.wait_for(lambda: len(rows(out)) >= 3, "three logged steps")
        kill_server(server)  # mid-run: later requests fail, are held and retried
        job.wait_for(lambda: "waiting up to" in job.output, "the end of the run")
        server = start_server(mlflow_store, port=port)
        assert job.wait() == 0, job.output[-3000:]
        assert "is back; everything held is recorded" in job.output
        res = result(out)
        client = MlflowClient(server.url)
        mlrun = client.get_run(res["mlflow_run_id"])
        assert mlrun.info.status == "FINISHED" and mlrun.data.tags["mutransfer.status"] == "finished"
        history = client.get_metric_history(mlrun.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, 61))  # every step, each once
        assert {"final/eval_loss", "final/eval_samples", "data/skipped_samples"} <= set(mlrun.data.metrics)
        assert len(client.get_metric_history(mlrun.info.run_id, "eval/loss")) == 3
    finally:
        job.kill()
        server.stop()


@pytest.mark.slow  # trains in a subprocess or in process: an integration probe
def test_a_server_that_stays_away_is_reported_at_the_end(mlflow_store, tmp_path, capsys) -> None:
    server = start_server(mlflow_store)
    try:
        tracker = Tracker(server.url, "tests", fallback=tmp_path / "metrics.jsonl", wait_at_end_s=1)
        run_id = tracker.start("away", {"mutransfer.status": "running"})
        tracker.log_metrics({"train/loss": 2.0}, step=1)
        kill_server(server)
        for step in range(2, 6):
            tracker.log_metrics({"train/loss": 1.0, "train/grad_norm": 0.5}, step=step)
        assert not tracker.end("finished")
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert err.count("training goes on, holding what is not recorded") == 1
    (report,) = [line for line in err.splitlines() if "did not record all of run" in line]
    assert run_id in report and "8 metric value(s) (steps 2-5)" in report
    assert "set_tags mutransfer.status" in report and str(tmp_path / "metrics.jsonl") in report


# --- 5. Ctrl-C stops a sweep; the rerun continues it with one child run per trial ----------------------------
def sweep_study(shards: Path, root: Path, steps: int) -> tuple[Path, str]:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    base = write_config(root / "proxy.yaml", shards, root / "unused", uri,
                        model=dict(parametrization="mup", base_width=16, base_depth=1, first_layer_lr_exponent=None),
                        run=dict(log_interval=1, save_checkpoints=False), deepspeed=dict(zero_stage=0))
    study = root / "study.yaml"
    study.write_text(yaml.safe_dump({
        "study": {"name": "stop", "experiment": "tests", "base_config": str(base), "steps": steps,
                  "output_dir": str(root / "trials")},
        "shapes": {"variants": ["mup"], "widths": [16], "depths": [1]},
        "grid": {"lr": [1e-3, 1e-2], "momentum": [0.9]},
    }))
    return study, uri


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_and_the_rerun_continues_its_trial(shards, tmp_path) -> None:
    study, uri = sweep_study(shards, tmp_path, steps=150)
    # one trial at a time (a stack stops all its trials: tests/integration/test_stacked_sweep.py)
    command = [str(BIN / "mutransfer"), "sweep", "--config", str(study), "--tracking-uri", uri, "--stack", "1"]
    job = Job(command, tmp_path)
    trials = tmp_path / "trials"
    try:
        job.wait_for(lambda: any(len(rows(d)) >= 3 for d in trials.glob("*")), "a trial's third step")
        os.kill(job.process.pid, signal.SIGINT)  # Ctrl-C
        assert job.wait() == 128 + signal.SIGINT, job.output[-3000:]
    finally:
        job.kill()
    assert "checkpoint saved" not in job.output and "no checkpoint (run.save_checkpoints=false)" in job.output
    assert len([d for d in trials.glob("*") if d.name != "claims"]) == 1, "a trial started after Ctrl-C"
    assert not list((trials / "claims").iterdir())  # the stopped trial's claim was released
    client = MlflowClient(uri)
    (stopped,) = load_trials(client, "stop")
    assert stopped.status == "preempted" and client.get_run(stopped.run_id).info.status == "KILLED"
    parent = client.get_run(client.get_run(stopped.run_id).data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED" and parent.data.tags["mutransfer.status"] == "interrupted"

    again = run(command, tmp_path, timeout=HARD_TIMEOUT_S)
    assert again.returncode == 0, again.stderr[-3000:]
    trials_now = load_trials(client, "stop")
    assert sorted(t.status for t in trials_now) == ["finished", "finished"]  # one child run per trial key
    assert stopped.run_id in {t.run_id for t in trials_now}  # the interrupted trial continued its own run
    history = client.get_metric_history(stopped.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 151))  # the replayed steps are recorded once
    assert sorted(r["step"] for r in rows(trials / stopped.key) if "train/loss" in r) == list(range(1, 151))
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["mutransfer.status"] == "finished"


# --- 6. a damaged newest checkpoint: resume falls back to the newest intact one -------------------------------
@pytest.mark.slow  # trains in a subprocess or in process: an integration probe
def test_damaged_checkpoints_are_passed_over_and_replayed_steps_logged_once(shards, tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", shards, out, uri, data=dict(num_workers=1),
                          run=dict(steps=12, checkpoint_interval=4, keep_checkpoints=3, progress=False))
    first = run(python_command(config), tmp_path, timeout=HARD_TIMEOUT_S)
    assert first.returncode == 0, first.stderr[-3000:]
    reference = losses(out)
    step8, step12 = out / "checkpoints" / "step_00000008", out / "checkpoints" / "step_00000012"
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000004", step8.name, step12.name]
    cut_in_half(step12 / "mp_rank_00_model_states.pt")  # a truncated model file
    (step8 / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()  # a missing optimizer shard

    # named explicitly, a damaged checkpoint is an error before any work: exit 2, one line
    assert train_main(["--config", str(config), f"run.resume={step12}"]) == 2

    resumed = run(python_command(config), tmp_path, timeout=HARD_TIMEOUT_S)  # the same run, from step 4
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    assert f"checkpoint {step12} is damaged (mp_rank_00_model_states.pt has" in resumed.stderr
    assert f"checkpoint {step8} is damaged (zero_pp_rank_0_mp_rank_00_optim_states.pt is missing)" in resumed.stderr
    res = result(out)
    assert res["status"] == "finished" and res["step"] == 12
    # steps 5-12 were trained again from step 4: the same losses, each step once in metrics.jsonl and MLflow
    steps = [r["step"] for r in rows(out) if "train/loss" in r]
    assert steps == list(range(1, 13))
    again = losses(out)
    for step in range(5, 13):
        assert again[step] == pytest.approx(reference[step], abs=1e-6), step
    history = MlflowClient(uri).get_metric_history(res["mlflow_run_id"], "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 13))

