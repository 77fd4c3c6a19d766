"""`mutransfer ui`: a real `mlflow server` over a real sqlite store, on loopback, stopped without leftovers."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from mutransfer.cli import main
from mutransfer.study import ui
from mutransfer.study.trial import TrialSpec
from mutransfer.train.tracking import training_experiment_id

pytestmark = pytest.mark.slow  # integration: real processes, engines or servers (make test-fast skips)

MUTRANSFER = Path(sys.executable).with_name("mutransfer")
STUDY = "ui-study"
# Generous bounds so that a slow shared machine does not fail the tests; nothing here measures time.
STARTUP_WAIT_S = 300
EXIT_WAIT_S = 60


def build_study(root: Path) -> tuple[str, str, str, list[str]]:
    """A study (parent + two trials) and an unrelated run; returns uri, experiment id, parent id, trial ids."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("ui-test")
    parent = client.create_run(experiment, tags={"mutransfer.study": STUDY, "mutransfer.role": "study"})
    trials = []
    for lr in ("0.001", "0.002"):
        run = client.create_run(experiment, tags={
            "mlflow.parentRunId": parent.info.run_id, "mutransfer.study": STUDY, "mutransfer.role": "proxy",
            "mutransfer.trial_key": f"t-{lr}", "mutransfer.status": "finished",
            **TrialSpec("mup", 32, 2, 32, 10, float(lr), 0.9, 0.0, 0).identity_tags()})
        client.log_metric(run.info.run_id, "final/eval_loss", float(lr) * 1000)
        trials.append(run.info.run_id)
    client.create_run(experiment, tags={"mutransfer.study": "another-study", "mutransfer.role": "study"})
    return uri, experiment, parent.info.run_id, trials


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def wait_for_line(lines: queue.Queue, prefix: str, seen: list[str]) -> str:
    while True:
        try:
            line = lines.get(timeout=STARTUP_WAIT_S)
        except queue.Empty:
            raise AssertionError(f"no line starting {prefix!r}; output so far: {seen}") from None
        if line is None:
            raise AssertionError(f"mutransfer ui ended before printing {prefix!r}; output: {seen}")
        seen.append(line)
        if line.startswith(prefix):
            return line.strip()


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_all(processes: list[psutil.Process]) -> None:
    """SIGKILL by pid; psutil checks each pid still names the process it saw, so reused pids are spared."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def test_ui_serves_the_study_and_stops_on_sigint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri, experiment, parent_id, trial_ids = build_study(tmp_path)
    port = ui.free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with (tmp_path / "ui.err").open("w") as err:
        cli = subprocess.Popen([str(MUTRANSFER), "ui", "--study", STUDY, "--tracking-uri", uri, "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=err, text=True, cwd=tmp_path, env=env,
                               start_new_session=True)
    started: list[psutil.Process] = []
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=read_lines, args=(cli.stdout, lines), daemon=True).start()
        seen: list[str] = []
        wait_for_line(lines, "MLflow UI for", seen)
        url = wait_for_line(lines, f"study {STUDY}: ", seen).split(": ", 1)[1]
        compare = wait_for_line(lines, "compare proxies: ", seen).split(": ", 1)[1]
        started = descendants(cli.pid)
        assert started, "the server runs as a child of mutransfer ui"

        base = f"http://127.0.0.1:{port}"
        assert url.startswith(f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning&")
        query = urllib.parse.parse_qs(url.split("?", 1)[1])
        assert query["orderByKey"] == ["metrics.`final/eval_loss`"] and query["orderByAsc"] == ["true"]
        found = post_json(f"{base}/api/2.0/mlflow/runs/search",
                          {"experiment_ids": [experiment], "filter": query["searchFilter"][0], "max_results": 100})
        assert {r["info"]["run_id"] for r in found["runs"]} == set(trial_ids)  # the trials, unfolded
        assert compare.startswith(f"{base}/#/compare-runs?")
        compared = urllib.parse.parse_qs(compare.split("?", 1)[1])
        assert json.loads(compared["runs"][0]) == trial_ids  # ordered by learning rate
        assert json.loads(compared["experiments"][0]) == [experiment]
        assert compared["workflowType"] == ["machine_learning"]

        os.kill(cli.pid, signal.SIGINT)
        assert cli.wait(timeout=EXIT_WAIT_S) == 0
        _, still_alive = psutil.wait_procs(started, timeout=EXIT_WAIT_S)
        assert alive(still_alive) == [], f"left running: {still_alive}"
        for process in started:
            with pytest.raises(ProcessLookupError):
                os.kill(process.pid, 0)
    finally:
        kill_all(started + descendants(cli.pid))
        if cli.poll() is None:
            cli.kill()
        cli.wait(timeout=EXIT_WAIT_S)


def test_artifact_logged_by_the_local_client_is_listed_through_the_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where the local client writes artifacts (./mlruns)
    uri, experiment, parent_id, _ = build_study(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    plot = tmp_path / "curve.txt"
    plot.write_text("the local client wrote this")
    client.log_artifact(parent_id, str(plot), "report")

    handle = ui.start_server(uri, startup_timeout=STARTUP_WAIT_S)
    group = [psutil.Process(handle.pid), *descendants(handle.pid)]
    try:
        assert handle.url.startswith("http://127.0.0.1:")
        listed = get_json(f"{handle.url}/ajax-api/2.0/mlflow/artifacts/list?run_id={parent_id}&path=report")
        assert [f["path"] for f in listed["files"]] == ["report/curve.txt"]
        query = urllib.parse.urlencode({"path": "report/curve.txt", "run_uuid": parent_id})
        with urllib.request.urlopen(f"{handle.url}/get-artifact?{query}", timeout=30) as response:
            assert response.read().decode() == plot.read_text()
        study = ui.study_url(handle, client, STUDY)
        assert study is not None and f"/#/experiments/{experiment}/runs?" in study
        assert ui.study_url(handle, client, "no-such-study") is None
        assert ui.compare_url(handle, client, "no-such-study") is None
    finally:
        handle.stop()
        kill_all(group)  # a no-op when stop() did its job, which the asserts below check
    assert handle.process.returncode is not None
    assert len(group) >= 2, "the mlflow server and its uvicorn worker"
    for process in group:
        assert not process.is_running(), process
        with pytest.raises(ProcessLookupError):
            os.kill(process.pid, 0)


def test_ui_refuses_a_server_uri_and_a_missing_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ui", "--tracking-uri", "http://127.0.0.1:5000"]) == 2
    assert "http://127.0.0.1:5000" in capsys.readouterr().err
    missing = tmp_path / "nothing.db"
    assert main(["ui", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not missing.exists()


def test_ui_names_an_unknown_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    uri, *_ = build_study(tmp_path)
    assert main(["ui", "--study", "no-such-study", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "no-such-study" in err and uri in err


def test_artifacts_of_a_sqlite_store_stay_beside_it_and_the_server_lists_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a run started from another directory
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(training_experiment_id(client, "my experiment"))
    note = tmp_path / "note.txt"
    note.write_text("beside the store")
    client.log_artifact(run.info.run_id, str(note), "report")
    assert not (elsewhere / "mlruns").exists()
    assert (tmp_path / "store" / "mlruns" / "my-experiment" / run.info.run_id / "artifacts" / "report" / "note.txt").is_file()
    handle = ui.start_server(uri, startup_timeout=STARTUP_WAIT_S)
    try:
        listed = get_json(f"{handle.url}/ajax-api/2.0/mlflow/artifacts/list?run_id={run.info.run_id}&path=report")
        assert [f["path"] for f in listed["files"]] == ["report/note.txt"]
        # a run logged through the server, in an experiment the server creates: its artifacts land beside the
        # store too, not in the server's or this process's working directory
        remote = MlflowClient(tracking_uri=handle.url)
        served = remote.create_run(training_experiment_id(remote, "through the server"))
        remote.log_artifact(served.info.run_id, str(note), "report")
        assert [p.name for p in (tmp_path / "store" / "mlruns").rglob("note.txt")] == ["note.txt", "note.txt"]
    finally:
        handle.stop()
    assert not (elsewhere / "mlruns").exists() and not (Path.cwd() / "mlruns").exists()
