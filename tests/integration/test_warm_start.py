"""tests/warm_start.py: a command forked from the warm server behaves as the same command started fresh
(argv, directory, environment, sys.path, session, streams, exit code, atexit, death by a signal), and
commands it must not fork start fresh."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import warm_start
from train_helpers import run_env

PROBE = str(Path(__file__).with_name("warm_probe.py"))


def both(command: list[str], cwd: Path, **kwargs) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of `command` forked warm and started fresh."""
    env = dict(run_env(), PROBE="x y")
    warm = warm_start.WarmProcess(command, cwd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  **kwargs)
    fresh = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL, **kwargs)
    return [(p.returncode, out, err) for p in (warm, fresh) for out, err in [p.communicate(timeout=120)]]


@pytest.mark.parametrize("code", [0, 3])
@pytest.mark.parametrize("session", [False, True])
def test_a_warm_child_is_the_command_started_fresh(code, session, tmp_path) -> None:
    warm, fresh = both([sys.executable, PROBE, "exit", str(code)], tmp_path, start_new_session=session)
    assert warm == fresh
    assert warm[0] == code and warm[1].endswith("atexit ran\n") and warm[2] == "to stderr\n"
    assert f'"cwd": "{tmp_path}"' in warm[1] and '"probe": "x y"' in warm[1]
    assert f'"own_session": {str(session).lower()}' in warm[1] and '"name": "__main__"' in warm[1]


def test_a_signal_ends_a_warm_child_as_it_ends_a_fresh_one(tmp_path) -> None:
    ends = []
    for make in (warm_start.WarmProcess, None):
        command = [sys.executable, PROBE, "sleep", "0"]
        kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        proc = make(command, tmp_path, run_env(), **kwargs) if make else \
            subprocess.Popen(command, cwd=tmp_path, env=run_env(), stdin=subprocess.DEVNULL, **kwargs)
        assert proc.stdout.readline().startswith("{")  # started and waiting
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)
        proc.send_signal(signal.SIGTERM)
        ends.append((proc.wait(timeout=60), proc.poll()))
        proc.stdout.close()
    assert ends == [(-signal.SIGTERM, -signal.SIGTERM)] * 2


def test_what_may_be_forked(tmp_path) -> None:
    env = run_env()
    assert warm_start.eligible([sys.executable, "-m", "mutransfer.train", "--config", "x"], env)
    assert warm_start.eligible([str(warm_start.BIN / "mutransfer"), "sweep"], dict(env, RANK="1", MLFLOW_X="y"))
    assert warm_start.eligible([sys.executable, PROBE], env)
    assert not warm_start.eligible([sys.executable, "-m", "mlflow", "server"], env)  # not ours
    assert not warm_start.eligible([sys.executable, "-c", "pass"], env)
    assert not warm_start.eligible([sys.executable, str(tmp_path / "elsewhere.py")], env)
    assert not warm_start.eligible([sys.executable, "-m", "mutransfer.train"], dict(env, OMP_NUM_THREADS="2"))
    assert isinstance(warm_start.popen([sys.executable, "-c", "pass"], tmp_path, env), subprocess.Popen)
