"""`mutransfer ui`: the MLflow web UI over our local store, on loopback, for as long as the command runs.

The server is `mlflow server` in its own process group (so a Ctrl-C in the terminal reaches us, not it, and
stopping it means signalling the whole group, uvicorn worker included), with one worker and MLflow's job
executor off: the defaults start about 15 processes and 3 GB for a UI that one person browses.

Artifacts: MLflow's local client (sqlite store, no server) writes them under `./mlruns/<experiment>/...` and
records that absolute path as the experiment's artifact location, which the server reads directly when the UI
lists or fetches a run's artifacts. For experiments created through the UI, the server is given the same
root, so everything stays in one place.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mutransfer import tags
from mutransfer.errors import UsageError
from mutransfer.netutil import free_port
from mutransfer.train.tracking import local_store_path, store_artifact_root

from .store import find_study_run

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 180.0  # a cold start on a busy 2-core machine takes tens of seconds
STOP_TIMEOUT_S = 15.0


class ServerError(RuntimeError):
    """The MLflow server did not come up."""


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is free
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _signal_reaches(kill, target: int) -> bool:
    """Whether signal 0 reaches a process (os.kill) or a process group (os.killpg)."""
    try:
        kill(target, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is just not ours
        return True
    return True


def _alive(pid: int) -> bool:
    return _signal_reaches(os.kill, pid)


def _group_alive(pgid: int) -> bool:
    return _signal_reaches(os.killpg, pgid)


@dataclass
class ServerHandle:
    """A running `mlflow server`. Stop it with `.stop()` (or use it as a context manager)."""

    process: subprocess.Popen
    port: int
    tracking_uri: str
    log_path: Path
    url: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the server's process group, wait, then SIGKILL whatever is left. Idempotent."""
        pgid = self.process.pid  # it leads its own group (start_new_session)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            if self._wait_group_gone(pgid, timeout):
                break
        self.process.wait()  # reap the leader in every case
        self.log_path.unlink(missing_ok=True)

    def _wait_group_gone(self, pgid: int, timeout: float) -> bool:
        """Whether the leader and every other member of its group (the uvicorn worker) exit in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # poll() reaps the leader: an unreaped zombie would still count as a member of the group
            if self.process.poll() is not None and not _group_alive(pgid):
                return True
            time.sleep(0.1)
        return False

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def server_command(tracking_uri: str, port: int, artifacts: Path) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", tracking_uri,
        "--host", HOST, "--port", str(port),
        "--workers", "1",
        "--default-artifact-root", str(artifacts),
        # runs logged through an artifact-proxying server (mlflow-artifacts:/ URIs) resolve under the same root
        "--serve-artifacts", "--artifacts-destination", str(artifacts),
    ]


def start_server(tracking_uri: str, port: int | None = None,
                 startup_timeout: float = STARTUP_TIMEOUT_S) -> ServerHandle:
    """Start `mlflow server` over a local store and wait until /health answers.

    ValueError for a store that is not local (or a sqlite file that does not exist); ServerError, with the
    server's log tail, when it exits or does not answer within `startup_timeout` seconds.
    """
    _, path = local_store_path(tracking_uri)
    if not path.exists():
        raise UsageError(f"no MLflow store at {path} ({tracking_uri})")
    # checked up front: /health answered by someone else's server must not pass for ours
    if port and port_in_use(port):
        raise UsageError(f"port {port} on {HOST} is already in use")
    port = port or free_port(HOST)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)  # the server's own store is the one on its command line
    handle_fd, log_name = tempfile.mkstemp(prefix=f"mutransfer-ui-{port}-", suffix=".log")
    log_path = Path(log_name)
    with os.fdopen(handle_fd, "wb") as log:  # a file, not a pipe: nobody drains a pipe while we block
        # new experiments' artifacts go beside the store, as ours do; older runs keep their absolute locations
        process = subprocess.Popen(server_command(tracking_uri, port, store_artifact_root(tracking_uri)),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    handle = ServerHandle(process, port, tracking_uri, log_path)
    deadline = time.monotonic() + startup_timeout
    try:
        while not (handle.running() and _healthy(handle.url)):
            if not handle.running() or time.monotonic() > deadline:
                why = (f"exited with code {process.returncode}" if not handle.running()
                       else f"did not answer {handle.url}/health within {startup_timeout:.0f} s")
                raise ServerError(f"mlflow server on port {port} {why}; its output ended with:\n"
                                  f"{_tail(log_path)}")
            time.sleep(0.5)
    except BaseException:  # a Ctrl-C while waiting too: never leave the server behind
        handle.stop()
        raise
    return handle


def study_filter(study: str) -> str:
    return f"tags.`{tags.STUDY}` = '{study}'"


# MLflow 3.17's UI opens every experiment as GenAI (traces) unless the workflow switch says otherwise; the
# switch lives in the browser's local storage, and this query parameter sets it for the page it opens.
TRAINING_WORKFLOW = "workflowType=machine_learning"
RANKING_METRIC = "final/eval_loss"


def _quoted(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def study_url(handle: ServerHandle, client, study: str, experiment: str | None = None) -> str | None:
    """The UI's runs table of the study's trials (proxies and target), best final eval loss first; None when
    there is no such study.

    MLflow 3.17's UI uses hash routing: /#/experiments/<id>/runs reads `searchFilter`, `orderByKey` and
    `orderByAsc` from the route's query string. The parent run is left out so that the trials are rows of
    their own rather than children folded under it.
    """
    parent = find_study_run(client, study, experiment)
    if parent is None:
        return None
    trials = f"{study_filter(study)} and tags.`{tags.ROLE}` != 'study'"
    return (f"{handle.url}/#/experiments/{parent.info.experiment_id}/runs?{TRAINING_WORKFLOW}"
            f"&searchFilter={_quoted(trials)}&orderByKey={_quoted(f'metrics.`{RANKING_METRIC}`')}&orderByAsc=true")


def compare_url(handle: ServerHandle, client, study: str, experiment: str | None = None) -> str | None:
    """The compare-runs page of the study's proxies (one run per trial), or None when it has none.

    The page puts every run's params (optim.lr, optim.momentum / optim.beta1, model.width, model.depth,
    parametrization), its metrics (final/eval_loss, ...) and its tags side by side, with a parallel
    coordinates plot on top. Runs are ordered by shape, then learning rate.
    """
    import json

    from .store import grid_order, latest_per_key, load_trials

    parent = find_study_run(client, study, experiment)
    if parent is None:
        return None
    proxies = latest_per_key(load_trials(client, study, experiment))
    if not proxies:
        return None
    proxies.sort(key=grid_order)
    ids = json.dumps([t.run_id for t in proxies])
    experiments = json.dumps([parent.info.experiment_id])
    return (f"{handle.url}/#/compare-runs?runs={_quoted(ids)}&experiments={_quoted(experiments)}"
            f"&{TRAINING_WORKFLOW}")


def wait_for_stop_signal(handle: ServerHandle) -> int:
    """Block until SIGINT or SIGTERM (0) or until the server dies on its own (1)."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            if not handle.running():
                return 1
        return 0
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def serve(uri: str, client, port: int | None, study: str | None, experiment: str | None) -> int:
    """Serve the store until SIGINT / SIGTERM (0) or until the server dies (1), printing the study's URLs;
    the server is stopped on every way out. ValueError for a port that is taken."""
    # Until the stop-signal wait takes over, SIGTERM interrupts like Ctrl-C, so the server is still stopped.
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGTERM: signal.signal(signal.SIGTERM, signal.default_int_handler)}
    handle: ServerHandle | None = None
    try:
        try:
            handle = start_server(uri, port)
        except ServerError as err:
            log.error(f"mutransfer ui: {err}")
            return 1
        print(f"MLflow UI for {uri} at {handle.url} (server pid {handle.pid})", flush=True)
        if study:
            print(f"study {study}: {study_url(handle, client, study, experiment)}", flush=True)
            compare = compare_url(handle, client, study, experiment)
            if compare:
                print(f"compare proxies: {compare}", flush=True)
        print("press Ctrl-C to stop", flush=True)
        code = wait_for_stop_signal(handle)
        if code:
            log.error(f"mutransfer ui: the server exited on its own; its output ended with:\n{_tail(handle.log_path)}")
        return code
    except KeyboardInterrupt:
        return 130 if handle is None else 0
    finally:
        # a second Ctrl-C must not cut the shutdown short and leave the server running
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        if handle is not None:
            handle.stop()
            print("MLflow UI stopped", flush=True)
        for sig, old in previous.items():
            signal.signal(sig, old)
