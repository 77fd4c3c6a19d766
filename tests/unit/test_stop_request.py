"""Stop requests nest: a training loop's own StopRequest inside a stack's (or a sweep's) passes each signal
on, and starts with a signal that came before it, so that the outer one still holds signals while the
runs' ends are recorded (a SIGTERM then left a launched stack's member RUNNING in MLflow)."""

from __future__ import annotations

import os
import signal

from mutransfer.train.signals import StopRequest


def test_an_inner_request_passes_signals_on_and_the_outer_holds_them_after_it() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as outer:
        with StopRequest() as inner:
            os.kill(os.getpid(), signal.SIGTERM)
        assert inner.signal == outer.signal == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # after the loop: held, the process goes on to record its end
        assert outer.signal == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) == before


def test_an_inner_request_starts_with_a_signal_the_outer_already_holds() -> None:
    with StopRequest() as outer:
        os.kill(os.getpid(), signal.SIGTERM)  # while the stack was being built
        with StopRequest() as inner:
            assert inner.signal == signal.SIGTERM  # its loop stops at the first sync point
    with StopRequest() as fresh:
        assert fresh.signal is None and outer.signal == signal.SIGTERM
