"""A stack of trials recorded member by member as lone runs are: `train_stack(cfgs) -> [RunResult]`.

Each member gets what `trainer.train` gives a run: config.yaml and deepspeed.json in its output folder,
its own MLflow run (started, or continued from tracking.continue_run_id, with the same tags, params,
artifacts, metrics at the same steps, system metrics, and final / divergence / skip metrics), metrics.jsonl,
result.json, and an MLflow status that ends finished, diverged, preempted, or failed when the stack raised.
A stacked trial keeps no checkpoint: one that is stopped starts over when run again (in the same MLflow run,
which does not record again the steps it holds).
"""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from mutransfer.tags import RunStatus

from .config import RunConfig
from .engine import deepspeed_config
from .run_log import RunResult, append_metrics, run_params, run_tags, trim_metrics_file, write_result
from .signals import StopRequest
from .stacked import MemberOutcome, StackObserver, train_stacked
from .system_metrics import SystemMetrics, start_system_metrics
from .tracking import Tracker
from .trainer import skips_for_mlflow, write_run_files

log = logging.getLogger(__name__)


@dataclass
class MemberRecord:
    """What records one member: its folder, its MLflow run, and whether the run gets the stack's system metrics."""

    cfg: RunConfig
    tracker: Tracker
    records_system_metrics: bool = False  # whether its MLflow run gets the stack's system metrics
    outcome: str = RunStatus.FAILED  # how its MLflow run ends; set once result.json is written
    result: RunResult | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.run.output_dir)

    def record(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step)
        append_metrics(self.output_dir, 0, step, metrics)


class RecordingObserver(StackObserver):
    """Records every member of a stack like `trainer.train` records its run; `teardown` ends the MLflow
    runs (failed, for members the stack did not end)."""

    def __init__(self, teardown: ExitStack) -> None:
        self.teardown = teardown
        self.records: dict[int, MemberRecord] = {}
        # one sampler for the stack (one process on one machine), sampled once per logging point: psutil's
        # CPU utilisation counts from the previous call in the process, so 24 samplers asked one after the
        # other gave every member but the first the few microseconds since the member before it
        self.system_metrics = SystemMetrics()
        self.system_sample: tuple[int, dict[str, float]] = (-1, {})
        self.experiment_ids: dict[tuple[str, str], str] = {}  # (store, name) -> id: looked up once per stack

    def started(self, member: int, cfg: RunConfig, model: torch.nn.Module, total_steps: int) -> None:
        write_run_files(cfg, deepspeed_config(cfg, 1))
        tracking = cfg.tracking
        output_dir = Path(cfg.run.output_dir)
        tracker = Tracker.for_run(tracking, output_dir, active=True)
        record = self.records[member] = MemberRecord(cfg, tracker)
        self.teardown.callback(lambda: tracker.end(record.outcome))
        trim_metrics_file(output_dir / "metrics.jsonl", 0)  # a stacked trial always starts at step 0
        experiment = (tracker.uri, tracking.experiment)
        run_id = tracker.start(tracking.run_name or output_dir.name, run_tags(cfg, model, 1, total_steps),
                               parent_run_id=tracking.parent_run_id, run_id=tracking.continue_run_id,
                               experiment_id=self.experiment_ids.get(experiment))
        if tracker.experiment_id:
            self.experiment_ids[experiment] = tracker.experiment_id
        if run_id and not tracking.continue_run_id:
            tracker.log_params(run_params(cfg, model, 1))
            tracker.log_artifact(output_dir / "config.yaml")
            tracker.log_artifact(output_dir / "deepspeed.json")
        record.records_system_metrics = bool(tracking.system_metrics and run_id)
        if record.records_system_metrics and not self.system_metrics.on:
            self.system_metrics = start_system_metrics(True, tracker)

    def logged(self, member: int, step: int, metrics: dict[str, float]) -> None:
        record = self.records[member]
        record.record(metrics, step)
        if "train/loss" in metrics and record.records_system_metrics:  # a logging point: a lone run samples here
            if self.system_sample[0] != step:
                self.system_sample = (step, self.system_metrics.sample())
            record.tracker.log_metrics(self.system_sample[1], step)

    def ended(self, member: int, outcome: MemberOutcome) -> None:
        record = self.records[member]
        tracker, step = record.tracker, outcome.step
        if outcome.status == RunStatus.DIVERGED:
            loss = outcome.final_train_loss
            tracker.log_metrics({"train/loss_at_divergence": loss if math.isfinite(loss) else 1e30}, step)
            _say(f"run {record.output_dir} {outcome.message}; stopping")
        elif outcome.status == RunStatus.PREEMPTED:
            _say(outcome.message)
            tracker.log_metrics(skips_for_mlflow(outcome.skipped), step)
        else:
            final = {f"final/{k.replace('/', '_')}": v for k, v in outcome.eval.items()}
            tracker.log_metrics({"final/train_loss": outcome.final_train_loss, **final,
                                 **skips_for_mlflow(outcome.skipped)}, step)
        record.result = RunResult(status=outcome.status, step=step, output_dir=str(record.output_dir),
                                  mlflow_run_id=tracker.run_id, final_train_loss=outcome.final_train_loss,
                                  eval=outcome.eval, message=outcome.message, skipped=outcome.skipped)
        write_result(record.result, record.output_dir, 0)
        record.outcome = outcome.status


def train_stack(cfgs: list[RunConfig], device: torch.device | None = None) -> list[RunResult]:
    """Train `cfgs` as one stack (`stacked.train_stacked`), each recorded as its lone run would be; the
    results in the order given. A stop request after the last step (SIGTERM / SIGINT) waits until every
    member's end is recorded; one before it stops the stack at its next sync point."""
    with StopRequest(), ExitStack() as teardown:
        observer = RecordingObserver(teardown)
        train_stacked(cfgs, observer, device)
        return [observer.records[i].result for i in range(len(cfgs))]


def _say(message: str) -> None:
    log.info(f"mutransfer: {message}")
