"""How many trials of one shape fit in one stack: each member's memory, estimated from its model without
training it, against what the device has free.

A member holds its parameters, their gradients, the optimizer's states (two for AdamW, one for SGD) and its
weight EMA under run.ema_decay, plus
the activations its training forward saves for the backward pass; those are counted exactly, by running the
forward on the meta device (no memory, no compute) with a hook on every tensor autograd saves. vmap's
temporaries and the evaluation batch are covered by a factor of 2 on the total, and a stack takes at most
half of the free memory (host RAM on CPU, the GPU's free memory on a GPU).
"""

from __future__ import annotations

import torch

from mutransfer.models import create_model

from .config import RunConfig
from .stacked_optim import STATE_SLOTS

HEADROOM = 2.0  # vmap's temporaries, allocator slack and the evaluation batch, on top of the estimate
SHARE_OF_FREE = 0.5  # of the free memory, what one stack may take
DEFAULT_CLASSES = 1000  # when the config does not say: an upper bound for the readout's size


def member_bytes(cfg: RunConfig) -> int:
    """The estimated memory of one stack member of `cfg`'s shape, headroom included."""
    num_classes = cfg.data.num_classes or DEFAULT_CLASSES
    with torch.device("meta"):
        model = create_model(cfg.model.name, weight_init=False,
                             **cfg.model.create_kwargs(cfg.data.img_size, num_classes))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    states = len(STATE_SLOTS[cfg.optim.name]) + (1 if cfg.run.ema_decay else 0)
    saved = 0

    def count(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    images = torch.empty(cfg.data.batch_size, 3, cfg.data.img_size, cfg.data.img_size, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        model(images).float().sum()
    return int(HEADROOM * (params * (2 + states) + saved))


def free_bytes(device: torch.device) -> int:
    """Free memory where the stack trains: the GPU's, or the host's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def auto_stack_size(cfg: RunConfig, count: int, device: torch.device | None = None,
                    share: float = SHARE_OF_FREE) -> int:
    """How many of `count` trials of `cfg`'s shape to stack: all that fit in `share` of the free memory
    (processes that train stacks side by side on one host split SHARE_OF_FREE between them), at least 1."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fits = int(share * free_bytes(device)) // max(1, member_bytes(cfg))
    return max(1, min(count, fits))
