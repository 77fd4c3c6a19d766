"""sbatch scripts: one multi-node training run (`mutransfer launch --slurm`) and a proxy study as a job array
(`mutransfer sweep --slurm`), both requeued when preempted or near their time limit.

Preemption, as the scripts handle it:
- `--signal=B:TERM@<s>` has SLURM send SIGTERM to the batch shell <s> seconds before the time limit; on
  preemption SLURM signals every process of the job itself. The shell's trap forwards SIGTERM to `srun`,
  which signals every process of its step: each rank, DeepSpeed's per-node launcher and the loader workers
  (which ignore it). The ranks agree on a step, save one checkpoint and exit 0; the trap waits for that,
  then `scontrol requeue`s the job (`--requeue`), unless the run had already finished.
- The requeued job keeps its job id and runs the same script: the output directory is spelled out in the
  script (never derived from the job id), and `run.resume=auto` continues from the newest complete
  checkpoint in it. A sweep's array task reruns its trial, which `mutransfer sweep` resumes or skips if done.
- DeepSpeed's per-node launcher, once signalled, gives its ranks 30 s to exit before it kills them: the
  preemption checkpoint must fit in that (set `run.checkpoint_interval` as a backstop for huge models).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mutransfer.errors import UsageError
from mutransfer.typed_config import check_path_text

from .multinode import DEFAULT_MASTER_PORT, TrainLaunch, deepspeed_executable

RESUME_PIN = "run.resume=auto"  # a requeued job continues from the newest checkpoint in its output_dir


@dataclass
class SlurmOptions:
    """#SBATCH settings common to both scripts."""

    job_name: str
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    """Time limit, in any form sbatch takes (e.g. 24:00:00, 2-00:00:00)."""
    cpus_per_task: int | None = None
    signal_seconds: int = 120
    """SIGTERM this long before the time limit: time to write the checkpoint."""
    extra: list[str] = field(default_factory=list)
    """Further sbatch options, each one line (e.g. --qos=high, --constraint=h100)."""

    def validate(self) -> None:
        for name, value in (("--job-name", self.job_name), ("--partition", self.partition),
                            ("--account", self.account), ("--time", self.time), *(("--sbatch", e) for e in self.extra)):
            if value is not None and (not value.strip() or any(c in value for c in "\n\r")):
                raise UsageError(f"{name}: {value!r} must be one non-empty line")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise UsageError(f"--cpus-per-task must be at least 1, got {self.cpus_per_task}")
        if self.signal_seconds < 10:
            raise UsageError(f"--signal-seconds must be at least 10, got {self.signal_seconds}")

    def lines(self) -> list[str]:
        lines = [f"--job-name={self.job_name}"]
        for name in ("partition", "account", "time"):
            if getattr(self, name):
                lines.append(f"--{name}={getattr(self, name)}")
        if self.cpus_per_task:
            lines.append(f"--cpus-per-task={self.cpus_per_task}")
        lines += ["--requeue", f"--signal=B:TERM@{self.signal_seconds}", "--open-mode=append"]
        return lines + [e.strip() for e in self.extra]


def check_script_values(**values: object) -> None:
    """Every value a script is written from stays on its line: shell lines quote them (shlex.quote), but
    `#SBATCH` and comment lines cannot, so a newline or NUL in any of them is refused."""
    for name, value in values.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            check_path_text(name, None if item is None else str(item))


def _header(options: SlurmOptions, resources: list[str], log: str) -> list[str]:
    sbatch = [*resources, *options.lines(), f"--output={log}"]
    return ["#!/bin/bash", *(f"#SBATCH {line}" for line in sbatch)]


def _requeue_trap(job: str, finished_check: str | None) -> list[str]:
    """The trap that turns SIGTERM into: every rank checkpoints, then the job goes back in the queue."""
    requeue = f'scontrol requeue "{job}" || echo "mutransfer: scontrol requeue failed" >&2'
    if finished_check:
        requeue = f"{finished_check} || {requeue}"
    return [
        "on_sigterm() {",
        '    echo "mutransfer: SIGTERM at $(date -Is): every rank checkpoints, then the job is requeued" >&2',
        '    kill -TERM "$SRUN_PID" 2>/dev/null  # srun signals every process of its step',
        '    wait "$SRUN_PID"',
        f"    {requeue}",
        "    exit 0",
        "}",
        "trap on_sigterm TERM",
    ]


def _environment(cwd: Path, tracking_uri: str) -> list[str]:
    return [
        "set -uo pipefail",
        f"cd {shlex.quote(str(cwd))}",
        f"export MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)}",
        'echo "mutransfer: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, start number ${SLURM_RESTART_COUNT:-0}" >&2',
    ]


def train_script(launch: TrainLaunch, num_nodes: int, gpus_per_node: int, options: SlurmOptions,
                 master_port: int | None = None, cwd: str | os.PathLike | None = None) -> str:
    """One training run on `num_nodes` nodes: one srun task per node runs DeepSpeed's per-node launcher
    (`--no_ssh --node_rank $SLURM_NODEID`), all pointed at the first node of the allocation."""
    if num_nodes < 1 or gpus_per_node < 1:
        raise UsageError("--num-nodes and --gpus-per-node must be at least 1")
    if RESUME_PIN not in launch.overrides:
        raise UsageError(f"a requeued job must resume: prepare the launch with {RESUME_PIN} pinned")
    options.validate()
    check_script_values(config=launch.config, output_dir=launch.output_dir, cwd=cwd, tracking_uri=launch.tracking_uri,
                        arguments=launch.train_args())
    run_dir = launch.output_dir
    resources = [f"--nodes={num_nodes}", "--ntasks-per-node=1", f"--gpus-per-node={gpus_per_node}"]
    # a fixed port per job id: two jobs that share a first node must not collide
    port = str(master_port) if master_port else f"$(( {DEFAULT_MASTER_PORT} + SLURM_JOB_ID % 20000 ))"
    node_command = ('exec "$DEEPSPEED" --hostfile "$HOSTFILE" --no_ssh --node_rank "$SLURM_NODEID" '
                    '--num_nodes "$SLURM_JOB_NUM_NODES" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"')
    lines = [
        *_header(options, resources, str(run_dir / "slurm-%j.out")),
        "#",
        f"# Written by `mutransfer launch --slurm` for {shlex.quote(str(launch.config))}. Submit: sbatch <this file>.",
        "# Preempted or near its time limit, it checkpoints, requeues itself and resumes from "
        f"{shlex.quote(str(run_dir / 'checkpoints'))}.",
        *_environment(Path(cwd or Path.cwd()).absolute(), launch.tracking_uri),
        f"export RUN_DIR={shlex.quote(str(run_dir))}",
        f"export DEEPSPEED={shlex.quote(deepspeed_executable())}",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f"MASTER_PORT={port}",
        'HOSTFILE="$RUN_DIR/hostfile-$SLURM_JOB_ID"  # node order = node rank; DeepSpeed only reads it',
        "export MASTER_ADDR MASTER_PORT HOSTFILE",
        'mkdir -p "$RUN_DIR"',
        f'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots={gpus_per_node}/" > "$HOSTFILE"',
        "TRAIN_ARGS=(" + " ".join(map(shlex.quote, launch.train_args())) + ")",
        *_requeue_trap("$SLURM_JOB_ID", finished_check="grep -qs '\"status\": \"finished\"' \"$RUN_DIR/result.json\""),
        "# one task per node; $SLURM_NODEID is expanded by each task's own shell",
        f"srun --nodes={num_nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {shlex.quote(node_command)} "
        'mutransfer-node "${TRAIN_ARGS[@]}" &',
        "SRUN_PID=$!",
        'wait "$SRUN_PID"',
        "exit $?",
    ]
    return "\n".join(lines) + "\n"


def array_spec(indices: list[int], max_running: int | None = None) -> str:
    """sbatch --array value for these indices, runs collapsed (0-3,7,9-11), with an optional %limit."""
    if not indices:
        raise ValueError("no array indices")
    parts, ordered = [], sorted(set(indices))
    start = previous = ordered[0]
    for index in [*ordered[1:], None]:
        if index is not None and index == previous + 1:
            previous = index
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if index is not None:
            start = previous = index
    return ",".join(parts) + (f"%{max_running}" if max_running else "")


def sweep_script(study_config: Path, overrides: list[str], indices: list[int], study_output: Path,
                 tracking_uri: str, options: SlurmOptions, max_running: int | None = None,
                 gpus_per_trial: int = 1, cwd: str | os.PathLike | None = None, stack: int | None = 1) -> str:
    """A job array: task i runs, in-process, stack i of the study's array plan (`mutransfer sweep --stack-index
    i`, with the array's `--stack K` when K is explicit), or with `stack` 1 trial i (`--trial-index i`), and
    records its trials in MLflow under the study's parent run, as the in-process sweep does."""
    options.validate()
    check_script_values(study_config=study_config, overrides=overrides, study_output=study_output, cwd=cwd,
                        tracking_uri=tracking_uri)
    resources = ["--nodes=1", "--ntasks=1"]
    if gpus_per_trial:
        resources.append(f"--gpus-per-node={gpus_per_trial}")
    resources.append(f"--array={array_spec(indices, max_running)}")
    mutransfer = str(Path(sys.executable).parent / "mutransfer")
    sweep_args = [mutransfer, "sweep", "--config", str(study_config.absolute()), "--tracking-uri", tracking_uri]
    unit = "trial" if stack == 1 else "stack"
    pick = ['--trial-index "$SLURM_ARRAY_TASK_ID"'] if stack == 1 else \
        ['--stack-index "$SLURM_ARRAY_TASK_ID"', *([f"--stack {stack}"] if stack else [])]
    lines = [
        *_header(options, resources, str(study_output / "slurm" / "%A_%a.out")),
        "#",
        f"# Written by `mutransfer sweep --slurm` for {shlex.quote(str(study_config))}. Submit: sbatch <this file>.",
        f"# Array task i runs {unit} i of the study; a preempted task is requeued and resumes its {unit}.",
        "# Every task writes to the MLflow server above at the same time: it must be a server, not a file.",
        *_environment(Path(cwd or Path.cwd()).absolute(), tracking_uri),
        *_requeue_trap("${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}", finished_check=None),
        " ".join(["srun --ntasks=1", shlex.join(sweep_args), *pick, *map(shlex.quote, overrides), "&"]),
        "SRUN_PID=$!",
        'wait "$SRUN_PID"',
        "exit $?",
    ]
    return "\n".join(lines) + "\n"


def write_script(path: Path, text: str, log_dir: Path) -> Path:
    """Write the script (executable) and create the log folder: SLURM does not create it for --output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def add_sbatch_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sbatch settings (with --slurm)")
    group.add_argument("--job-name", default=None)
    group.add_argument("--partition", default=None)
    group.add_argument("--account", default=None)
    group.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    group.add_argument("--cpus-per-task", type=int, default=None)
    group.add_argument("--signal-seconds", type=int, default=120,
                       help="SIGTERM this long before the time limit, to checkpoint and requeue")
    group.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                       help="a further sbatch option, e.g. --sbatch=--qos=high (repeatable)")


def sbatch_options(args: argparse.Namespace, default_name: str):
    return SlurmOptions(job_name=args.job_name or default_name, partition=args.partition, account=args.account,
                        time=args.time, cpus_per_task=args.cpus_per_task, signal_seconds=args.signal_seconds,
                        extra=list(args.sbatch))
