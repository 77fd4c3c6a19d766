"""Processes for the tests without the import bill: one server process imports torch, torchvision, timm,
DeepSpeed and MLflow once, then forks a child for each command a test runs (`python -m mutransfer.train ...`,
`mutransfer sweep ...`, `python tests/.../script.py ...`).

Why: those imports cost every fresh interpreter 12-14 s of CPU on a slow 2-core machine (torch 4 s,
torchvision's eager import of torch._dynamo 4.6 s, DeepSpeed with the MLflow it imports 3.4 s), about as much
as the test's own work in most launches, and the suite starts well over a hundred such processes.

What a child is: a real process of its own (own pid, its own session when asked, the environment, working
directory, argv, stdin and stdout/stderr the test gives it), running the command's code from its first line
(none of mutransfer is imported in the server); it exits as the command would, through the interpreter's
normal exit (atexit handlers, exit code from SystemExit, -N when a signal kills it). Only our commands whose
start-up environment (`START_UP`) equals the server's are forked (`eligible`): anything else, and every command
when MUTRANSFER_TEST_WARM=0, starts a fresh interpreter as before, so the two ways can be compared. At the end
the suite's stderr says how many were forked and why any of ours started fresh.

Protocol: one SOCK_SEQPACKET connection per child. The client sends the request (JSON) with its three
standard-stream descriptors attached; the server answers {"pid": N}, then {"returncode": R} when the child ends.
"""

from __future__ import annotations

import array
import atexit
import json
import os
import runpy
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HEAVY = ("torch", "torchvision", "timm", "deepspeed", "mlflow")
BIN = Path(sys.executable).parent
# The variables a fresh interpreter or the heavy imports read as they start (the interpreter's own, the dynamic
# loader's, OpenMP / BLAS thread pools, DeepSpeed's accelerator, torch's and CUDA's, the locale): a command forks
# only when these are as the server had them. The rest (ranks, MLflow, ours, what in-process runs of the
# tests set) is read when called, and the child has the command's own values of them.
START_UP = ("PYTHON", "LD_", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "DS_", "CUDA_", "TORCH_", "LC_", "LANG")
TESTS = Path(__file__).resolve().parent  # scripts by path that may fork: the tests' own


# --- the server ------------------------------------------------------------------------------------------
def serve(path: str) -> dict[str, Any] | None:
    """Accept requests on the socket at `path` until stdin closes (the suite ended) or SIGTERM; fork a child
    for each. Returns, in the child only, the request it is to run."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path + ".new")
    listener.listen(64)
    os.rename(path + ".new", path)  # the path appears when it accepts: the client waits for it
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(sys.stdin, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    while True:
        for key, _ in selector.select(timeout=0.05):
            if key.fileobj is sys.stdin:
                return None  # the client side is gone: end (children go on until they end)
            conn, _ = listener.accept()
            conn.settimeout(30)
            try:
                request, fds = _receive(conn)
            except (OSError, ValueError):  # a client that died while asking: nothing to start
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                for other in (listener, *children.values()):
                    other.close()
                selector.close()
                conn.close()
                return {**request, "fds": fds}
            for fd in fds:
                os.close(fd)
            conn.send(json.dumps({"pid": pid}).encode())
            children[pid] = conn
        _reap(children)


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    fds = array.array("i")
    data, ancillary, _flags, _addr = conn.recvmsg(1 << 20, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return json.loads(data), list(fds)


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            try:
                conn.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
            except OSError:
                pass  # the test that started it is gone
            conn.close()


def become(request: dict[str, Any]) -> None:
    """In the child: take the request's streams, session, directory, environment and argv, then run the
    command as `python` would. Its exit is the interpreter's."""
    if request["new_session"]:
        os.setsid()
    for target, fd in enumerate(request["fds"]):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    if argv[0] == str(BIN / "mutransfer"):  # the console script, as pip writes it
        sys.path[0], sys.argv = str(BIN), list(argv)
        from mutransfer.cli import run

        sys.exit(run())
    sys.path[0] = os.getcwd() if argv[1] == "-m" else str(Path(argv[1]).resolve().parent)
    if argv[1] == "-m":
        sys.argv = [argv[2], *argv[3:]]  # runpy puts the module's path in argv[0]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv[1:]
        runpy.run_path(argv[1], run_name="__main__")


def server_main(path: str) -> None:
    for name in HEAVY:
        __import__(name)
    if threading.active_count() != 1:  # a forked child would hold a copy of a lock some thread has
        print(f"warm_start: imports started threads {threading.enumerate()}", file=sys.stderr, flush=True)
        sys.exit(3)
    request = serve(path)
    if request is not None:
        become(request)


# --- the client ------------------------------------------------------------------------------------------
class WarmServer:
    """The suite's server: started on first use, ended (by its pid) when the suite's process exits."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="warm_start_")
        self.path = os.path.join(self.folder, "socket")
        self.env = _server_env()
        self.log = os.path.join(self.folder, "server.log")
        with open(self.log, "wb") as log:  # its stdin stays open while the suite runs: EOF ends it
            self.process = subprocess.Popen([sys.executable, __file__, self.path], env=self.env,
                                            stdin=subprocess.PIPE, stdout=log, stderr=log)
        atexit.register(self.close)
        deadline = time.monotonic() + 300
        while not os.path.exists(self.path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the warm-start server did not start: {Path(self.log).read_text()[-3000:]}")
            time.sleep(0.05)

    def close(self) -> None:
        print(f"warm_start: {len(FORKED)} test processes forked warm, {len(FRESH)} of ours started fresh"
              + "".join(f"\n  {why}" for why in sorted(set(FRESH))), file=sys.stderr)
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def _server_env() -> dict[str, str]:
    from train_helpers import run_env

    return run_env()


def _start_up(env: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if name.startswith(START_UP)}


_server: WarmServer | None = None
_broken: str | None = None  # why the server could not start: every process starts fresh from then on


def enabled() -> bool:
    return os.environ.get("MUTRANSFER_TEST_WARM", "1") != "0" and _broken is None


def eligible(command: list[str], env: dict[str, str]) -> bool:
    """Whether `command` may be forked from the server: enabled, a form `become` runs (our console script,
    `python -m mutransfer...`, or one of the tests' own scripts) and the server's start-up environment."""
    return enabled() and ours(command) and not start_up_differences(env)


def ours(command: list[str]) -> bool:
    """Our console script, `python -m mutransfer...`, or `python` running one of the tests' own scripts."""
    if command and command[0] == str(BIN / "mutransfer"):
        return True
    if len(command) < 2 or command[0] != sys.executable:
        return False
    return (len(command) > 2 and command[1] == "-m" and command[2].split(".")[0] == "mutransfer") or (
        command[1].endswith(".py") and Path(command[1]).resolve().is_relative_to(TESTS))


def start_up_differences(env: dict[str, str]) -> list[str]:
    """The `START_UP` variables `env` has otherwise than the server (than it would have, before it starts)."""
    mine, its = _start_up(env), _start_up(_server.env if _server is not None else _server_env())
    return sorted(name for name in mine.keys() | its.keys() if mine.get(name) != its.get(name))


def server() -> WarmServer | None:
    """The running server, started on first use; None when it cannot start (said once, on stderr)."""
    global _server, _broken
    if _broken is None and (_server is None or _server.process.poll() is not None):
        if _server is not None:
            print(f"warm_start: the server ended ({_server.process.returncode}); starting another. Its log: "
                  f"{Path(_server.log).read_text()[-2000:]}", file=sys.stderr)
        try:
            _server = WarmServer()
        except RuntimeError as err:
            _broken = str(err)
            print(f"warm_start: every test process starts fresh: {err}", file=sys.stderr)
    return None if _broken else _server


class WarmProcess:
    """A forked child, as much of `subprocess.Popen` as the tests use: pid, poll, wait, signals, returncode,
    and `stdout` / `stderr` pipes when asked for (subprocess.PIPE; `text=True` reads str)."""

    def __init__(self, command: list[str], cwd: Path | str, env: dict[str, str], stdout: Any = None,
                 stderr: Any = None, stdin: Any = subprocess.DEVNULL, text: bool = False,
                 start_new_session: bool = False) -> None:
        if stdin is subprocess.PIPE:  # `popen` starts these fresh; the child's descriptors here are outputs
            raise ValueError("WarmProcess gives no stdin pipe")
        self.args, self.returncode = command, None
        self.stdin = self.stdout = self.stderr = None
        streams: list[int] = []  # this side's copies of the child's descriptors, closed once sent
        for index, (wanted, default) in enumerate(((stdin, 0), (stdout, 1), (stderr, 2))):
            fd, kept = self._descriptor(wanted, default, streams)
            streams.append(fd)
            if kept is not None:
                setattr(self, ("stdin", "stdout", "stderr")[index], _wrap(kept, text))
        self.connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.connection.connect(server().path)
        request = dict(argv=[str(a) for a in command], cwd=str(cwd), env=env, new_session=start_new_session)
        try:
            self.connection.sendmsg([json.dumps(request).encode()],
                                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", streams))])
        finally:
            for fd in streams:
                os.close(fd)
        self.pid = json.loads(self.connection.recv(4096))["pid"]

    @staticmethod
    def _descriptor(wanted: Any, default: int, streams: list[int]) -> tuple[int, int | None]:
        """The descriptor the child gets for a stream (default: this process's `default`), and the pipe end
        this side keeps (or None)."""
        if wanted is subprocess.PIPE:  # stdout or stderr (`popen` starts a piped stdin the usual way)
            read, write = os.pipe()
            return write, read
        if wanted is subprocess.DEVNULL:
            return os.open(os.devnull, os.O_RDWR), None
        if wanted is subprocess.STDOUT:
            return os.dup(streams[1]), None
        if wanted is None:
            return os.dup(default), None
        return os.dup(wanted if isinstance(wanted, int) else wanted.fileno()), None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.connection.setblocking(False)
            try:
                self._ended(self.connection.recv(4096))
            except BlockingIOError:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.connection.setblocking(True)
            self.connection.settimeout(timeout)
            try:
                self._ended(self.connection.recv(4096))
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def _ended(self, message: bytes) -> None:
        self.returncode = json.loads(message)["returncode"] if message else -signal.SIGKILL  # server gone
        self.connection.close()

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        """Read stdout and stderr (where piped) to their ends, then wait."""
        deadline = None if timeout is None else time.monotonic() + timeout
        results: dict[str, Any] = {}
        readers = [threading.Thread(target=lambda n=name: results.__setitem__(n, getattr(self, n).read()),
                                    daemon=True) for name in ("stdout", "stderr") if getattr(self, name)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return results.get("stdout"), results.get("stderr")

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __enter__(self) -> WarmProcess:
        return self

    def __exit__(self, *_exc: Any) -> None:
        for stream in (self.stdout, self.stderr):
            if stream:
                stream.close()
        self.wait()


def _wrap(fd: int, text: bool) -> Any:
    return open(fd, errors="replace") if text else open(fd, "rb")


FORKED: list[str] = []  # the commands of ours `popen` forked, and why it started the others fresh (said at the end)
FRESH: list[str] = []


def popen(command: list[str], cwd: Path | str, env: dict[str, str], **kwargs: Any) -> Any:
    """A WarmProcess where `eligible`, else a subprocess.Popen (the same arguments)."""
    if kwargs.get("stdin") is not subprocess.PIPE and eligible(command, env) and server() is not None:
        FORKED.append(command[0])
        return WarmProcess(command, cwd, env, **kwargs)
    if ours(command) and enabled():
        why = "its stdin is a pipe" if kwargs.get("stdin") is subprocess.PIPE else \
            f"start-up environment differs in {start_up_differences(env)}"
        FRESH.append(f"{' '.join(command[:3])}: {why}")
    return subprocess.Popen(command, cwd=cwd, env=env, **kwargs)


if __name__ == "__main__":
    server_main(sys.argv[1])
