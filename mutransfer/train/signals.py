"""Stop requests: SIGTERM / SIGINT set a flag that the training loop reads at its next sync point."""

from __future__ import annotations

import signal
from typing import Any


class StopRequest:
    """While active, SIGTERM / SIGINT only record the signal (`.signal`); the loop saves and leaves at its
    next sync point, so that all ranks stop at the same step. The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
