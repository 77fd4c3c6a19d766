"""What the machine can do: peak bf16 throughput for MFU, and peak memory."""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 tensor-core peak, FLOP/s (vendor datasheets). MFU is reported only on these.
PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def peak_flops() -> float | None:
    """Peak dense bf16 FLOP/s of this process's GPU, or None (CPU, or a GPU not in the table)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated by torch, or the process's peak resident set size on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
