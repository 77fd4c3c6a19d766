"""How an entry point's process starts and ends (`mutransfer.process`): freed memory kept by the C allocator,
lasting imports out of the cyclic collector's reach, and an exit that runs the exit hooks and skips the
interpreter's teardown. Each case runs in a Python process of its own: these are settings of a whole process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# What a training step does to the allocator: several activation-sized blocks live at once, then all freed.
STEPS_FAULTS = """
import resource

def faults_of_steps():
    def step():
        blocks = [b"\\x01" * (6 << 20) for _ in range(6)]
        del blocks
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""


def run_python(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def faults(keep: bool, env: dict[str, str] | None = None) -> tuple[bool, int]:
    script = STEPS_FAULTS + f"""
from mutransfer.process import keep_freed_memory
kept = keep_freed_memory() if {keep} else False
print(kept, faults_of_steps())
"""
    proc = run_python(script, env)
    assert proc.returncode == 0, proc.stderr
    kept, count = proc.stdout.split()
    return kept == "True", int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_freed_memory_ends_the_page_faults_of_repeated_steps() -> None:
    """Six 6 MiB blocks allocated and freed ten times: glibc handed the heap's free top back to the kernel each
    time and faulted every page in again (about 92,000 faults); kept, none."""
    _, plain = faults(keep=False)
    kept, count = faults(keep=True)
    assert kept
    assert plain > 10 * 6 * 1000  # each step faulted its 36 MiB in again
    assert count < plain / 100


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_users_own_malloc_settings_are_left_alone() -> None:
    kept, count = faults(keep=True, env={"MALLOC_TRIM_THRESHOLD_": str(2**20)})
    assert not kept
    assert count > 10 * 6 * 1000


def test_lasting_imports_are_frozen_and_the_collector_runs_again_after() -> None:
    script = """
import gc
from mutransfer.process import lasting_imports
with lasting_imports():
    during = gc.isenabled()
    import json.tool, email.message  # noqa: F401
frozen = gc.get_freeze_count()

class Cycle:
    pass
cycle = Cycle()
cycle.me = cycle
del cycle
print(during, gc.isenabled(), frozen > 1000, gc.collect() >= 1)
"""
    proc = run_python(script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "True", "True"]


def test_exit_process_runs_the_exit_hooks_and_skips_interpreter_teardown(tmp_path: Path) -> None:
    """The entry points end through exit_process: the exit code and Python's exit hooks (MLflow, the loader's
    worker stop) are kept, while the interpreter's teardown, where an orphaned gloo group can abort the
    rank, never runs. The object below stands for that group: its destructor runs only at teardown."""
    script = f"""
import atexit, pathlib
from mutransfer.process import exit_process
out = pathlib.Path({str(tmp_path)!r})
atexit.register(lambda: (out / "hook").write_text("ran"))
class StandsForTheGroup:
    def __del__(self):
        (out / "teardown").write_text("ran")
group = StandsForTheGroup()
print("work done", flush=False)
exit_process(3)
"""
    proc = run_python(script)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "work done\n"  # buffered output is flushed
    assert (tmp_path / "hook").read_text() == "ran"
    assert not (tmp_path / "teardown").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_mutransfer_command_runs_as_an_entry_point(tmp_path: Path) -> None:
    """`mutransfer` (cli.run) keeps freed memory, freezes its command's imports and skips the teardown; what
    the exit hook sees is the process as its command left it."""
    script = STEPS_FAULTS + f"""
import atexit, gc, pathlib, sys
out = pathlib.Path({str(tmp_path)!r})
atexit.register(lambda: (out / "hook").write_text(f"{{gc.get_freeze_count() > 10000}} {{faults_of_steps()}}"))
class StandsForTeardown:
    def __del__(self):
        (out / "teardown").write_text("ran")
keep = StandsForTeardown()
sys.argv = ["mutransfer", "models"]
from mutransfer.cli import run
run()
"""
    proc = run_python(script)
    assert proc.returncode == 0, proc.stderr
    assert "vit_" in proc.stdout  # the command ran
    frozen, count = (tmp_path / "hook").read_text().split()
    assert frozen == "True" and int(count) < 1000
    assert not (tmp_path / "teardown").exists()


@pytest.mark.parametrize("uri, database", [("sqlite:///{tmp}/mlflow.db", True), ("http://127.0.0.1:9", False)])
def test_a_study_commands_lasting_imports_include_the_mlflow_it_will_use(tmp_path: Path, uri: str,
                                                                      database: bool) -> None:
    """A study command's lasting imports (which `run_entry_point` imports with the collector paused, then
    freezes) include MLflow's client, and MLflow's database code only for a database store; arguments that do
    not parse leave the error to `main`, printing nothing here."""
    uri = uri.format(tmp=tmp_path)
    script = f"""
import sys
from mutransfer.cli import command_imports
command_imports(["report", "--study", "s", "--out", "o", "--tracking-uri", {uri!r}])
print("mlflow.tracking" in sys.modules, "mlflow.store.tracking.sqlalchemy_store" in sys.modules)
command_imports(["report", "--no-such-option"])
"""
    proc = run_python(script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", str(database)]
    assert proc.stderr == ""
