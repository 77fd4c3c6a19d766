"""The training data position: micro-batches across epoch ends, with the (epoch, index) of each, so that a
checkpoint records where the data stands and a resumed run continues the same data order."""

from __future__ import annotations

from typing import Any

from .checkpoint import TrainState


class BatchStream:
    """`next()` gives the next micro-batch and advances `state.epoch` / `state.batch_in_epoch`."""

    def __init__(self, loader: Any, state: TrainState) -> None:
        self.loader, self.state = loader, state
        self.iterator = None
        self.last_position = (0, 0)  # (epoch, index in epoch) of the batch `next` returned last

    def _start_epoch(self, skip: int) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.state.epoch)
        self.iterator = iter(self.loader)
        for _ in range(skip):  # resuming mid-epoch: replay the data order, drop what was trained on
            next(self.iterator)

    def start(self) -> None:
        """Open the current epoch and replay it up to the saved position (nothing when already started).
        A resumed run calls this before it restores the saved RNG states: replaying draws from them when
        augmentation runs in this process (data.num_workers=0)."""
        if self.iterator is None:
            self._start_epoch(skip=self.state.batch_in_epoch)

    def next(self) -> Any:
        self.start()
        try:
            batch = next(self.iterator)
        except StopIteration:
            self.state.epoch += 1
            self.state.batch_in_epoch = 0
            self._start_epoch(skip=0)
            batch = next(self.iterator)
        self.last_position = (self.state.epoch, self.state.batch_in_epoch)
        self.state.batch_in_epoch += 1
        return batch

    def close(self) -> None:
        """Stop the loader's workers now (at the end, and on every error: a failing run must exit)."""
        if self.iterator is not None and hasattr(self.iterator, "close"):
            self.iterator.close()
        self.iterator = None
