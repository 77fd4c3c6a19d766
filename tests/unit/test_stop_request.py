"""Stop requests nest: a training loop's own StopRequest inside a stack's (or a sweep's) passes each signal
on, and starts with a signal that came before it, so that the outer one still holds signals while the
runs' ends are recorded (a SIGTERM then left a launched stack's member RUNNING in MLflow); a launched stack's
worker holds them until its statuses are written."""

from __future__ import annotations

import os
import signal

from train_helpers import sigterms_reaching_the_process

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


def test_a_stack_worker_writes_its_statuses_through_a_second_sigterm(tmp_path, monkeypatch) -> None:
    """A stopped sweep signals each launch's whole group and the launcher passes its own SIGTERM on, so a
    stack's worker gets two. The second, after the stack ended, reached the worker's default handler (death)
    before it wrote its statuses, and the sweep then took finished members for interrupted ones."""
    from mutransfer.study import stack_worker, stacks

    def stack_then_launchers_signal(configs, keys):
        os.kill(os.getpid(), signal.SIGTERM)
        return ["finished"] * len(keys)

    monkeypatch.setattr(stacks, "train_trials", stack_then_launchers_signal)
    plan = stack_worker.write_plan(tmp_path / "plan.json", {"a": tmp_path / "a.yaml", "b": tmp_path / "b.yaml"})
    with sigterms_reaching_the_process() as reached:
        assert stack_worker.main([str(plan)]) == 0
    assert reached == []
    assert stack_worker.read_statuses(plan) == {"a": "finished", "b": "finished"}
