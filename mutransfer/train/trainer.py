"""DeepSpeed ZeRO training of zoo models on webdataset shards: `train(cfg) -> RunResult`.

The same code runs under the `deepspeed` launcher, under torchrun and as a plain process; on GPUs (NCCL,
bf16) and on CPU (gloo, DS_ACCELERATOR=cpu). The model is single-device code; the modules beside this one
wrap it, one job each: `distributed` (process group, collectives), `engine` (DeepSpeed config, model,
optimizer, schedule, compile), `batches` (data position), `signals` (stop requests), `progress` (what is
measured between logging points), `evaluate`, `resume` (checkpoints), `run_log` (files beside MLflow).

Read it top to bottom: `train()` opens the run (`open_run`, every resource registered with one ExitStack,
whose exit is the only teardown path, for finished, diverged, preempted and failed runs alike), runs
`train_loop()`, which calls `train_step()` once per optimizer step and `sync()` at sync points, and ends
with `finish()`.

Where the host waits (sync points), all on every rank at the same steps:
- `sync()`, at every step that logs (each `run.log_interval` steps and the last step), evaluates or
  checkpoints: ONE all-reduce of [stop flag, the loss of every step since the last sync], read back to the
  host. Divergence (a step's mean loss NaN/inf or above `run.divergence_loss`) and stop requests
  (SIGTERM/SIGINT on any rank) are decided there, identically on all ranks, so all ranks stop or save at
  the same step: at most `run.log_interval` steps after the signal or the divergence.
- logging, right after `sync()`: the grad norm (DeepSpeed's, read as a float) and the metrics.
- evaluation: a one-number all-reduce per eval batch (does any rank still have one?) and one at the end.
- checkpoints: DeepSpeed's save, and two barriers around rank 0 marking the checkpoint complete.
Between sync points nothing of ours waits: `train_step()` keeps the loss on the device and the loader
copies batches with non_blocking. DeepSpeed's own bf16 overflow check (an `.item()` in every ZeRO-1/2
step) is turned off in `engine.deepspeed_config`; bf16 needs no loss scaling, and `sync()` catches inf/NaN.
The two waits of DeepSpeed's gradient-norm path are replaced (`deepspeed_sync`): on an H100, CUDA's sync
debug mode finds none inside `train_step` at ZeRO-1 in bf16 (tests/integration/test_gpu.py).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mutransfer.data import build_train_loader, train_loss
from mutransfer.tags import RunStatus

from . import checkpoint as ckpt
from .batches import BatchStream
from .config import ConfigError, RunConfig, save_config, with_values
from .distributed import (
    all_reduce_,
    all_reduce_floats,
    broadcast_from_rank0,
    device_for,
    init_distributed,
    shutdown_distributed,
)
from .ema import WeightEma, build_ema
from .engine import build_engine, build_model, deepspeed_config, param_groups_of, seed_rngs
from .evaluate import evaluate
from .hardware import peak_flops, set_matmul_precision
from .mlflow_model import log_final_model
from .progress import StepWindow
from .resume import check_fresh_start, resume_run, save_checkpoint
from .run_log import (
    RunResult,
    SampleLog,
    append_metrics,
    run_params,
    run_tags,
    trim_metrics_file,
    write_result,
)
from .signals import StopRequest
from .system_metrics import SystemMetrics, start_system_metrics
from .tracking import Tracker

log = logging.getLogger(__name__)

__all__ = ["EXIT_DIVERGED", "RunResult", "build_model", "deepspeed_config", "init_distributed",
           "shutdown_distributed", "train", "train_step"]

EXIT_DIVERGED = 3


@dataclass
class Run:
    """What one training run holds while it runs (on one rank)."""

    cfg: RunConfig
    rank: int
    world_size: int
    device: torch.device
    engine: Any
    batches: Any  # BatchStream
    state: ckpt.TrainState
    total_steps: int
    rng_restore: Path | None  # the checkpoint whose RNG states to load once the data order is replayed
    criterion: torch.nn.Module
    flops: float | None  # training FLOPs per image, for MFU
    ema: WeightEma | None = None  # run.ema_decay
    tracker: Tracker | None = None
    system_metrics: SystemMetrics = field(default_factory=SystemMetrics)
    mlflow_run_id: str | None = None
    sample_log: SampleLog | None = None
    pbar: Any = None
    window: StepWindow = field(default_factory=StepWindow)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    last_loss: float = math.nan
    message: str = ""
    stop_signal: int | None = None
    outcome: str = RunStatus.FAILED  # how the MLflow run ends; set last, once the run's end is written
    data_summary: dict[str, int] | None = None  # what the data skipped, computed once at the end (collective)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.run.output_dir)

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.cfg.optim.accumulation * self.world_size


def train(cfg: RunConfig) -> RunResult:
    """Train until run.steps / run.epochs, divergence, or a stop signal. Call on every rank.

    Stop requests are held from the first step to the end of the teardown, not only in the loop: a
    preempted job's ranks often get SIGTERM twice (SLURM signals every process, and DeepSpeed's launcher
    passes its own on), and the second must not kill a rank in its preemption checkpoint. Before the first
    step a signal still ends the process: the rendezvous may be waiting for a node that never comes."""
    with ExitStack() as teardown:
        run = open_run(cfg, teardown)
        with StopRequest() as stop:
            try:
                return finish(run, train_loop(run, stop))
            finally:
                teardown.close()  # the MLflow run's end and the loaders' stop, still under the stop request


def train_loop(run: Run, stop: StopRequest) -> str:
    """Optimizer steps until the end ('finished'), a stop request ('preempted') or divergence ('diverged')."""
    while run.state.step < run.total_steps:
        train_step(run)
        log_now, eval_now, save_now = _due(run)
        if not (log_now or eval_now or save_now):
            continue
        status = sync(run, stop)
        if log_now or status == "preempted":  # a preempted run keeps every step it trained on record
            log_window(run)
        if status is not None:
            return status
        if eval_now:
            _excluded(run, run_evaluation)
        if save_now:
            _excluded(run, checkpoint)
    return RunStatus.FINISHED


def train_step(run: Run) -> None:
    """One optimizer step over optim.accumulation micro-batches. Nothing here waits for the device: the
    loss stays there, in the StepWindow, until the next `sync()`."""
    started = time.perf_counter()
    if run.rng_restore is not None:  # replay the data order first, then continue the saved RNG streams
        run.batches.start()
        ckpt.load_rng(run.rng_restore, run.rank)
        run.rng_restore = None
    micro, positions = [], []
    for _ in range(run.cfg.optim.accumulation):
        micro.append(run.batches.next())
        positions.append(run.batches.last_position)
    data_s = time.perf_counter() - started
    loss_sum = torch.zeros((), device=run.device)
    for images, targets, *_keys in micro:  # keys come along under run.record_samples
        images = images.to(run.device, non_blocking=True)
        targets = targets.to(run.device, non_blocking=True)
        if run.cfg.deepspeed.bf16:
            images = images.to(torch.bfloat16)
        loss = run.criterion(run.engine(images).float(), targets)
        run.engine.backward(loss)
        run.engine.step()
        loss_sum += loss.detach()
    run.state.step += 1
    if run.ema is not None:  # timm's model_ema.update(model, step=num_updates)
        run.ema.update(run.state.step)
    run.state.samples_seen += run.global_batch
    if run.sample_log is not None:
        run.sample_log.train(run.state.step, positions, [batch[2] for batch in micro])
    run.window.add_step(loss_sum / len(micro), data_s)
    run.pbar.update(1)


def sync(run: Run, stop: StopRequest) -> str | None:
    """The sync point: one all-reduce of [stop flag, each step's loss since the last sync]. Returns
    'diverged' or 'preempted' when the run must end here, else None."""
    flag = torch.tensor([1.0 if stop.signal else 0.0], dtype=torch.float64, device=run.device)
    reduced = all_reduce_(torch.cat([flag, run.window.take_pending()])).tolist()
    losses = [total / run.world_size for total in reduced[1:]]
    run.window.record(losses)
    first_step = run.state.step - len(losses) + 1
    bound = run.cfg.run.divergence_loss
    for step, loss in enumerate(losses, start=first_step):
        if not math.isfinite(loss) or loss > bound:
            run.last_loss = loss
            run.message = f"diverged: training loss {loss:.4g} at step {step} (bound run.divergence_loss={bound:g})"
            return RunStatus.DIVERGED
    run.last_loss = losses[-1]
    if reduced[0] > 0 and run.state.step < run.total_steps:  # at the last step, finishing is as quick
        run.stop_signal = stop.signal or signal.SIGTERM
        return RunStatus.PREEMPTED
    return None


def log_window(run: Run) -> None:
    """Log the metrics of the steps since the last logging point (to MLflow and metrics.jsonl)."""
    metrics = run.window.metrics(param_groups_of(run.engine), run.engine.get_global_grad_norm(), run.global_batch,
                                 run.flops, peak_flops(), run.world_size)
    run.pbar.set_postfix(loss=f"{metrics['train/loss']:.4f}", ips=f"{metrics['perf/images_per_s']:.0f}")
    _record(run, metrics)
    run.tracker.log_metrics(run.system_metrics.sample(), run.state.step)  # MLflow only: {} when off
    run.window.reset()


def run_evaluation(run: Run) -> None:
    """eval/* of the weights, and eval/ema_* of their average beside them when run.ema_decay is set."""
    run.eval_metrics = evaluate(run.engine, run.cfg, run.rank, run.world_size, run.device, run.sample_log,
                                run.state.step)
    if run.ema is not None:
        with run.ema.swapped_in():
            averaged = evaluate(run.engine, run.cfg, run.rank, run.world_size, run.device, None, run.state.step)
        run.eval_metrics.update({f"eval/ema_{key}": averaged[f"eval/{key}"] for key in ("loss", "top1", "top5")})
    _record(run, run.eval_metrics)


def finish(run: Run, status: str) -> RunResult:
    """Write the run's end: final evaluation and checkpoint, or the preemption checkpoint, or the
    divergence; then result.json. The ExitStack of `train()` tears down after this."""
    run.pbar.close()
    run.state.status = status
    if status == RunStatus.DIVERGED:
        run.tracker.log_metrics({"train/loss_at_divergence": run.last_loss if math.isfinite(run.last_loss)
                                 else 1e30}, run.state.step)
        _say(run, f"run {run.output_dir} {run.message}; stopping")
    elif status == RunStatus.PREEMPTED:
        if run.cfg.run.save_checkpoints:
            checkpoint(run)
        run.message = (f"stopped by {signal.Signals(run.stop_signal).name} at step {run.state.step}; " + (
            "checkpoint saved, run.resume=auto continues" if run.cfg.run.save_checkpoints
            else "no checkpoint (run.save_checkpoints=false): the run starts over when run again"))
        _say(run, run.message)
        run.tracker.log_metrics(skips_for_mlflow(_data_summary(run)), run.state.step)
    else:
        run_evaluation(run)
        if run.cfg.run.save_checkpoints:
            checkpoint(run)
        final = {f"final/{k.replace('/', '_')}": v for k, v in run.eval_metrics.items()}
        run.tracker.log_metrics({"final/train_loss": run.last_loss, **final, **skips_for_mlflow(_data_summary(run))},
                                run.state.step)
        log_final_model(run.engine, run.cfg, run.tracker, run.rank)
    result = RunResult(status=status, step=run.state.step, output_dir=str(run.output_dir),
                       mlflow_run_id=run.mlflow_run_id, final_train_loss=run.last_loss, eval=run.eval_metrics,
                       message=run.message, skipped=_data_summary(run) if status != RunStatus.DIVERGED else {})
    write_result(result, run.output_dir, run.rank)
    run.outcome = status
    return result


# --- opening a run -------------------------------------------------------------------------------------------
def open_run(cfg: RunConfig, teardown: ExitStack) -> Run:
    """Process group, loader, model, engine (resumed if a checkpoint says so), tracking, sample log and
    progress bar; each registers its cleanup with `teardown` as soon as it exists."""
    rank, local_rank, world_size = init_distributed()
    device = device_for(local_rank)
    check_fresh_start(cfg)
    set_matmul_precision(cfg.run.matmul_precision)
    ds_config = deepspeed_config(cfg, world_size)
    loader = build_train_loader(cfg.data, rank, world_size, device=device, with_keys=cfg.run.record_samples)
    if not (cfg.data.num_classes or loader.num_classes):
        raise ConfigError("data.num_classes", "not set, and the shards' _info.json does not give it")
    cfg = with_values(cfg, {"data.num_classes": cfg.data.num_classes or loader.num_classes})
    if rank == 0:  # saved resolved (num_classes included), so that export and resume need no shards
        write_run_files(cfg, ds_config)
    model = build_model(cfg, ds_config, cfg.data.num_classes)  # seeds torch with run.seed: the same everywhere
    # Augmentation done in this process (num_workers=0, random erasing) draws from the global RNGs: seed them
    # per (seed, rank) so that a run does not depend on what ran before it in the process (sweeps).
    seed_rngs(cfg.run.seed, rank)
    steps_per_epoch = max(1, len(loader) // cfg.optim.accumulation)
    total_steps = cfg.run.total_steps(steps_per_epoch)
    engine = build_engine(cfg, model, ds_config, total_steps, cfg.optim.warmup_steps_for(steps_per_epoch))
    teardown.callback(engine.destroy)
    state, resume_from = resume_run(engine, cfg, rank, world_size, device)
    ema = build_ema(engine, cfg.run.ema_decay, cfg.run.ema_warmup, cfg.deepspeed.zero_stage, resume_from, rank)
    run = Run(cfg=cfg, rank=rank, world_size=world_size, device=device, engine=engine, ema=ema,
              batches=BatchStream(loader, state), state=state, total_steps=total_steps, rng_restore=resume_from,
              criterion=train_loss(cfg.data),  # soft targets under mixup / cutmix, label smoothing otherwise
              flops=model.flops_per_image() if hasattr(model, "flops_per_image") else None)
    teardown.callback(run.batches.close)  # loader workers must stop on every exit path, or the process hangs
    _start_tracking(run, model)
    teardown.callback(lambda: run.tracker.end(run.outcome))  # an MLflow run must never stay RUNNING
    if cfg.run.record_samples:
        run.sample_log = SampleLog(run.output_dir, rank)
        teardown.callback(run.sample_log.close)
    run.pbar = tqdm(total=total_steps, initial=state.step, disable=rank != 0 or not cfg.run.progress,
                    desc=run.output_dir.name, dynamic_ncols=True)
    teardown.callback(run.pbar.close)
    return run


def write_run_files(cfg: RunConfig, ds_config: dict[str, Any]) -> None:
    import json

    output_dir = Path(cfg.run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, output_dir / "config.yaml")
    (output_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=1))
    (output_dir / "result.json").unlink(missing_ok=True)  # a run's outcome is written when it ends, or never


def checkpoint(run: Run) -> None:
    """Save a checkpoint of the run, with every metric held for MLflow sent first: a run resumed from it
    trains (and records) only the steps after it, so MLflow must already hold the ones before."""
    run.tracker.flush()
    save_checkpoint(run.engine, run.state, run.cfg, run.rank, run.ema)


def _start_tracking(run: Run, model: torch.nn.Module) -> None:
    """Start (or, resumed, continue) the MLflow run on rank 0; every rank keeps its id in the state, so
    that every rank's checkpoint names it."""
    cfg, state = run.cfg, run.state
    run.tracker = Tracker.for_run(cfg.tracking, run.output_dir, active=run.rank == 0)
    if run.rank == 0:  # the steps after the checkpoint are trained (and recorded) again
        trim_metrics_file(run.output_dir / "metrics.jsonl", state.step)
    run.mlflow_run_id = run.tracker.start(cfg.tracking.run_name or run.output_dir.name,
                                          run_tags(cfg, model, run.world_size, run.total_steps),
                                          parent_run_id=cfg.tracking.parent_run_id,
                                          run_id=state.mlflow_run_id or cfg.tracking.continue_run_id)
    if run.mlflow_run_id and state.mlflow_run_id is None and not cfg.tracking.continue_run_id:
        run.tracker.log_params(run_params(cfg, model, run.world_size))
        run.tracker.log_artifact(run.output_dir / "config.yaml")
        run.tracker.log_artifact(run.output_dir / "deepspeed.json")
    run.system_metrics = start_system_metrics(cfg.tracking.system_metrics, run.tracker)
    state.mlflow_run_id = broadcast_from_rank0(run.mlflow_run_id, run.world_size)


# --- small helpers -------------------------------------------------------------------------------------------
def _due(run: Run) -> tuple[bool, bool, bool]:
    """(log, evaluate, checkpoint) after the step just taken."""
    cfg, step = run.cfg.run, run.state.step
    before_end = step < run.total_steps
    log_now = step % cfg.log_interval == 0 or step == run.total_steps
    eval_now = bool(cfg.eval_interval) and step % cfg.eval_interval == 0 and before_end
    save_now = (cfg.save_checkpoints and bool(cfg.checkpoint_interval) and step % cfg.checkpoint_interval == 0
                and before_end)
    return log_now, eval_now, save_now


def _excluded(run: Run, work: Any) -> None:
    """Run `work(run)`, leaving its time out of the step time."""
    started = time.perf_counter()
    work(run)
    run.window.exclude(time.perf_counter() - started)


def _data_summary(run: Run) -> dict[str, int]:
    """What the run's data skipped, by kind: training on all ranks and the last evaluation (every kind is
    listed, zeros too, for one-epoch runs as for long ones). Rank 0 says so when anything was skipped."""
    if run.data_summary is None:
        loader = run.batches.loader
        counts = all_reduce_floats([float(n) for n in loader.skip_counts.values()], run.device)
        summary = {f"data/train_{kind}": int(n) for kind, n in zip(loader.skip_counts, counts)}
        summary.update({f"data/eval_{kind}": int(run.eval_metrics.get(f"eval/skipped_{kind}", 0))
                        for kind in loader.skip_counts})
        if run.rank == 0 and any(summary.values()):
            text = ", ".join(f"{key.removeprefix('data/')}={n}" for key, n in summary.items() if n)
            log.warning(f"mutransfer: data skipped in this run: {text}")
        run.data_summary = summary
    return run.data_summary


def skips_for_mlflow(summary: dict[str, int]) -> dict[str, float]:
    """The kinds that skipped anything, and the total (always): two dozen zero metrics would crowd the final
    ones off MLflow's compare page; result.json keeps every kind."""
    return {**{k: float(v) for k, v in summary.items() if v}, "data/skipped_samples": float(sum(summary.values()))}


def _record(run: Run, metrics: dict[str, float]) -> None:
    run.tracker.log_metrics(metrics, run.state.step)
    append_metrics(run.output_dir, run.rank, run.state.step, metrics)


def _say(run: Run, message: str) -> None:
    if run.rank == 0:
        log.info(f"mutransfer: {message}")
