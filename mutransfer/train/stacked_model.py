"""The pieces a stack of trials shares: its K models as stacked tensors run under `torch.func.vmap`, and its
training data, one loader per distinct seed, each drawing its augmentation from that seed's own RNG streams.

A member's model is built exactly as a lone trial builds it (`engine.build_model`: run.seed, then the zoo's
init), and `torch.func.stack_module_state` stacks the K models' parameters into [K, ...] leaves. The forward
pass calls the model's own code through `functional_call` under `vmap`, so every member computes what the
lone model computes. Stochastic depth (model.drop_path_rate) draws its masks inside the forward: under vmap
one draw serves every member (`randomness="same"`), which is the lone trial's draw when the members share a
seed and the forward runs in that seed's RNG streams (`SeedStream.own_rngs`; `stacked.stack_losses`). A lone
trial seeds its global RNGs from (run.seed, rank) after building its model
(`engine.seed_rngs`); in-process augmentation (data.num_workers=0, random erasing) draws from them. Each seed's
loader here gets those states swapped in while it draws and saved when it is done, so that several loaders
in one process each see the stream a lone trial of their seed sees.

Under run.compile the vmapped training loss goes through torch.compile as a whole (inductor fuses the small
elementwise ops that bound a narrow proxy's step), with attention written as matmul-softmax-matmul, which
it can fuse too; evaluation stays eager. A lone trial compiles its model through DeepSpeed instead: the same
arithmetic, rounded differently.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from mutransfer.data import build_train_loader

from .batches import BatchStream
from .checkpoint import TrainState
from .config import RunConfig
from .engine import seed_rngs
from .stacked_attention import folded_sdpa, plain_sdpa

EVAL_CHUNK_FLOATS = 4 * 2**20  # the widest activation of one evaluation call over the stack: 16 MiB of fp32


def widest_activation(model: torch.nn.Module, image_shape: tuple[int, ...]) -> int:
    """Elements of the largest module output of one image through `model`, a model on the meta device."""
    widest = 0

    def record(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        nonlocal widest
        if isinstance(output, torch.Tensor):
            widest = max(widest, output.numel())

    handles = [module.register_forward_hook(record) for module in model.modules()]
    try:
        with torch.no_grad():
            model(torch.empty(1, *image_shape, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return max(1, widest)


class StackedModel:
    """K models of one architecture: `params` and `buffers` map each name to a [K, ...] tensor."""

    def __init__(self, models: list[torch.nn.Module], device: torch.device,
                 compile_kwargs: dict[str, Any] | None = None) -> None:
        """`compile_kwargs`: torch.compile's keyword arguments for the training loss (None: eager)."""
        params, buffers = stack_module_state(models)
        self.params = {name: p.detach().to(device).requires_grad_() for name, p in params.items()}
        self.buffers = {name: b.to(device) for name, b in buffers.items()}
        skeleton = copy.deepcopy(models[0])
        if getattr(skeleton, "grad_checkpointing", False):  # a memory trade only; vmap runs the plain forward
            skeleton.grad_checkpointing = False
        for module in skeleton.modules():
            if hasattr(module, "sdpa"):
                module.sdpa = folded_sdpa if compile_kwargs is None else plain_sdpa
        self.skeleton = skeleton.to("meta")  # its code runs; its tensors come from `params`
        self._widest: dict[tuple[int, ...], int] = {}  # per image shape: widest activation of one image
        self.randomness = "same" if getattr(models[0], "drop_path_rate", 0.0) > 0 else "error"
        self._vmapped_losses = self._eager_losses
        if compile_kwargs is not None:
            self._vmapped_losses = torch.compile(self._eager_losses, **compile_kwargs)

    @property
    def draws(self) -> bool:
        """Whether the training forward draws random numbers (stochastic depth)."""
        return self.randomness == "same"

    def _logits(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                images: torch.Tensor) -> torch.Tensor:
        return functional_call(self.skeleton, (params, buffers), (images,))

    def logits(self, images: torch.Tensor, shared: bool = True,
               params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Every member's eval-mode logits [K, N, classes] (no stochastic depth) of `params` (default: the
        weights; the EMA's averages, say); `shared`: one batch [N, ...] for all, else [K, N, ...]. Computed
        in chunks of images whose widest activation over the K members stays cache-sized (`eval_chunk`)."""
        params = params or self.params
        members = next(iter(params.values())).shape[0]
        dim = 0 if shared else 1
        forward = vmap(self._logits, in_dims=(0, 0, None if shared else 0))
        self.skeleton.eval()
        try:
            chunk = self.eval_chunk(members, tuple(images.shape[dim + 1:]))
            return torch.cat([forward(params, self.buffers, part) for part in images.split(chunk, dim)], dim=1)
        finally:
            self.skeleton.train()

    def eval_chunk(self, members: int, image_shape: tuple[int, ...]) -> int:
        """Images per evaluation call: as many as keep the widest activation of the K members under
        EVAL_CHUNK_FLOATS. One call over a whole eval batch of 500 images ran 3x slower at width 128 than
        calls of 20-40 (24 members, 2 CPU cores: each op's tensors no longer fit the caches)."""
        if image_shape not in self._widest:
            self._widest[image_shape] = widest_activation(self.skeleton, image_shape)
        return max(1, EVAL_CHUNK_FLOATS // (members * self._widest[image_shape]))

    def losses(self, images: torch.Tensor, targets: torch.Tensor, criterion: torch.nn.Module,
               shared: bool, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss [K] of every member, or of those at `positions` (the lone trial's: criterion on
        the float logits)."""
        params, buffers = self.params, self.buffers
        if positions is not None:
            params = {name: p.index_select(0, positions) for name, p in params.items()}
            buffers = {name: b.index_select(0, positions) for name, b in buffers.items()}
        return self._vmapped_losses(params, buffers, images, targets, criterion, shared)

    def _eager_losses(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], images: torch.Tensor,
                      targets: torch.Tensor, criterion: torch.nn.Module, shared: bool) -> torch.Tensor:
        def member_loss(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor,
                        y: torch.Tensor) -> torch.Tensor:
            return criterion(self._logits(params, buffers, x).float(), y)

        data_dim = None if shared else 0
        return vmap(member_loss, in_dims=(0, 0, data_dim, data_dim), randomness=self.randomness)(
            params, buffers, images, targets)

    def keep_buffers(self, index: torch.Tensor) -> None:
        self.buffers = {name: b.index_select(0, index) for name, b in self.buffers.items()}


def _rng_states() -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_states(states: tuple[Any, ...]) -> None:
    python, numpy, cpu, cuda = states
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class SeedStream:
    """The training batches of one run.seed: the lone trial's loader, drawing from the lone trial's RNGs."""

    def __init__(self, cfg: RunConfig, device: torch.device) -> None:
        self.loader = build_train_loader(cfg.data, 0, 1, device=device)
        self.batches = BatchStream(self.loader, TrainState())
        outside = _rng_states()
        seed_rngs(cfg.run.seed, 0)
        self.states = _rng_states()
        _set_rng_states(outside)

    @contextmanager
    def own_rngs(self) -> Iterator[None]:
        """The global RNGs in this seed's states (what a lone trial of it sees), saved again after."""
        outside = _rng_states()
        _set_rng_states(self.states)
        try:
            yield
        finally:
            self.states = _rng_states()
            _set_rng_states(outside)

    def next(self) -> Any:
        with self.own_rngs():
            return self.batches.next()

    def close(self) -> None:
        self.batches.close()


class StackData:
    """One `SeedStream` per distinct seed of the members; `next()` gives the stack's micro-batch."""

    def __init__(self, cfgs: list[RunConfig], device: torch.device) -> None:
        seeds = list(dict.fromkeys(cfg.run.seed for cfg in cfgs))
        by_seed = {cfg.run.seed: cfg for cfg in cfgs}
        self.streams = [SeedStream(by_seed[seed], device) for seed in seeds]
        self.slot = [seeds.index(cfg.run.seed) for cfg in cfgs]  # each member's stream, in stack order

    def draw(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The next (images, targets) of every stream a member uses, by stream."""
        return {slot: self.streams[slot].next()[:2] for slot in sorted(set(self.slot))}

    def combine(self, batches: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(images, targets, shared) of `draw()`'s batches: one batch for every member when they share a
        stream, else the members' batches stacked [K, ...] (members of one seed get the same one)."""
        if len(batches) == 1:
            return (*next(iter(batches.values())), True)
        images = torch.stack([batches[slot][0] for slot in self.slot])
        targets = torch.stack([batches[slot][1] for slot in self.slot])
        return images, targets, False

    def groups(self) -> dict[int, list[int]]:
        """The members' positions in the stack, by the stream they draw from."""
        positions: dict[int, list[int]] = {}
        for position, slot in enumerate(self.slot):
            positions.setdefault(slot, []).append(position)
        return positions

    def keep(self, indices: list[int]) -> None:
        """Only the members at `indices` train on; a stream no member uses any more stops drawing."""
        self.slot = [self.slot[i] for i in indices]

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
