"""The process group: join it under any launcher (or none), leave it cleanly, and the collectives the
trainer and its evaluation use. Nothing else in `mutransfer.train` calls torch.distributed directly."""

from __future__ import annotations

import logging
import os
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
    if torch.cuda.is_available():
        backend = "nccl"
    else:
        backend = "gloo"
        skip_shared_memory_all_reduce()
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), local_rank, dist.get_world_size()


def skip_shared_memory_all_reduce() -> None:
    """On CPU, DeepSpeed's process group loads a shared-memory all-reduce kernel that only its
    `inference_all_reduce` uses, which training never calls; on a machine that has not built it, it is a C++
    op compiled at the first launch (65 s and 127 s of CPU on 2 cores; docs/benchmarks.md), and each local rank
    maps a 66 MB /dev/shm file that DeepSpeed never unlinks. Marked unavailable, DeepSpeed neither builds nor
    loads it; every collective of training goes through gloo as before."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


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
