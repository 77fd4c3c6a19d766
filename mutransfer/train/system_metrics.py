"""MLflow's system metrics, sampled at the training log interval on rank 0 and logged at the training step.

MLflow's own `SystemMetricsMonitor` (CPU utilisation, system memory, disk, network, and GPU utilisation and
memory when pynvml finds an NVIDIA GPU) does the measuring; instead of its background thread on a wall-clock
period, the trainer asks for one sample every `run.log_interval` steps, so system metrics share the x axis
of the training curves. Metric names keep MLflow's `system/` prefix, which the UI shows as its own section.
`tracking.system_metrics=false` turns it off.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "system/"


class SystemMetrics:
    """One MLflow monitor; `sample()` returns the system metrics since the previous sample ({} when off)."""

    def __init__(self, run_id: str | None = None, tracking_uri: str | None = None) -> None:
        self._monitor = None
        if run_id is None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri)
        self.sample()  # psutil's CPU percentage counts from the previous call: start the clock

    @property
    def on(self) -> bool:
        return self._monitor is not None

    def sample(self) -> dict[str, float]:
        if self._monitor is None:
            return {}
        try:
            self._monitor.collect_metrics()
            values = self._monitor.aggregate_metrics()
            for monitor in self._monitor.monitors:
                monitor.clear_metrics()
        except Exception as err:  # tracking must never stop training
            log.warning(f"mutransfer: system metrics stopped ({type(err).__name__}: {err})")
            self._monitor = None
            return {}
        return {f"{PREFIX}{name}": float(value) for name, value in values.items()}


def start_system_metrics(enabled: bool, tracker: Any) -> SystemMetrics:
    """A sampler for the tracker's run when enabled and the tracker is active (rank 0), else a no-op one."""
    if not (enabled and tracker.active and tracker.run_id):
        return SystemMetrics()
    try:
        return SystemMetrics(tracker.run_id, tracker.uri)
    except Exception as err:
        log.warning(f"mutransfer: no system metrics ({type(err).__name__}: {err})")
        return SystemMetrics()
