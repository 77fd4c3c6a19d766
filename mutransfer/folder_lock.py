"""An exclusive lock on a folder among the processes of one machine, held for a few quick steps (making a
store, a study's parent run) that processes started together would otherwise each do."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """flock(LOCK_EX) on `folder`, released when the block ends (or the process dies)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
