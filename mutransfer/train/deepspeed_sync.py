"""Removes the host waits that DeepSpeed 0.19 puts inside every ZeRO step, so that a GPU step queues its work
without waiting for it (the trainer's docstring lists the only places where the host waits).

The first was found by `tests/integration/test_gpu.py` on an H100 (2026-12-06), in the gradient-norm path that
every ZeRO-1/2 step takes (DeepSpeed computes the norm for its grad-norm record whether or not it clips):

- a norm that is inf/NaN is masked to -1 with `torch.tensor(-1.0, device=...)`: a copy from pageable host
  memory, which waits for the GPU to drain first (the same function serves ZeRO-3 and the global norm of
  ZeRO-0's optimizer);
- when it clips (optim.grad_clip > 0), ZeRO-1/2 asks `is_invalid_grad_norm(norm)`, a `bool()` of a GPU tensor,
  to turn an invalid norm into inf.

Waits that remain, outside what this module touches: ZeRO-3 reads its norm back with `.cpu()`, and ZeRO-0 in
bf16 runs DeepSpeed's FP16_UnfusedOptimizer, whose overflow and norm checks read values back every step (the
engine warns; use ZeRO-1).

`install()` swaps both for the same arithmetic kept on the device (`masked_fill` with Python numbers): the
same numbers, bit for bit (tests/unit/test_deepspeed_sync.py checks them against
DeepSpeed's own on finite, inf, NaN and negative norms, with and without clipping). It changes nothing for other
DeepSpeed versions, whose code may differ; the GPU test shows whether one waits.
"""

from __future__ import annotations

from typing import Any

import torch

VERIFIED_SERIES = "0.19."
_originals: dict[str, Any] = {}


def mask_invalid_norm(norm: torch.Tensor, device: Any = None, val: float = -1.0) -> None:
    """In place: an inf/NaN norm becomes -1 (DeepSpeed's sentinel; like DeepSpeed, `val` is not used)."""
    norm.masked_fill_(~torch.isfinite(norm), -1.0)


def unscale_and_clip_grads(self, grad_groups_flat: list, total_norm: Any) -> None:
    """ZeRO-1/2's unscale-and-clip with the invalid-norm test on the device (an invalid norm clips as inf:
    every gradient scaled to zero, as in DeepSpeed)."""
    if not torch.is_tensor(total_norm):  # None (no norm computed): nothing of DeepSpeed's own waits then
        return _originals["unscale_and_clip_grads"](self, grad_groups_flat, total_norm)
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return None
    combined_scale = self.loss_scale
    if self.clip_grad > 0.0:
        invalid = ~torch.isfinite(total_norm) | (total_norm < 0)
        clip_norm = total_norm.masked_fill(invalid, float("inf"))
        clip = torch.clamp(((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad, min=1.0)
        combined_scale = clip * self.loss_scale
    for grad in grad_groups_flat:
        for part in grad if isinstance(grad, list) else [grad]:
            part.data.mul_(1.0 / combined_scale)
    return None


def _modules() -> dict[str, Any]:
    from deepspeed.runtime import utils
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    return {"utils": utils, "stage3": stage3, "stage_1_and_2": stage_1_and_2}


def install() -> bool:
    """Swap in the sync-free versions (idempotent). False, and nothing changed, for a DeepSpeed outside 0.19."""
    import deepspeed

    if not deepspeed.__version__.startswith(VERIFIED_SERIES):
        return False
    if _originals:
        return True
    modules = _modules()
    zero_optimizer = modules["stage_1_and_2"].DeepSpeedZeroOptimizer
    _originals["unscale_and_clip_grads"] = zero_optimizer.unscale_and_clip_grads
    for name, module in modules.items():
        _originals[name] = module.mask_nan_or_inf_with_val_inplace
        module.mask_nan_or_inf_with_val_inplace = mask_invalid_norm
    zero_optimizer.unscale_and_clip_grads = unscale_and_clip_grads
    return True


def uninstall() -> None:
    """DeepSpeed's own code back (tests compare the two)."""
    if not _originals:
        return
    modules = _modules()
    modules["stage_1_and_2"].DeepSpeedZeroOptimizer.unscale_and_clip_grads = _originals.pop("unscale_and_clip_grads")
    for name, module in modules.items():
        module.mask_nan_or_inf_with_val_inplace = _originals.pop(name)
