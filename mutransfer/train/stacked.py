"""Stacked trials: K trials of one model shape trained as one stacked model in one process, without DeepSpeed:
`train_stacked(cfgs, observer) -> [MemberOutcome]`.

The K run configs may differ only in optim.lr, the momentum (optim.momentum / optim.beta1), optim.weight_decay
and run.seed (and where they record: run.output_dir, tracking); `stack_problem` says why a config cannot stack
at all. Each member follows what the same config trains alone with `trainer.train` (the DeepSpeed path):
its own init from its seed, its own data order and augmentation from its seed (members of one seed share each
batch: one decode feeds them all), its own stochastic-depth masks (drawn once per seed, as a lone trial of
that seed draws them), its own per-role learning rates and schedule, DeepSpeed's gradient clipping
by its own gradient norm, the same divergence check at the same sync points (each `run.log_interval` steps and
the last; a diverged member leaves the stack there and the others go on), the same stop requests (SIGTERM /
SIGINT: every member stops as preempted at the next sync point) and the same final evaluation (with its
weight EMA's beside it under run.ema_decay). What each
member logs and how it ends goes to a `StackObserver` (`stacked_run` records it like a lone run).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mutransfer.data import train_loss
from mutransfer.tags import RunStatus

from .config import ConfigError, RunConfig, with_values
from .ema import StackedEma
from .engine import COMPILE_KWARGS, build_model, deepspeed_config
from .evaluate import evaluate_members
from .hardware import peak_flops, set_matmul_precision
from .mlflow_model import wants_model
from .progress import StepWindow
from .schedule import lr_factor
from .signals import StopRequest
from .stacked_model import StackData, StackedModel
from .stacked_optim import MemberHypers, StackedOptimizer, groups_of

# what the members of a stack may set differently; everything else must match
MEMBER_KEYS = ("optim.lr", "optim.momentum", "optim.beta1", "optim.weight_decay", "run.seed", "run.output_dir",
               "tracking")


@dataclass
class MemberOutcome:
    """How a stack member ended, as a lone run's `RunResult` says it, with every step's training loss."""

    status: str  # finished | diverged | preempted
    step: int
    losses: list[float]
    final_train_loss: float
    eval: dict[str, float] = field(default_factory=dict)
    message: str = ""
    skipped: dict[str, int] = field(default_factory=dict)


class StackObserver:
    """What a stack reports about each member (its index in the configs given). Does nothing itself."""

    def started(self, member: int, cfg: RunConfig, model: torch.nn.Module, total_steps: int) -> None:
        """The member's model is built (before the first step); `cfg` has data.num_classes resolved."""

    def logged(self, member: int, step: int, metrics: dict[str, float]) -> None:
        """Metrics at a logging point or an evaluation, as a lone run logs them."""

    def ended(self, member: int, outcome: MemberOutcome) -> None:
        """The member's end (diverged members end at the sync point that saw it, the others at the end)."""


def stack_problem(cfg: RunConfig) -> str | None:
    """Why `cfg` cannot train in a stack, or None. Stacks train in float32 on one device, in one process."""
    ds = deepspeed_config(cfg, 1)
    if ds["bf16"]["enabled"] or ds.get("fp16", {}).get("enabled"):
        return "deepspeed.bf16 (stacks train in float32)"
    if cfg.run.compile != "off" and cfg.model.drop_path_rate > 0:
        return "run.compile with model.drop_path_rate (a compiled stack draws no stochastic-depth masks)"
    if cfg.run.save_checkpoints:
        return "run.save_checkpoints (stacked trials keep no checkpoints)"
    if cfg.run.record_samples:
        return "run.record_samples"
    if cfg.data.decode == "gpu":
        return "data.decode=gpu"
    if wants_model(cfg):
        return "tracking.log_model (a stacked trial logs no model)"
    return None


def stack_signature(cfg: RunConfig) -> dict[str, Any]:
    """The config with what members may set differently left out: configs that stack have equal signatures."""
    values = cfg.to_dict()
    for key in MEMBER_KEYS:
        section, _, name = key.partition(".")
        if name:
            values[section] = {k: v for k, v in values[section].items() if k != name}
        else:
            values.pop(section)
    return values


def check_stack(cfgs: list[RunConfig]) -> None:
    """ConfigError unless `cfgs` can train as one stack."""
    if not cfgs:
        raise ValueError("a stack needs at least one run config")
    for cfg in cfgs:
        problem = stack_problem(cfg)
        if problem is not None:
            raise ConfigError("stack", f"{cfg.run.output_dir} cannot train in a stack: {problem}")
    first = stack_signature(cfgs[0])
    for cfg in cfgs[1:]:
        if stack_signature(cfg) != first:
            differ = sorted(k for k in first if first[k] != stack_signature(cfg).get(k))
            raise ConfigError("stack", f"{cfg.run.output_dir} differs from {cfgs[0].run.output_dir} in "
                              f"{', '.join(differ)}: a stack shares everything but lr, momentum, weight decay and seed")


@dataclass
class Stack:
    """What a stack holds while it trains. `members` lists the configs' indices still training, in the order
    of the stacked tensors' first dimension."""

    cfgs: list[RunConfig]
    members: list[int]
    model: StackedModel
    optimizer: StackedOptimizer
    data: StackData
    criterion: torch.nn.Module
    device: torch.device
    total_steps: int
    warmup_steps: int
    observer: StackObserver
    flops: float | None
    ema: StackedEma | None = None  # run.ema_decay
    step: int = 0
    window: StepWindow = field(default_factory=StepWindow)
    losses: dict[int, list[float]] = field(default_factory=dict)  # every step's loss, by member
    window_losses: dict[int, list[float]] = field(default_factory=dict)  # since the last logging point
    outcomes: dict[int, MemberOutcome] = field(default_factory=dict)
    stop_signal: int | None = None

    @property
    def cfg(self) -> RunConfig:
        """The first member's config: what every member shares."""
        return self.cfgs[0]

    def factor(self, step: int) -> float:
        optim = self.cfg.optim
        return lr_factor(step, self.total_steps, self.warmup_steps, optim.schedule, optim.min_lr_ratio)


def train_stacked(cfgs: list[RunConfig], observer: StackObserver | None = None,
                  device: torch.device | None = None) -> list[MemberOutcome]:
    """Train `cfgs` as one stack until run.steps / run.epochs, each member until it diverges, or all until a
    stop signal; returns each config's outcome in the order given."""
    check_stack(cfgs)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stack = open_stack(cfgs, observer or StackObserver(), device)
    try:
        status = stack_loop(stack)
        finish_members(stack, list(stack.members), status)
    finally:
        stack.data.close()
    return [stack.outcomes[i] for i in range(len(cfgs))]


def open_stack(cfgs: list[RunConfig], observer: StackObserver, device: torch.device) -> Stack:
    """The members' models (built and seeded as lone trials build theirs), stacked; the optimizer; the data."""
    set_matmul_precision(cfgs[0].run.matmul_precision)  # the members share it (not a member key)
    data = StackData(cfgs, device)
    num_classes = cfgs[0].data.num_classes or data.streams[0].loader.num_classes
    if not num_classes:
        raise ConfigError("data.num_classes", "not set, and the shards' _info.json does not give it")
    cfgs = [with_values(cfg, {"data.num_classes": num_classes}) for cfg in cfgs]
    models = member_models(cfgs, num_classes)
    optim = cfgs[0].optim
    steps_per_epoch = max(1, len(data.streams[0].loader) // optim.accumulation)
    total_steps = cfgs[0].run.total_steps(steps_per_epoch)
    for index, (cfg, model) in enumerate(zip(cfgs, models)):
        observer.started(index, cfg, model, total_steps)
    compiled = cfgs[0].run.compile
    model = StackedModel(models, device, None if compiled == "off" else COMPILE_KWARGS[compiled])
    hypers = [MemberHypers(cfg.optim.lr, cfg.optim.momentum_value, cfg.optim.weight_decay) for cfg in cfgs]
    optimizer = StackedOptimizer(model.params, groups_of(models[0], optim), optim, hypers,
                                 grad_clip=deepspeed_config(cfgs[0], 1)["gradient_clipping"])
    flops = models[0].flops_per_image() if hasattr(models[0], "flops_per_image") else None
    run = cfgs[0].run
    ema = StackedEma(model.params, run.ema_decay, run.ema_warmup) if run.ema_decay else None
    return Stack(cfgs=cfgs, members=list(range(len(cfgs))), model=model, optimizer=optimizer, data=data, ema=ema,
                 criterion=train_loss(cfgs[0].data), device=device,
                 total_steps=total_steps,
                 warmup_steps=optim.warmup_steps_for(steps_per_epoch), observer=observer, flops=flops,
                 losses={i: [] for i in range(len(cfgs))}, window_losses={i: [] for i in range(len(cfgs))})


def member_models(cfgs: list[RunConfig], num_classes: int) -> list[torch.nn.Module]:
    """Each member's model as its lone trial builds it (the same init as at every ZeRO stage, built whole: no
    DeepSpeed here). Members of one seed get one model object: a model's weights depend on its config, which
    the members share, and on run.seed alone, so each seed's is built once (the stack copies the weights)."""
    by_seed: dict[int, torch.nn.Module] = {}
    for cfg in cfgs:
        if cfg.run.seed not in by_seed:
            by_seed[cfg.run.seed] = build_model(with_values(cfg, {"deepspeed.zero3_init": False}), {}, num_classes)
    return [by_seed[cfg.run.seed] for cfg in cfgs]


def stack_loop(stack: Stack) -> str:
    """Steps until the end ('finished'), a stop request ('preempted') or no member left ('diverged')."""
    run = stack.cfg.run
    with StopRequest() as stop:
        while stack.step < stack.total_steps:
            stack_step(stack)
            step = stack.step
            log_now = step % run.log_interval == 0 or step == stack.total_steps
            eval_now = bool(run.eval_interval) and step % run.eval_interval == 0 and step < stack.total_steps
            if not (log_now or eval_now):
                continue
            preempted = stop.signal is not None and step < stack.total_steps
            diverged = stack_sync(stack)
            if log_now or preempted:
                log_members(stack)
            finish_members(stack, diverged, RunStatus.DIVERGED)
            if not stack.members:
                return RunStatus.DIVERGED
            if preempted:
                stack.stop_signal = stop.signal
                return RunStatus.PREEMPTED
            if eval_now:
                started = time.perf_counter()
                for member, metrics in zip(stack.members, evaluate_stack(stack)):
                    stack.observer.logged(member, step, metrics)
                stack.window.exclude(time.perf_counter() - started)
    return RunStatus.FINISHED


def stack_step(stack: Stack) -> None:
    """One optimizer step of every member over optim.accumulation micro-batches."""
    started = time.perf_counter()
    accumulation = stack.cfg.optim.accumulation
    micro = [stack.data.draw() for _ in range(accumulation)]
    data_s = time.perf_counter() - started
    loss_sum = torch.zeros(len(stack.members), device=stack.device)
    for batches in micro:
        losses = stack_losses(stack, batches)
        total = losses.sum()
        # DeepSpeed's backward divides each member's loss by the accumulation steps (none when there is one)
        (total / accumulation if accumulation > 1 else total).backward()
        loss_sum += losses.detach()
    stack.optimizer.step(stack.factor(stack.step))
    for param in stack.model.params.values():
        param.grad = None
    stack.step += 1
    if stack.ema is not None:
        stack.ema.update(stack.model.params, stack.step)
    stack.window.add_step(loss_sum / accumulation, data_s)


def stack_losses(stack: Stack, batches: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Every member's training loss [K] on `batches` (`StackData.draw`). A model that draws in its forward
    (stochastic depth) runs one seed's members at a time, in that seed's RNG streams, so that each draws
    the masks its lone trial draws."""
    if not stack.model.draws:
        images, targets, shared = stack.data.combine(batches)
        return stack.model.losses(images, targets, stack.criterion, shared)
    parts, order = [], []
    for slot, positions in stack.data.groups().items():
        index = torch.tensor(positions, dtype=torch.long, device=stack.device)
        with stack.data.streams[slot].own_rngs():
            parts.append(stack.model.losses(*batches[slot], stack.criterion, True,
                                            None if len(positions) == len(stack.members) else index))
        order.append(index)
    return torch.cat(parts).index_select(0, torch.argsort(torch.cat(order)))


def stack_sync(stack: Stack) -> list[int]:
    """Read every step's losses since the last sync point back to the host; returns the members that
    diverged (a loss NaN/inf or above run.divergence_loss), each with its message written."""
    pending = stack.window.take_pending().cpu()  # [steps, members]
    first_step = stack.step - pending.shape[0] + 1
    bound = stack.cfg.run.divergence_loss
    diverged = []
    for position, member in enumerate(stack.members):
        losses = pending[:, position].tolist()
        stack.losses[member].extend(losses)
        stack.window_losses[member].extend(losses)
        for step, loss in enumerate(losses, start=first_step):
            if not math.isfinite(loss) or loss > bound:
                stack.outcomes[member] = MemberOutcome(
                    RunStatus.DIVERGED, stack.step, stack.losses[member], loss,
                    message=f"diverged: training loss {loss:.4g} at step {step} (bound run.divergence_loss={bound:g})")
                diverged.append(member)
                break
    return diverged


def log_members(stack: Stack) -> None:
    """Each member's metrics of the steps since the last logging point, as a lone run's `log_window`: its
    mean loss, its groups' current lrs, and the stack's step time and throughput (what each member got)."""
    cfg = stack.cfg
    steps = len(stack.window_losses[stack.members[0]])
    perf = stack.window.perf_metrics(steps, cfg.data.batch_size * cfg.optim.accumulation, stack.flops,
                                     peak_flops(), 1)
    factor = stack.factor(stack.step)
    for position, member in enumerate(stack.members):
        losses = stack.window_losses[member]
        lrs = stack.optimizer.group_lrs(position, factor)
        metrics = {"train/loss": sum(losses) / max(1, len(losses)), **perf,
                   **{f"lr/{label}": lr for label, lr in lrs.items()}}
        stack.observer.logged(member, stack.step, metrics)
        losses.clear()
    stack.window.reset()


def evaluate_stack(stack: Stack) -> list[dict[str, float]]:
    """The eval metrics of every member still in the stack, in stack order (one pass over the eval set), and
    eval/ema_* of their averages (a second pass) under run.ema_decay, as a lone run's `run_evaluation`."""
    with torch.no_grad():
        metrics = evaluate_members(lambda images: stack.model.logits(images), len(stack.members), stack.cfg,
                                   stack.device, stack.step)
        if stack.ema is None:
            return metrics
        averages = stack.ema.averages
        averaged = evaluate_members(lambda images: stack.model.logits(images, params=averages),
                                    len(stack.members), stack.cfg, stack.device, stack.step)
    for member, member_averaged in zip(metrics, averaged):
        member.update({f"eval/ema_{key}": member_averaged[f"eval/{key}"] for key in ("loss", "top1", "top5")})
    return metrics


def finish_members(stack: Stack, members: list[int], status: str) -> None:
    """End `members` with `status` (the final evaluation for finished ones), tell the observer, and take them
    out of the stack."""
    if not members:
        return
    if status == RunStatus.FINISHED:
        for member, metrics in zip(stack.members, evaluate_stack(stack)):
            stack.observer.logged(member, stack.step, metrics)
            losses = stack.losses[member]
            stack.outcomes[member] = MemberOutcome(status, stack.step, losses, losses[-1] if losses else math.nan,
                                                   eval=metrics, skipped=_skipped(stack, member, metrics))
    elif status == RunStatus.PREEMPTED:
        name = signal.Signals(stack.stop_signal or signal.SIGTERM).name
        for member in members:
            losses = stack.losses[member]
            stack.outcomes[member] = MemberOutcome(
                status, stack.step, losses, losses[-1] if losses else math.nan,
                message=f"stopped by {name} at step {stack.step}; no checkpoint (a stacked trial keeps none): "
                        "the run starts over when run again", skipped=_skipped(stack, member, {}))
    for member in members:
        stack.observer.ended(member, stack.outcomes[member])
    _drop(stack, members)


def _skipped(stack: Stack, member: int, eval_metrics: dict[str, float]) -> dict[str, int]:
    """What the member's data skipped, by kind (a lone run's `_data_summary`): its seed's training loader and
    the last evaluation."""
    loader = stack.data.streams[stack.data.slot[stack.members.index(member)]].loader
    summary = {f"data/train_{kind}": int(n) for kind, n in loader.skip_counts.items()}
    summary.update({f"data/eval_{kind}": int(eval_metrics.get(f"eval/skipped_{kind}", 0))
                    for kind in loader.skip_counts})
    return summary


def _drop(stack: Stack, members: list[int]) -> None:
    """Take `members` out of the stacked tensors, the optimizer states and the data (a diverged member's
    NaNs never reach the others: nothing in a step mixes members, and it leaves at the sync point)."""
    keep = [position for position, member in enumerate(stack.members) if member not in members]
    if len(keep) == len(stack.members):
        return
    stack.members = [stack.members[position] for position in keep]
    if not keep:
        return
    stack.optimizer.keep(keep)
    index = torch.tensor(keep, dtype=torch.long, device=stack.device)
    stack.model.keep_buffers(index)
    if stack.ema is not None:
        stack.ema.keep(index)
    stack.data.keep(keep)
