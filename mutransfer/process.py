"""How an entry point's process starts and ends: a C allocator that keeps freed memory for the next step, its
heavy imports with Python's cyclic garbage collector paused and then frozen out of its reach, and an exit that
runs the exit hooks and skips the interpreter's teardown.

Why the allocator: glibc's malloc serves blocks above a threshold (128 KiB, raised only as such blocks are
freed) with fresh pages from the kernel and hands memory at the top of its heap back to it. A training step
allocates and frees its activations every step, so each step paid for its memory again in page faults (about
6,000 a step for a stack of 24 width-32 proxies on 2 CPU cores, against 20 with the settings here).

Why the imports: a sweep's code (torch, timm, DeepSpeed, MLflow) builds about 390,000 objects that live as long
as the process. While they are built, the collector's full passes scan them again and again, and every full
pass after that scans them once more; at exit the interpreter collects them all one last time. On 2 CPU cores
that was 0.5-0.8 s of a sweep's 3.8 s of imports and 1.8-2.0 s of its exit. With the allocator's settings, a
stacked sweep of the demo's 24 width-32 proxies went from 34.5 to 28.7 s (`benchmarks/sweep_vs_baseline.py --baseline
0410966`, docs/benchmarks.md). A command's lasting imports include what it only imports once it runs (a study
command's MLflow: `cli.command_imports`); imported later, MLflow alone cost a sweep six full passes, 0.5 s.
Nothing here changes what a run computes or records.

Only this module's functions touch the allocator or the collector or end a process early; the package's entry
points run through `run_entry_point` (`mutransfer` itself, `python -m mutransfer.train`, a launched sweep's
stack worker), and their `main` functions, which tests call in their own process, do none of it.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import os
import platform
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

# glibc's mallopt parameters; the ceiling glibc accepts for the mmap threshold on 64-bit machines is 32 MiB
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_BLOCKS_UP_TO = 32 * 2**20  # blocks this large and smaller come from the heap, and freed ones are reused
HEAP_KEPT = 2**30  # free memory at the heap's top that stays with the process instead of going back to the kernel


def keep_freed_memory() -> bool:
    """Have glibc's malloc reuse freed memory in this process (and the processes it forks) instead of returning
    it to the kernel and faulting it in again. Whether it was set: not on another C library, and not where
    the user chose either setting (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_). A process keeps the peak
    of its heap, up to HEAP_KEPT of it free, as it would under jemalloc or tcmalloc."""
    if platform.libc_ver()[0] != "glibc" or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_BLOCKS_UP_TO)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_KEPT))


@contextmanager
def lasting_imports() -> Iterator[None]:
    """Run imports whose objects live as long as the process: the cyclic collector is paused while they run,
    and what exists when they end is frozen (never scanned again, never collected). A garbage cycle made
    meanwhile stays in memory: imports make few."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def exit_process(code: int) -> NoReturn:
    """End an entry point's process with `code` once its work is saved (and, on a rank, `shutdown_distributed`
    has run). Python's exit hooks (MLflow's queued writes, logging, data-loader workers, temporary folders)
    run here, and buffered output is flushed; the interpreter's teardown does not run. That teardown collects
    every object the imports built (1-2 s on 2 CPU cores after a sweep), and on a rank it also destroys the
    gloo group DeepSpeed's globals keep, which now and then aborts a rank whose run went well ("terminate
    called without an active exception", exit -6), so that the launcher reports a failure. Gloo has no
    shutdown; `destroy_process_group` only forgets the group."""
    atexit._run_exitfuncs()  # the hooks sys.exit would have run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_entry_point(main: Callable[[], int], imports: Callable[[], object]) -> NoReturn:
    """A process's entry point: keep freed memory, run `imports` (the modules `main` will use) as lasting
    imports, then `main`, and end the process with its exit code."""
    keep_freed_memory()
    with lasting_imports():
        imports()
    exit_process(main())
