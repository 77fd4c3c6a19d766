"""DataLoader workers and signals: workers ignore SIGTERM / SIGINT until their loader lets them go, and every
way out of an iteration stops them, so that a preempted run reaches its checkpoint and a failing one exits
instead of waiting on its workers."""

from __future__ import annotations

import atexit
import os
import signal
import weakref
from collections.abc import Iterator
from typing import Any

import torch

_RELEASES: weakref.WeakSet[WorkerRelease] = weakref.WeakSet()


class WorkerRelease:
    """Whether one DataLoader's workers may be stopped by a signal (a flag in shared memory).

    SLURM and Ctrl-C signal every process of a job, workers included: a worker that died first would break
    the batch its trainer needs to reach its preemption checkpoint, and torch turns a worker's death into an
    error raised in the trainer at an arbitrary point. So workers ignore SIGTERM / SIGINT until released,
    and then either signal ends them at once. The loader releases them when it stops them, and every loader
    is released at interpreter exit, where multiprocessing terminates its daemonic children (our workers)
    and then waits for them: an ignored SIGTERM would make that wait endless.
    """

    def __init__(self) -> None:
        self.flag = torch.zeros(1, dtype=torch.uint8).share_memory_()
        _RELEASES.add(self)

    def install(self, _worker_id: int) -> None:
        """The DataLoader's worker_init_fn."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, _signum: int, _frame: Any) -> None:
        if int(self.flag[0]):
            os._exit(0)  # a clean exit status: torch reports workers that die of a signal as failures

    def release(self) -> None:
        self.flag[0] = 1


@atexit.register  # registered after multiprocessing's exit hook (torch imports it first), so it runs before
def _release_all_workers() -> None:
    for release in list(_RELEASES):
        release.release()


def stop_workers(batches: Iterator[Any]) -> None:
    """Stop a DataLoader iterator's workers now. Dropping the iterator is not enough: a traceback that
    passed through it keeps it alive, and its workers with it, until interpreter exit."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own orderly stop; absent without workers
    if shutdown is not None:
        shutdown()


def worker_error_message(err: BaseException) -> str:
    """The message of an error raised in a DataLoader worker, without the worker's traceback that torch
    puts in front of it when it raises the error again in the main process."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    last = lines[-1]
    name = f"{type(err).__name__}: "
    return last.split(name, 1)[1] if name in last else last
