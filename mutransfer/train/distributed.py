"""The process group: join it under any launcher (or none), leave it cleanly, and the collectives the
trainer and its evaluation use. Nothing else in `mutransfer.train` calls torch.distributed directly."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import torch

from mutransfer.netutil import free_port


def init_distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size); a plain `python` process becomes a world of one."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed
    from deepspeed.utils import logger as deepspeed_logger

    if not os.environ.get("MUTRANSFER_DEEPSPEED_INFO"):  # DeepSpeed's INFO lines drown the progress bar
        deepspeed_logger.setLevel(logging.WARNING)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # on CPU, DeepSpeed prints "DeepSpeed ... built successfully" to stdout as it loads its shared-memory
    # all-reduce: stdout is the command's output (a sweep's summary), so the line goes to DeepSpeed's logger
    with contextlib.redirect_stdout(io.StringIO()) as said:
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if said.getvalue().strip():
        deepspeed_logger.info(said.getvalue().strip())
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    else:
        release_shm_buffer(dist.get_rank(), dist.get_world_size())
    return dist.get_rank(), local_rank, dist.get_world_size()


def shm_buffer_path(rank: int) -> Path:
    """The /dev/shm file of DeepSpeed's CPU all-reduce for this rank (its name as DeepSpeed's shm.cpp makes it)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer(rank: int, world_size: int) -> None:
    """DeepSpeed's CPU all-reduce gives each rank of a local run under its launcher a 66 MB /dev/shm file that it
    never unlinks: every such run leaked that much RAM until reboot. Once every rank has mapped its peers'
    files (a barrier after init), each rank unlinks its own name; the mappings stay valid until the processes
    exit, so even a killed run leaves nothing behind."""
    import torch.distributed as dist

    if world_size > 1:
        dist.barrier()
    shm_buffer_path(rank).unlink(missing_ok=True)  # a world of one has its file too (deepspeed --num_gpus 1)


def device_for(local_rank: int) -> torch.device:
    """This rank's GPU, or the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def shutdown_distributed() -> None:
    """Leave the process group at the end of a process: with gloo's threads still up at interpreter exit,
    a rank can abort ("terminate called without an active exception") after all its work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) of a tensor on this rank's device; returns it."""
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def all_reduce_floats(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """All-reduce a few host numbers (float64); blocks until every rank has sent its own."""
    return all_reduce_(torch.tensor(values, dtype=torch.float64, device=device), op).tolist()


def broadcast_from_rank0(value: Any, world_size: int) -> Any:
    """Rank 0's `value` on every rank (a picklable object)."""
    if world_size == 1:
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()
