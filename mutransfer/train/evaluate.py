"""Evaluation: top-1, top-5 and loss over the eval shards, each sample counted once across all ranks."""

from __future__ import annotations

import logging
from contextlib import closing
from typing import Any

import torch
import torch.nn.functional as F

from mutransfer.data import build_eval_loader

from .config import RunConfig
from .distributed import all_reduce_, all_reduce_floats
from .run_log import SampleLog

log = logging.getLogger(__name__)


def evaluate(engine: Any, cfg: RunConfig, rank: int, world_size: int, device: torch.device,
             sample_log: SampleLog | None = None, step: int = 0) -> dict[str, float]:
    """eval/loss, eval/top1, eval/top5 and eval/samples over the eval shards.

    Ranks can hold different numbers of eval batches (no `_info.json`, or a stale one): they agree before
    each batch whether any rank still has one, and a rank that has run out runs a dummy forward, because
    ZeRO-3 gathers parameters collectively inside every forward. The sums stay on the device until the end.
    """
    loader = build_eval_loader(cfg.data, rank, world_size, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
    dummy = torch.zeros(1, 3, cfg.data.img_size, cfg.data.img_size, device=device, dtype=dtype)
    engine.eval()
    with torch.no_grad(), closing(iter(loader)) as iterator:  # closing: its workers stop even on an error
        while True:
            batch = next(iterator, None)
            if all_reduce_floats([0.0 if batch is None else 1.0], device, op="max")[0] == 0:
                break
            if batch is None:
                engine(dummy)
                continue
            sums += _batch_sums(engine, batch, device, dtype)
            if sample_log is not None:
                sample_log.eval(step, [key for key in batch.keys if key])
    engine.train()
    totals = all_reduce_(torch.cat([sums, _loader_counts(loader, device)])).tolist()
    return eval_metrics(loader, totals, rank, step, cfg.run.progress)


def evaluate_members(forward: Any, members: int, cfg: RunConfig, device: torch.device,
                     step: int = 0) -> list[dict[str, float]]:
    """`evaluate` for a stack of `members` models in one process (no other rank): `forward(images)` gives
    every member's logits [members, N, classes]. One pass over the eval shards serves them all."""
    loader = build_eval_loader(cfg.data, 0, 1, device=device)
    sums = torch.zeros(members, 4, dtype=torch.float64, device=device)
    with torch.no_grad(), closing(iter(loader)) as iterator:
        for batch in iterator:
            targets, valid = batch.targets.to(device), batch.valid.to(device)
            logits = forward(batch.images.to(device).float()).float()
            sums += torch.stack([logit_sums(member, targets, valid) for member in logits])
    counts = _loader_counts(loader, device)
    return [eval_metrics(loader, torch.cat([row, counts]).tolist(), 0, step, cfg.run.progress and k == 0)
            for k, row in enumerate(sums)]


def _loader_counts(loader: Any, device: torch.device) -> torch.Tensor:
    """The good samples per shard and the skip counts of this rank's eval loader, as one float64 tensor."""
    return torch.tensor(loader.good_per_shard() + list(loader.skip_counts.values()), dtype=torch.float64,
                        device=device)


def eval_metrics(loader: Any, totals: list[float], rank: int, step: int, verbose: bool) -> dict[str, float]:
    """The eval metrics from `totals` (all ranks): [loss sum, top-1 hits, top-5 hits, valid rows], then the
    good samples per shard and the skip counts."""
    loss, top1, top5, count = totals[:4]
    if count == 0:
        from mutransfer.errors import DataError

        raise DataError(f"no sample of the eval shards {loader.shards.pattern} could be read")
    metrics = {"eval/loss": loss / count, "eval/top1": top1 / count, "eval/top5": top5 / count, "eval/samples": count}
    metrics.update(_eval_coverage(loader, totals[4:], rank, step, verbose))
    return metrics


def _eval_coverage(loader: Any, totals: list[float], rank: int, step: int, verbose: bool) -> dict[str, float]:
    """Samples evaluated against `_info.json` (a warning naming the shards that fell short), and what
    evaluation skipped by kind; `totals` holds the good samples per shard, then the skip counts (all ranks)."""
    from mutransfer.data.eval_loader import coverage_shortfall

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
            log.warning(f"mutransfer: warning: {shortfall}" + (f" (skipped: {kinds})" if kinds else ""))
        elif verbose:
            of = f" of {expected} (_info.json)" if expected is not None else ""
            log.info(f"eval at step {step}: {int(sum(good))}{of} samples")
    return metrics


def _batch_sums(engine: Any, batch: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[loss sum, top-1 hits, top-5 hits, valid rows] of one batch; padding rows (target -100) count nothing."""
    images = batch.images.to(device, non_blocking=True).to(dtype)
    targets = batch.targets.to(device, non_blocking=True)
    return logit_sums(engine(images).float(), targets, batch.valid.to(device))


def logit_sums(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[loss sum, top-1 hits, top-5 hits, valid rows] of one batch's float logits."""
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hits = top5 == targets[:, None]
    return torch.stack([
        F.cross_entropy(logits, targets, reduction="sum", ignore_index=-100).double(),
        hits[:, 0].sum().double(),
        hits.any(dim=-1).sum().double(),
        valid.sum().double(),
    ])
