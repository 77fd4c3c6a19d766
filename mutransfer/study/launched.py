"""A sweep's trials as launches (`mutransfer sweep --launcher deepspeed|torchrun`), `--parallel P` at a time,
each slot on its own block of `--gpus-per-trial` GPUs, in a process group of its own.

What a slot runs is a stack of the sweep's plan (`stacks.plan_stacks`):
- a stack of several trials of one shape: one plain Python process (`stack_worker`) pinned to the slot's
  GPU with CUDA_VISIBLE_DEVICES (on CPU, just a process), training them as one stacked model exactly as an
  in-process sweep does. A stack is one process on one device, so it needs no launcher: `--launcher` does
  not change how a stack starts.
- a lone trial (`--stack 1`, a study whose configs cannot stack, a shape with one trial left): one
  `deepspeed` / `torchrun` launch of `mutransfer.train` on the slot's GPUs, as before stacking.
Each trial is claimed before its launch starts and released when it ends. A stop signal is passed on to
every running launch (DeepSpeed's runner does not pass it to its ranks); each stops at its next step.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mutransfer.launch.trials import pinned_environment, signal_group, trial_command
from mutransfer.tags import RunStatus
from mutransfer.train.config import save_config

from .claims import TrialClaims
from .stack_worker import read_statuses, write_plan
from .stacks import stack_sizer
from .sweep_context import SweepContext, SweepStop
from .trial import TrialSpec

log = logging.getLogger(__name__)


@dataclass
class Launch:
    """One running slot: its process, the trials it trains, its GPUs, and (a stack) its plan file."""

    proc: subprocess.Popen
    trials: list[TrialSpec]
    gpus: list[int]
    plan: Path | None = None
    log_path: Path | None = None


def launched_sizer(stack: int | None, ctx: SweepContext, parallel: int, total: int):
    """`size_for` of `plan_stacks` for launched slots. Automatic K: as many trials as fit in half the free
    memory of one GPU (on CPU, the slots share the host's half), and at most an even share of the sweep's
    `total` trials per slot, so that every slot gets a stack."""
    import torch

    from mutransfer.train.stack_memory import SHARE_OF_FREE, auto_stack_size

    share = SHARE_OF_FREE if torch.cuda.is_available() else SHARE_OF_FREE / parallel
    even = math.ceil(total / parallel)
    return stack_sizer(stack, ctx.config, auto=lambda cfg, count: min(even, auto_stack_size(cfg, count, share=share)))


def run_launched(ctx: SweepContext, stacks: list[list[TrialSpec]], claims: TrialClaims, stop: SweepStop,
                 launcher: str, parallel: int, gpus_per_trial: int) -> None:
    """Stack after stack in up to `parallel` slots, until done or told to stop."""
    free_slots = [list(range(i * gpus_per_trial, (i + 1) * gpus_per_trial)) for i in range(parallel)]
    running: list[Launch] = []
    queue = list(stacks)
    forwarded = False
    while (queue and stop.signal is None) or running:
        while queue and free_slots and stop.signal is None:
            claimed = ctx.claim(claims, queue.pop(0))
            if claimed:
                running.append(_start(ctx, claimed, launcher, free_slots.pop(0)))
        if stop.signal is not None and not forwarded:
            for launch in running:
                signal_group(launch.proc, signal.SIGTERM)  # each trial checkpoints (if it keeps any) and stops
            forwarded = True
        time.sleep(0.5)
        for launch in [launch for launch in running if launch.proc.poll() is not None]:
            running.remove(launch)
            free_slots.append(launch.gpus)
            for trial in launch.trials:
                claims.release(trial.key)
            ctx.record(launch.trials, _outcomes(ctx, launch, forwarded))


def _start(ctx: SweepContext, claimed: dict[TrialSpec, str | None], launcher: str, gpus: list[int]) -> Launch:
    if len(claimed) == 1:
        (trial, continued), = claimed.items()
        return _launch_trial(ctx, trial, continued, launcher, gpus)
    return _launch_stack(ctx, claimed, gpus)


def _trial_file(ctx: SweepContext, trial: TrialSpec, continued: str | None, ranks: int = 1) -> Path:
    """The trial's RunConfig written to <trial folder>/trial.yaml, for the launch to read."""
    folder = ctx.cfg.output_dir / trial.key
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "trial.yaml"
    save_config(ctx.config(trial, continued, ranks), path)
    return path


def _launch_trial(ctx: SweepContext, trial: TrialSpec, continued: str | None, launcher: str, gpus: list[int]
                  ) -> Launch:
    """One trial as a deepspeed / torchrun launch on `gpus`, its output in the trial's launch.log."""
    from mutransfer.netutil import free_port

    cmd, env = trial_command(launcher, _trial_file(ctx, trial, continued, ranks=len(gpus)), gpus, free_port())
    log_path = ctx.cfg.output_dir / trial.key / "launch.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Launch(proc, [trial], gpus, log_path=log_path)


def _launch_stack(ctx: SweepContext, claimed: dict[TrialSpec, str | None], gpus: list[int]) -> Launch:
    """The claimed trials as one stack in a `stack_worker` process pinned to the slot's first GPU; its plan,
    statuses and output in <study output_dir>/stacks/<first trial key>+<others>.*"""
    trials = list(claimed)
    configs = {trial.key: _trial_file(ctx, trial, continued) for trial, continued in claimed.items()}
    name = f"{trials[0].key}+{len(trials) - 1}"
    plan = write_plan(ctx.cfg.output_dir / "stacks" / f"{name}.json", configs)
    log_path = plan.with_suffix(".log")
    cmd = [sys.executable, "-m", "mutransfer.study.stack_worker", str(plan)]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, env=pinned_environment(gpus[:1]), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Launch(proc, trials, gpus, plan=plan, log_path=log_path)


def _outcomes(ctx: SweepContext, launch: Launch, forwarded: bool) -> list[str]:
    """Each trial's sweep status once its launch ended: from the stack's statuses file, or from a lone
    trial's exit code and result.json; a launch that ended without saying is interrupted when the sweep
    was stopped, else failed."""
    from mutransfer.train.trainer import EXIT_DIVERGED

    code = launch.proc.returncode
    unsaid = RunStatus.INTERRUPTED if forwarded else RunStatus.FAILED
    if launch.plan is not None:
        said = read_statuses(launch.plan)
        statuses = [said.get(trial.key, unsaid) for trial in launch.trials]
    else:
        folder = ctx.cfg.output_dir / launch.trials[0].key
        statuses = [{0: _launched_status(folder), EXIT_DIVERGED: RunStatus.DIVERGED}.get(code, unsaid)]
    failed = [t.key for t, status in zip(launch.trials, statuses) if status == RunStatus.FAILED]
    if failed:
        log.error(f"trial(s) {', '.join(failed)} failed (exit {code}); see {launch.log_path}")
    return statuses


def _launched_status(folder: Path) -> str:
    """finished, or interrupted for a launch that exited 0 after a stop signal (result.json says preempted)."""
    try:
        status = json.loads((folder / "result.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return RunStatus.FINISHED
    return RunStatus.INTERRUPTED if status == RunStatus.PREEMPTED else status
