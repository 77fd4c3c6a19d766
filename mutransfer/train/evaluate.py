"""Evaluation: top-1, top-5 and loss over the eval shards, each sample counted once across all ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mutransfer.data import build_eval_loader

from .config import RunConfig
from .distributed import all_reduce_, all_reduce_floats
from .run_log import SampleLog


def evaluate(engine: Any, cfg: RunConfig, rank: int, world_size: int, device: torch.device,
             sample_log: SampleLog | None = None, step: int = 0) -> dict[str, float]:
    """eval/loss, eval/top1, eval/top5 and eval/samples over the eval shards.

    Ranks can hold different numbers of eval batches (no `_info.json`, or a stale one): they agree before
    each batch whether any rank still has one, and a rank that has run out runs a dummy forward, because
    ZeRO-3 gathers parameters collectively inside every forward. The sums stay on the device until the end.
    """
    loader = build_eval_loader(cfg.data, rank, world_size, device=device)
    iterator = iter(loader)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
    dummy = torch.zeros(1, 3, cfg.data.img_size, cfg.data.img_size, device=device, dtype=dtype)
    engine.eval()
    with torch.no_grad():
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
    loss, top1, top5, count = all_reduce_(sums).tolist()
    if count == 0:
        raise ValueError("the eval shards hold no samples")
    return {"eval/loss": loss / count, "eval/top1": top1 / count, "eval/top5": top5 / count, "eval/samples": count}


def _batch_sums(engine: Any, batch: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[loss sum, top-1 hits, top-5 hits, valid rows] of one batch; padding rows (target -100) count nothing."""
    images = batch.images.to(device, non_blocking=True).to(dtype)
    targets = batch.targets.to(device, non_blocking=True)
    logits = engine(images).float()
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hits = top5 == targets[:, None]
    return torch.stack([
        F.cross_entropy(logits, targets, reduction="sum", ignore_index=-100).double(),
        hits[:, 0].sum().double(),
        hits.any(dim=-1).sum().double(),
        batch.valid.to(device).sum().double(),
    ])
