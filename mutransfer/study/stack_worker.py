"""`python -m mutransfer.study.stack_worker PLAN`: one slot of a launched sweep (`--launcher deepspeed|torchrun`
with stacking) trains the trials its plan lists as one stack, in this one process, on the one GPU it is
pinned to (CUDA_VISIBLE_DEVICES), through the in-process sweep's own code path (`stacks.train_trials`: the
same child runs, statuses, stop handling and resume), and writes each trial's sweep status for the sweep.

The plan is JSON written by the sweep (`write_plan`): {"trials": {trial key: path of its RunConfig YAML},
"statuses": path}. The sweep holds the trials' claims while this runs and reads the statuses when it exits;
a worker that ends without writing them (killed, or failed before its stack started) leaves its trials
interrupted or failed, by how it ended, and their child runs for the next sweep to continue. Stop signals are
held from start to end: the stack stops at its next sync point, and the statuses are still written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mutransfer.train.signals import StopRequest


def write_plan(path: Path, configs: dict[str, Path]) -> Path:
    """Write the plan of one stack to `path` (its statuses go beside it, any old ones removed)."""
    statuses = path.with_suffix(".statuses.json")
    statuses.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"trials": {key: str(p) for key, p in configs.items()}, "statuses": str(statuses)}))
    return path


def read_statuses(plan: Path) -> dict[str, str]:
    """The statuses the worker of `plan` wrote: trial key -> sweep status; empty when it wrote none."""
    try:
        path = Path(json.loads(plan.read_text())["statuses"])
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def train_plan(plan: Path) -> dict[str, str]:
    """Train the plan's trials as one stack (one alone when it lists one); write and return their statuses."""
    from mutransfer.train.config import load_config

    from .stacks import train_trials

    spec = json.loads(plan.read_text())
    configs: dict[str, str] = spec["trials"]
    statuses = train_trials(lambda: [load_config(path) for path in configs.values()], list(configs))
    written = dict(zip(configs, statuses))
    target = Path(spec["statuses"])
    draft = target.with_name(f"{target.name}.{os.getpid()}.draft")
    draft.write_text(json.dumps(written))
    draft.replace(target)  # whole or absent: the sweep never reads half a file
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mutransfer.study.stack_worker PLAN.json", file=sys.stderr)
        return 2
    from mutransfer.logs import configure_logging

    configure_logging()  # an entry point of its own: the members' messages go to the stack's log
    # Held until the statuses are written: the sweep signals the launch's whole group, and the launcher passes
    # its own SIGTERM on, so a stopped worker gets two. The stack stops at its next sync point on the first.
    with StopRequest():
        train_plan(Path(args[0]))
    return 0


if __name__ == "__main__":
    import importlib

    from mutransfer.process import run_entry_point

    run_entry_point(main, lambda: importlib.import_module("mutransfer.study.stacks"))
