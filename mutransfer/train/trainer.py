"""DeepSpeed ZeRO training of zoo models on webdataset shards: `train(cfg) -> RunResult`.

The same code runs under the `deepspeed` launcher, under torchrun and as a plain process; on GPUs (NCCL,
bf16) and on CPU (gloo, DS_ACCELERATOR=cpu). The model is single-device code; this module wraps it.

Every step, the ranks agree (one tiny all-reduce) on whether to stop (SIGTERM/SIGINT on any rank) before any
rank starts the step, and on the step's mean loss after it (NaN/inf or above `run.divergence_loss`: the run
stops as `diverged`). So all ranks always save or stop at the same step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mutransfer.data import build_eval_loader, build_train_loader, train_loss
from mutransfer.models import create_model
from mutransfer.netutil import free_port

from . import checkpoint as ckpt
from .config import ConfigError, RunConfig, save_config
from .hardware import peak_flops, peak_memory_bytes
from .optim import build_optimizer
from .schedule import build_scheduler
from .tracking import Tracker, flatten, trim_metrics_file

EXIT_DIVERGED = 3


class Diverged(RuntimeError):
    pass


@dataclass
class RunResult:
    status: str  # finished | diverged | preempted
    step: int
    output_dir: str
    mlflow_run_id: str | None = None
    final_train_loss: float | None = None
    eval: dict[str, float] = field(default_factory=dict)
    message: str = ""
    skipped: dict[str, int] = field(default_factory=dict)  # data/{train,eval}_<kind>: samples skipped, all ranks


# --- process group -----------------------------------------------------------------------------------------
def init_distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size); a plain `python` process becomes a world of one."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed
    from deepspeed.utils import logger as deepspeed_logger

    if not os.environ.get("MUTRANSFER_DEEPSPEED_INFO"):  # DeepSpeed's INFO lines drown the progress bar
        deepspeed_logger.setLevel(logging.WARNING)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), local_rank, dist.get_world_size()


def shutdown_distributed() -> None:
    """Leave the process group at the end of a process: with gloo's threads still up at interpreter exit,
    a rank can abort ("terminate called without an active exception") after all its work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


# --- DeepSpeed config -----------------------------------------------------------------------------------------
def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """Every DeepSpeed default that matters, set explicitly (0.19 clips at 1.0 unless told otherwise)."""
    ds, optim = cfg.deepspeed, cfg.optim
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # our client AdamW / SGD carry the per-role groups
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if ds.config:
        config = _merge(config, json.loads(Path(ds.config).read_text()))
    # batch sizes always follow the data config, so that the loader and the engine agree
    config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    config["gradient_accumulation_steps"] = optim.accumulation
    config["train_batch_size"] = cfg.data.batch_size * optim.accumulation * world_size
    return config


# --- model ---------------------------------------------------------------------------------------------------
def build_model(cfg: RunConfig, ds_config: dict[str, Any], num_classes: int) -> torch.nn.Module:
    """The zoo model, initialised from run.seed identically whatever the ZeRO stage."""
    import deepspeed

    kwargs = cfg.model.create_kwargs(cfg.data.img_size, num_classes)
    if cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.zero3_init:
        # parameters are born partitioned; our init code must run on gathered full tensors
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = create_model(cfg.model.name, weight_init=False, **kwargs)
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            torch.manual_seed(cfg.run.seed)
            model.init_weights()
    else:
        model = create_model(cfg.model.name, **kwargs)
        torch.manual_seed(cfg.run.seed)
        model.init_weights()
    return model


def seed_rngs(seed: int, rank: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs from (seed, rank)."""
    import random

    import numpy as np

    state = np.random.SeedSequence([seed, rank]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    torch.manual_seed(int(state[0]) ^ int(state[1]))


# --- the run -------------------------------------------------------------------------------------------------
class _StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves and leaves at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
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


class _Batches:
    """Micro-batches across epoch ends, tracking (epoch, batch_in_epoch) for exact resumption."""

    def __init__(self, loader: Any, state: ckpt.TrainState) -> None:
        self.loader, self.state = loader, state
        self.iterator = None
        self.last_position = (0, 0)  # (epoch, index in epoch) of the batch `next` returned last

    def _start_epoch(self, skip: int) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.state.epoch)
        self.iterator = iter(self.loader)
        for _ in range(skip):  # resuming mid-epoch: replay the data order, drop what was trained on
            next(self.iterator)

    def next(self) -> Any:
        if self.iterator is None:
            self._start_epoch(skip=self.state.batch_in_epoch)
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


class _SampleLog:
    """`run.record_samples`: the keys of every batch this rank trained on or evaluated, as JSON lines in
    output_dir/samples_rank<R>.jsonl. Lines are appended (a resumed run continues the file) and flushed at
    once, so that a preempted run leaves every trained step on record."""

    def __init__(self, output_dir: Path, rank: int) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)  # rank 0 may not have made it yet
        self.file = open(output_dir / f"samples_rank{rank}.jsonl", "a")

    def train(self, step: int, positions: list[tuple[int, int]], keys: list[list[str]]) -> None:
        for (epoch, batch), batch_keys in zip(positions, keys):
            self._write({"split": "train", "step": step, "epoch": epoch, "batch": batch, "keys": batch_keys})

    def eval(self, step: int, keys: list[str]) -> None:
        self._write({"split": "eval", "step": step, "keys": keys})

    def _write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _run_params(cfg: RunConfig, model: torch.nn.Module, world_size: int) -> dict[str, Any]:
    param = model.parametrization
    params = flatten(cfg.to_dict())
    params.update({
        "parametrization": param.name,
        "alpha": param.alpha,
        "m_N": param.width_mult(model.width),
        "m_L": param.depth_mult(model.depth),
        "world_size": world_size,
        "num_params": sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()),
    })
    return params


def _run_tags(cfg: RunConfig, model: torch.nn.Module) -> dict[str, str]:
    tags = {
        "mutransfer.role": "run",
        "mutransfer.model": cfg.model.name,
        "mutransfer.parametrization": model.parametrization.name,
        "mutransfer.width": str(model.width),
        "mutransfer.depth": str(model.depth),
        "mutransfer.optimizer": cfg.optim.name,
        "mutransfer.lr": repr(cfg.optim.lr),
        "mutransfer.momentum": repr(cfg.optim.momentum_value),
        "mutransfer.status": "running",
    }
    tags.update(cfg.tracking.tags)
    return tags


def evaluate(engine: Any, cfg: RunConfig, rank: int, world_size: int, device: torch.device,
             sample_log: _SampleLog | None = None, step: int = 0) -> dict[str, float]:
    """top-1, top-5 and loss over the eval shards, each sample counted once across all ranks.

    Ranks can hold different numbers of eval batches (no `_info.json`, or a stale one): they agree before
    each batch whether any rank still has one, and a rank that has run out runs a dummy forward, because
    ZeRO-3 gathers parameters collectively inside every forward.
    """
    loader = build_eval_loader(cfg.data, rank, world_size)
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top1, top5, count
    dummy = torch.zeros(1, 3, cfg.data.img_size, cfg.data.img_size, device=device,
                        dtype=torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32)
    engine.eval()
    with torch.no_grad(), closing(iter(loader)) as iterator:  # closing: its workers stop even on an error
        while True:
            batch = next(iterator, None)
            if _all_reduce([0.0 if batch is None else 1.0], device, op="max")[0] == 0:
                break
            if batch is None:
                engine(dummy)
                continue
            images, targets, valid = batch.images, batch.targets, batch.valid
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if cfg.deepspeed.bf16:
                images = images.to(torch.bfloat16)
            logits = engine(images).float()
            sums[0] += F.cross_entropy(logits, targets, reduction="sum", ignore_index=-100).item()
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hits = top5 == targets[:, None]
            sums[1] += hits[:, 0].sum().item()
            sums[2] += hits.any(dim=-1).sum().item()
            sums[3] += valid.sum().item()  # padding rows (target -100) count for nothing
            if sample_log is not None:
                sample_log.eval(step, [key for key in batch.keys if key])
    engine.train()
    totals = _all_reduce(sums.tolist() + loader.good_per_shard() + list(loader.skip_counts.values()), device)
    loss, top1, top5, count = totals[:4]
    if count == 0:
        from mutransfer.data.info import DataError

        raise DataError(f"no sample of the eval shards {loader.shards.pattern} could be read")
    metrics = {"eval/loss": loss / count, "eval/top1": top1 / count, "eval/top5": top5 / count, "eval/samples": count}
    metrics.update(_eval_coverage(loader, totals[4:], rank, step, cfg.run.progress))
    return metrics


def _eval_coverage(loader: Any, totals: list[float], rank: int, step: int, verbose: bool) -> dict[str, float]:
    """Samples evaluated against `_info.json` (a warning naming the shards that fell short), and what
    evaluation skipped by kind; `totals` holds the good samples per shard, then the skip counts (all ranks)."""
    from mutransfer.data.reader import coverage_shortfall

    shards = len(loader.shards.urls)
    good, skipped = totals[:shards], dict(zip(loader.skip_counts, totals[shards:]))
    metrics = {f"eval/skipped_{kind}": n for kind, n in skipped.items() if n}
    expected = loader.num_samples
    if expected is not None:
        metrics["eval/samples_expected"] = expected
    if rank == 0:
        shortfall = coverage_shortfall(loader.shards, good)
        if shortfall:
            kinds = ", ".join(f"{kind}={int(n)}" for kind, n in skipped.items() if n)
            tqdm.write(f"mutransfer: warning: {shortfall}" + (f" (skipped: {kinds})" if kinds else ""), file=sys.stderr)
        elif verbose:
            of = f" of {expected} (_info.json)" if expected is not None else ""
            tqdm.write(f"eval at step {step}: {int(sum(good))}{of} samples", file=sys.stderr)
    return metrics


def _data_summary(loader: Any, eval_metrics: dict[str, float], device: torch.device, rank: int) -> dict[str, int]:
    """What the run's data skipped, by kind: training on all ranks and the last evaluation (all kinds are
    listed, zeros too, for one-epoch runs as for long ones). Rank 0 prints it when anything was skipped."""
    train_counts = _all_reduce([float(n) for n in loader.skip_counts.values()], device)
    summary = {f"data/train_{kind}": int(n) for kind, n in zip(loader.skip_counts, train_counts)}
    summary.update({f"data/eval_{kind}": int(eval_metrics.get(f"eval/skipped_{kind}", 0)) for kind in loader.skip_counts})
    if rank == 0 and any(summary.values()):
        text = ", ".join(f"{key.removeprefix('data/')}={n}" for key, n in summary.items() if n)
        print(f"mutransfer: data skipped in this run: {text}", file=sys.stderr, flush=True)
    return summary


def train(cfg: RunConfig) -> RunResult:
    """Train until run.steps / run.epochs, divergence, or a stop signal. Call on every rank."""
    import deepspeed

    rank, local_rank, world_size = init_distributed()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    output_dir = Path(cfg.run.output_dir)
    resume_from = _resume_point(cfg)
    ds_config = deepspeed_config(cfg, world_size)
    loader = build_train_loader(cfg.data, rank, world_size, with_keys=cfg.run.record_samples)
    num_classes = cfg.data.num_classes or loader.num_classes
    if not num_classes:
        raise ConfigError("data.num_classes", "not set, and the shards' _info.json does not give it")
    cfg.data.num_classes = num_classes  # saved resolved, so that export and resume need no shards
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
        (output_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=1))
    model = build_model(cfg, ds_config, num_classes)  # seeds torch with run.seed: the same init on every rank
    # Augmentation done in this process (num_workers=0, random erasing) draws from the global RNGs: seed them
    # per (seed, rank) so that a run does not depend on what ran before it in the process (sweeps).
    seed_rngs(cfg.run.seed, rank)
    optimizer = build_optimizer(
        model, cfg.optim.name, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
        betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps,
    )
    batches_per_epoch = len(loader)
    steps_per_epoch = max(1, batches_per_epoch // cfg.optim.accumulation)
    total_steps = cfg.run.steps or cfg.run.epochs * steps_per_epoch
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: build_scheduler(opt, total_steps, cfg.optim.warmup_steps, cfg.optim.schedule,
                                                 cfg.optim.min_lr_ratio),
    )
    ckpt.make_safe_checkpoint_engine(engine.checkpoint_engine)
    criterion = train_loss(cfg.data)  # soft targets under mixup / cutmix, label smoothing otherwise

    state = ckpt.TrainState()
    if resume_from is not None:
        engine.load_checkpoint(str(resume_from.parent), tag=resume_from.name)
        state, _ = ckpt.read_state(resume_from)
        state.status = "running"

    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, active=cfg.tracking.enabled and rank == 0,
                      fallback=output_dir / "metrics.jsonl", wait_at_end_s=cfg.tracking.wait_at_end_s)
    run_id = tracker.start(cfg.tracking.run_name or output_dir.name, _run_tags(cfg, model),
                           parent_run_id=cfg.tracking.parent_run_id,
                           run_id=state.mlflow_run_id or cfg.tracking.continue_run_id)
    if run_id and state.mlflow_run_id is None and not cfg.tracking.continue_run_id:
        tracker.log_params(_run_params(cfg, model, world_size))
        tracker.log_artifact(output_dir / "config.yaml")
        tracker.log_artifact(output_dir / "deepspeed.json")
    state.mlflow_run_id = run_id
    if world_size > 1:  # every rank keeps the run id so that its checkpoint state names it
        import torch.distributed as dist

        holder = [state.mlflow_run_id]
        dist.broadcast_object_list(holder, src=0)
        state.mlflow_run_id = holder[0]

    groups = engine.basic_optimizer.param_groups if hasattr(engine, "basic_optimizer") else optimizer.param_groups
    flops = model.flops_per_image() if hasattr(model, "flops_per_image") else None
    peak = peak_flops()
    global_batch = ds_config["train_batch_size"]
    batches = _Batches(loader, state)
    if rank == 0:  # the steps after the checkpoint are trained (and recorded) again
        trim_metrics_file(output_dir / "metrics.jsonl", state.step)
    rng_restore = resume_from
    result = RunResult(status="running", step=state.step, output_dir=str(output_dir), mlflow_run_id=run_id)
    pbar = tqdm(total=total_steps, initial=state.step, disable=rank != 0 or not cfg.run.progress,
                desc=output_dir.name, dynamic_ncols=True)
    window = {"loss": 0.0, "steps": 0, "time": 0.0, "data": 0.0}
    last_loss = math.nan
    eval_metrics: dict[str, float] = {}
    stop_signal = None
    sample_log = _SampleLog(output_dir, rank) if cfg.run.record_samples else None

    with _StopRequest() as stop:
        try:
            while state.step < total_steps:
                t0 = time.perf_counter()
                position = (state.epoch, state.batch_in_epoch)
                micro, positions = [], []
                try:
                    for _ in range(cfg.optim.accumulation):
                        micro.append(batches.next())
                        positions.append(batches.last_position)
                except Exception:
                    if not stop.signal:
                        raise
                    micro = []  # a stop signal also reached the loader's workers
                if rng_restore is not None:  # after replaying the data order, continue the saved RNG streams
                    ckpt.load_rng(rng_restore, rank)
                    rng_restore = None
                t_data = time.perf_counter() - t0
                if _all_reduce([1.0 if stop.signal else 0.0], device, op="max")[0] > 0:
                    stop_signal = stop.signal or signal.SIGTERM
                    state.epoch, state.batch_in_epoch = position  # these batches were not trained on
                    break
                loss_sum = 0.0
                for images, targets, *_keys in micro:  # keys come along under run.record_samples
                    images = images.to(device, non_blocking=True)
                    targets = targets.to(device, non_blocking=True)
                    if cfg.deepspeed.bf16:
                        images = images.to(torch.bfloat16)
                    loss = criterion(engine(images).float(), targets)
                    engine.backward(loss)
                    engine.step()
                    loss_sum += loss.item()
                state.step += 1
                state.samples_seen += global_batch
                if sample_log is not None:
                    sample_log.train(state.step, positions, [batch[2] for batch in micro])
                mean_loss = _all_reduce([loss_sum / len(micro)], device)[0] / world_size
                last_loss = mean_loss
                step_time = time.perf_counter() - t0
                window["loss"] += mean_loss
                window["steps"] += 1
                window["time"] += step_time
                window["data"] += t_data
                pbar.update(1)
                if not math.isfinite(mean_loss) or mean_loss > cfg.run.divergence_loss:
                    raise Diverged(f"training loss {mean_loss:.4g} at step {state.step} "
                                   f"(bound run.divergence_loss={cfg.run.divergence_loss:g})")
                if state.step % cfg.run.log_interval == 0 or state.step == total_steps:
                    metrics = _window_metrics(window, groups, engine, global_batch, flops, peak, world_size)
                    pbar.set_postfix(loss=f"{metrics['train/loss']:.4f}", ips=f"{metrics['perf/images_per_s']:.0f}")
                    tracker.log_metrics(metrics, state.step)
                    _append_metrics(output_dir, rank, state.step, metrics)
                    window = {"loss": 0.0, "steps": 0, "time": 0.0, "data": 0.0}
                if cfg.run.eval_interval and state.step % cfg.run.eval_interval == 0 and state.step < total_steps:
                    eval_metrics = evaluate(engine, cfg, rank, world_size, device, sample_log, state.step)
                    tracker.log_metrics(eval_metrics, state.step)
                    _append_metrics(output_dir, rank, state.step, eval_metrics)
                if (cfg.run.save_checkpoints and cfg.run.checkpoint_interval
                        and state.step % cfg.run.checkpoint_interval == 0 and state.step < total_steps):
                    save_checkpoint(engine, state, cfg, rank)
        except Diverged as err:
            pbar.close()
            batches.close()
            state.status = "diverged"
            result.status, result.message = "diverged", f"diverged: {err}"
            if rank == 0:
                print(f"mutransfer: run {output_dir} {result.message}; stopping", file=sys.stderr, flush=True)
            tracker.log_metrics({"train/loss_at_divergence": last_loss if math.isfinite(last_loss) else 1e30},
                                state.step)
            tracker.end("diverged")
            result.step, result.final_train_loss = state.step, last_loss
            _write_result(result, output_dir, rank)
            _close(sample_log)
            engine.destroy()
            return result
        except BaseException:
            pbar.close()
            batches.close()
            tracker.end("failed")  # the MLflow run must not stay RUNNING
            _close(sample_log)
            engine.destroy()
            raise
    pbar.close()
    batches.close()

    if stop_signal is not None:
        state.status = "preempted"
        if cfg.run.save_checkpoints:
            save_checkpoint(engine, state, cfg, rank)
        result.status = "preempted"
        result.message = (f"stopped by {signal.Signals(stop_signal).name} at step {state.step}; " + (
            "checkpoint saved, run.resume=auto continues" if cfg.run.save_checkpoints
            else "no checkpoint (run.save_checkpoints=false): the run starts over when run again"))
        if rank == 0:
            print(f"mutransfer: {result.message}", file=sys.stderr, flush=True)
        result.skipped = _data_summary(loader, eval_metrics, device, rank)
        tracker.log_metrics(result.skipped, state.step)
        tracker.end("preempted")
    else:
        eval_metrics = evaluate(engine, cfg, rank, world_size, device, sample_log, state.step)
        tracker.log_metrics(eval_metrics, state.step)
        _append_metrics(output_dir, rank, state.step, eval_metrics)
        state.status = "finished"
        if cfg.run.save_checkpoints:
            save_checkpoint(engine, state, cfg, rank)
        result.status = "finished"
        final = {"final/train_loss": last_loss, **{f"final/{k.replace('/', '_')}": v for k, v in eval_metrics.items()}}
        result.skipped = _data_summary(loader, eval_metrics, device, rank)
        tracker.log_metrics({**final, **result.skipped}, state.step)
        tracker.end("finished")
    result.step, result.final_train_loss, result.eval = state.step, last_loss, eval_metrics
    _write_result(result, output_dir, rank)
    _close(sample_log)
    engine.destroy()
    return result


def _close(sample_log: _SampleLog | None) -> None:
    if sample_log is not None:
        sample_log.close()


def _window_metrics(window: dict[str, float], groups: list[dict[str, Any]], engine: Any, global_batch: int,
                    flops: float | None, peak: float | None, world_size: int) -> dict[str, float]:
    steps = max(1, window["steps"])
    step_time = window["time"] / steps
    images_per_s = global_batch / step_time if step_time > 0 else 0.0
    metrics = {
        "train/loss": window["loss"] / steps,
        "perf/step_time_s": step_time,
        "perf/images_per_s": images_per_s,
        "perf/data_wait_frac": window["data"] / window["time"] if window["time"] > 0 else 0.0,
        "perf/peak_mem_gb": peak_memory_bytes() / 2**30,
    }
    for group in groups:
        metrics[f"lr/{group.get('group', 'all')}"] = group["lr"]
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None and math.isfinite(float(grad_norm)):
        metrics["train/grad_norm"] = float(grad_norm)
    if flops and peak:
        metrics["perf/mfu"] = flops * images_per_s / (peak * world_size)
    return metrics


def save_checkpoint(engine: Any, state: ckpt.TrainState, cfg: RunConfig, rank: int) -> Path:
    """All ranks save their part; rank 0 marks the checkpoint complete, then prunes old ones."""
    import torch.distributed as dist

    root = ckpt.checkpoint_root(cfg.run.output_dir)
    tag = ckpt.tag_for(state.step)
    engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
    ckpt.save_rng(root / tag, rank)
    dist.barrier()
    if rank == 0:
        ckpt.write_state(root / tag, state, cfg.to_dict())
        ckpt.prune(cfg.run.output_dir, cfg.run.keep_checkpoints)
    dist.barrier()
    return root / tag


def _resume_point(cfg: RunConfig) -> Path | None:
    resume = cfg.run.resume
    if resume == "never":
        if ckpt.complete_checkpoints(cfg.run.output_dir):
            raise ConfigError("run.resume", f"{cfg.run.output_dir} already holds checkpoints; use "
                              "run.resume=auto to continue or another run.output_dir")
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(cfg.run.output_dir)
    folder = Path(resume)
    if not (folder / ckpt.STATE_FILE).is_file():
        raise ConfigError("run.resume", f"{folder} is not a complete mutransfer checkpoint")
    return folder


def _append_metrics(output_dir: Path, rank: int, step: int, metrics: dict[str, float]) -> None:
    """metrics.jsonl beside the checkpoints: the same numbers as MLflow, readable without it."""
    if rank == 0:
        with open(output_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")


def _write_result(result: RunResult, output_dir: Path, rank: int) -> None:
    if rank == 0:
        from dataclasses import asdict

        (output_dir / "result.json").write_text(json.dumps(asdict(result), indent=1, default=str))

