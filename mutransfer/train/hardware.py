"""What the machine can do and how it is asked to: peak bf16 throughput for MFU, peak memory, and the
precision of float32 matrix products (run.matmul_precision)."""

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


# run.matmul_precision -> (torch.set_float32_matmul_precision's value, cuDNN convolutions in TF32)
MATMUL_PRECISION = {"default": ("highest", True), "highest": ("highest", False), "high": ("high", True),
                    "medium": ("medium", True)}


def set_matmul_precision(mode: str) -> None:
    """Set the process's float32 product and convolution precision (every value is set, so that a run in a
    process never inherits what an earlier run there asked for)."""
    products, tf32_convolutions = MATMUL_PRECISION[mode]
    torch.set_float32_matmul_precision(products)
    torch.backends.cudnn.allow_tf32 = tf32_convolutions


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated by torch, or the process's peak resident set size on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
