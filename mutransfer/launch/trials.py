"""The processes of a sweep's launched trials: the `deepspeed` / `torchrun` command that trains one trial on its
block of GPUs, the environment that pins a one-process stack to its GPU, and passing a stop signal on to a
launch's whole process group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mutransfer.errors import UsageError

LAUNCHERS = ("inprocess", "deepspeed", "torchrun")


def trial_command(launcher: str, config_path: Path, gpus: list[int], port: int) -> tuple[list[str], dict[str, str]]:
    """The command that trains one trial on `gpus` (CPU: that many processes)."""
    env = dict(os.environ)
    bin_dir = Path(sys.executable).parent
    count = max(1, len(gpus))
    if launcher == "deepspeed":
        import torch

        where = ["--include", "localhost:" + ",".join(map(str, gpus))] if torch.cuda.is_available() else \
            ["--num_gpus", str(count)]
        cmd = [str(bin_dir / "deepspeed"), *where, "--master_port", str(port), "--module", "mutransfer.train",
               "--config", str(config_path)]
    elif launcher == "torchrun":
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        cmd = [str(bin_dir / "torchrun"), "--nproc_per_node", str(count), "--master_port", str(port),
               "-m", "mutransfer.train", "--config", str(config_path)]
    else:
        raise UsageError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    return cmd, env


def pinned_environment(gpus: list[int]) -> dict[str, str]:
    """This process's environment with CUDA_VISIBLE_DEVICES set to `gpus`, counted among the GPUs this process
    sees (a sweep started with CUDA_VISIBLE_DEVICES=4,5 gives its slot 1 the GPU 5). Harmless on CPU."""
    env = dict(os.environ)
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[g] if g < len(visible) else str(g) for g in gpus)
    return env


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the launch and every rank it started (they share its process group)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # it has just ended
        pass
