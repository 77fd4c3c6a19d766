"""Shared pieces of the trainer tests: tiny configs, launching real DeepSpeed jobs, reading results."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from warm_start import popen

from mutransfer.netutil import free_port

BIN = Path(sys.executable).parent
DEEPSPEED = str(BIN / "deepspeed")

# A ViT small enough for CPU, at 2x base width and 2x base depth so that every role has its own LR scale.
TINY_MODEL = dict(name="vit", width=32, depth=2, head_dim=16, patch_size=8, parametrization="depth_mup",
                  base_width=16, base_depth=1, first_layer_lr_exponent=0.5)


def expected_lr_scales() -> dict[str, float]:
    """Each optimizer group's lr_scale for TINY_MODEL at 32 px and 10 classes."""
    from mutransfer.models import create_model
    from mutransfer.models.optim import OptimSection, param_groups

    model = create_model("vit", img_size=32, num_classes=10, **{k: v for k, v in TINY_MODEL.items() if k != "name"})
    return {g["group"]: g["lr_scale"] for g in param_groups(model, OptimSection(lr=1.0))}


def run_env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for inherited in ("MLFLOW_TRACKING_URI", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(inherited, None)  # each launch makes its own process group and store
    return env


def write_config(path: Path, shards: Path, output_dir: Path, mlflow_uri: str, **sections: dict[str, Any]) -> Path:
    config = {
        "model": dict(TINY_MODEL),
        "data": dict(shards_dir=str(shards), img_size=32, batch_size=16, num_workers=0, shuffle_buffer=200,
                     scale=[0.5, 1.0], interpolation="bilinear"),
        "optim": dict(name="adamw", lr=3e-2, weight_decay=0.01, warmup_steps=2, schedule="cosine", grad_clip=0.0),
        "deepspeed": dict(zero_stage=1),
        "run": dict(steps=20, log_interval=1, seed=0, output_dir=str(output_dir)),
        "tracking": dict(uri=mlflow_uri, experiment="tests"),
    }
    for section, values in sections.items():
        config[section].update(values)
    path.write_text(yaml.safe_dump(config))
    return path


# the proxies of the study tests: mup ViTs at base width 16 and depth 1, swept at widths 16 and 32
PROXY_MODEL = dict(parametrization="mup", base_width=16, base_depth=1, first_layer_lr_exponent=None)


def write_proxy_config(root: Path, shards: Path, mlflow_uri: str, steps: int, **run_values: Any) -> Path:
    """root/proxy.yaml, the base config of a tiny proxy study: ZeRO-0, no warmup, no checkpoints."""
    return write_config(root / "proxy.yaml", shards, root / "unused", mlflow_uri, model=dict(PROXY_MODEL),
                        optim=dict(lr=1e-3, warmup_steps=0, grad_clip=0.0), deepspeed=dict(zero_stage=0),
                        run=dict(steps=steps, log_interval=2, save_checkpoints=False, **run_values))


def write_study(root: Path, base: Path, name: str, experiment: str, lrs: list[float], steps: int) -> Path:
    """root/study.yaml: widths 16 and 32 at depth 1 over `lrs` (momentum 0.9, seed 0) from the base config
    `base`, trials under root/trials. Writing it again with other `lrs` changes the grid."""
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump({
        "study": {"name": name, "experiment": experiment, "base_config": str(base),
                  "output_dir": str(root / "trials"), "steps": steps},
        "shapes": {"variants": ["mup"], "widths": [16, 32], "depths": [1]},
        "grid": {"lr": list(lrs), "momentum": [0.9]},
        "seeds": [0],
    }))
    return path


def deepspeed_command(config: Path, *overrides: str, procs: int = 2) -> list[str]:
    return [DEEPSPEED, "--num_gpus", str(procs), "--master_port", str(free_port()), "--module", "mutransfer.train",
            "--config", str(config), *overrides]


def python_command(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "mutransfer.train", "--config", str(config), *overrides]


def rank_env(rank: int, procs: int, port: int) -> dict[str, str]:
    """The environment of rank `rank` of a one-node job of `procs` ranks on loopback, as torchrun gives it."""
    return dict(run_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(procs),
                LOCAL_WORLD_SIZE=str(procs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


@contextlib.contextmanager
def sigterms_reaching_the_process() -> Iterator[list[int]]:
    """The SIGTERMs that get past every handler the code under test installs, recorded by the handler it
    finds in place (standing in for the default action, death, which would end the test process)."""
    reached: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: reached.append(signum))
    try:
        yield reached
    finally:
        signal.signal(signal.SIGTERM, previous)


RANK_GRACE_S = 10.0  # how long the other ranks of `run_ranks` may go on after one failed


def run_ranks(command: list[str], cwd: Path, procs: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """`command` (say `python_command(...)`) as `procs` ranks of one job, started directly with the environment
    a launcher gives its ranks (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as torchrun sets them):
    real DeepSpeed engines on gloo, without DeepSpeed's runner and per-node launcher, which import torch and
    DeepSpeed one after the other before any rank starts (7 of the 17 s of a short two-rank launch here, and
    2-3 s more at the end). Tests of the launcher itself (signals, nodes, /dev/shm) use `deepspeed_command`.
    Each rank is forked from the warm server where it may be (`warm_start.popen`): a process of its own that
    skips the 12-14 s of imports a fresh interpreter spends on a slow machine.

    Returns the ranks' outputs (rank 0's first) and the exit status of the rank that failed first. As DeepSpeed's
    launcher does, a failed rank ends the others (after RANK_GRACE_S: they may be writing their own error)."""
    port, deadline = free_port(), time.time() + timeout
    outputs = [(tempfile.TemporaryFile(), tempfile.TemporaryFile()) for _ in range(procs)]
    ranks = [popen(command, cwd, rank_env(rank, procs, port), stdout=out, stderr=err, start_new_session=True)
             for rank, (out, err) in enumerate(outputs)]
    failure: tuple[float, int] | None = None  # (when, exit status) of the first rank that failed
    try:
        while None in [rank.poll() for rank in ranks]:  # every rank polled: any() would stop at the first
            failure = failure or next(((time.time(), r.returncode) for r in ranks if r.returncode), None)
            if time.time() > deadline:
                raise subprocess.TimeoutExpired(command, timeout)
            if failure is not None and time.time() > failure[0] + RANK_GRACE_S:
                break
            time.sleep(0.05)
    finally:
        for rank in ranks:
            if rank.poll() is None:
                os.killpg(rank.pid, signal.SIGKILL)
                rank.wait()
    failure = failure or next(((0.0, r.returncode) for r in ranks if r.returncode), (0.0, 0))
    text = ["".join(_read(f) for f in files) for files in zip(*outputs)]
    return subprocess.CompletedProcess(command, failure[1], *text)


def _read(file: Any) -> str:
    file.seek(0)
    with file:
        return file.read().decode(errors="replace")


def run(command: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`command` to its end, as subprocess.run with captured text output (forked warm where it may be,
    `warm_start`)."""
    with popen(command, cwd, run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def result(output_dir: Path) -> dict[str, Any]:
    return json.loads((output_dir / "result.json").read_text())


def losses(output_dir: Path) -> dict[int, float]:
    """train/loss per step from metrics.jsonl; a replayed step keeps its last value."""
    out: dict[int, float] = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out


def eval_loss_of_weights(weights: Path, shards: Path) -> float:
    """Evaluate exported weights in this process over the shards' validation split, independent of the
    trainer's evaluation code."""
    import torch

    from mutransfer.data import DataConfig, build_eval_loader
    from mutransfer.models import load_model

    model = load_model(str(weights)).eval()
    cfg = DataConfig(shards_dir=str(shards), img_size=32, batch_size=50, num_workers=0, interpolation="bilinear")
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in build_eval_loader(cfg, 0, 1):
            total += torch.nn.functional.cross_entropy(model(batch.images), batch.targets, reduction="sum").item()
            count += int(batch.valid.sum())
    return total / count


# --- the shards of the fault probes: shard_set(512, EVAL_SAMPLES, validation_per_shard=EVAL_PER_SHARD), and
# ways to damage a copy of them (conftest's `damaged` fixture is one)
EVAL_SAMPLES, EVAL_PER_SHARD = 200, 50


def copy_shards(shards: Path, to: Path) -> Path:
    shutil.copytree(shards, to)
    return to


def overwrite_middle(path: Path, size: int = 4096) -> None:
    """4 KiB of garbage in the middle of a file (tar headers and data alike)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + size] = b"\xab" * size
    path.write_bytes(bytes(data))


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
