"""Stop requests: SIGTERM / SIGINT set a flag that the training loop reads at its next sync point."""

from __future__ import annotations

import signal
from typing import Any


class StopRequest:
    """While active, SIGTERM / SIGINT only record the signal (`.signal`); the loop saves and leaves at its
    next sync point, so that all ranks stop at the same step. The previous handlers come back on exit.

    Nested in another (a training loop inside a stack's or a sweep's own), it starts with the outer one's
    signal, if one came already, and passes each signal on to it: the outer one keeps holding signals while
    the runs' ends are recorded, after the inner loop has left."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._outer: StopRequest | None = None

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._receive)
            except ValueError:  # not the main thread: no handlers
                continue
            outer = getattr(self._previous[sig], "__self__", None)
            self._outer = outer if isinstance(outer, StopRequest) else self._outer
        self.signal = self._outer.signal if self._outer is not None else None
        return self

    def _receive(self, signum: int, frame: Any) -> None:
        self._handle(signum, frame)
        if self._outer is not None:
            self._outer._receive(signum, frame)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
