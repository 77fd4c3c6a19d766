"""What a launcher adds to a short training run: one rank of the demo proxy for --steps steps, started as a plain
process (`python -m mutransfer.train`, the baseline), through `torchrun --nproc_per_node 1` and through
`deepspeed --num_gpus 1`, interleaved round robin, medians. A launched sweep at `--stack 1` pays this once per
trial (a stack is a plain process whatever the launcher), and so does every launched target run.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/launch_overhead.py --rounds 3 --work /tmp/launch_overhead

The shards are the demo's (written once into --work); tracking and checkpoints are off and the run evaluates
once, at its end, so that what differs between the modes is how the rank starts and ends. Printed: seconds
per run of each mode, its ratio to the plain process, and the launcher's overhead in seconds (the difference
of the medians).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mutransfer.netutil import free_port
from mutransfer.study.demo import ensure_shards

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def write_config(work: Path, shards: Path, steps: int) -> Path:
    config = yaml.safe_load((REPO / "configs" / "demo_proxy.yaml").read_text())
    config["data"]["shards_dir"] = str(shards)
    config["run"].update(steps=steps, log_interval=steps, eval_interval=0, output_dir=str(work / "run"),
                         progress=False)
    config["tracking"] = {"enabled": False}
    path = work / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def commands(config: Path) -> dict[str, list[str]]:
    train = ["-m", "mutransfer.train", "--config", str(config)]
    return {
        "python -m mutransfer.train": [sys.executable, *train],
        "torchrun --nproc_per_node 1": [str(BIN / "torchrun"), "--nproc_per_node", "1", "--master_port",
                                        "{port}", *train],
        "deepspeed --num_gpus 1": [str(BIN / "deepspeed"), "--num_gpus", "1", "--master_port", "{port}",
                                   "--module", *train[1:]],
    }


def timed_run(command: list[str]) -> float:
    port = str(free_port())
    started = time.perf_counter()
    proc = subprocess.run([part.replace("{port}", port) for part in command], capture_output=True, text=True,
                          env=dict(os.environ, DS_ACCELERATOR="cpu"))
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/launch_overhead"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    shards = args.work / "shards"
    ensure_shards(shards)
    modes = commands(write_config(args.work, shards, args.steps))
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    timed_run(modes["deepspeed --num_gpus 1"])  # DeepSpeed builds its CPU op on a first launch: not timed
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_index in range(args.rounds):
        order = list(modes) if round_index % 2 == 0 else list(reversed(modes))
        for mode in order:
            times[mode].append(timed_run(modes[mode]))
            print(f"round {round_index + 1}: {mode}: {times[mode][-1]:.1f} s", flush=True)
    base = statistics.median(times["python -m mutransfer.train"])
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    print("| start | s per run (median) | runs | vs plain process | launcher overhead |")
    print("|---|---|---|---|---|")
    for mode, values in times.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"| `{mode}` | {median:.1f} | {runs} | {median / base:.2f}x | {median - base:+.1f} s |")


if __name__ == "__main__":
    main()
