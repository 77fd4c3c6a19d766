"""What only a CUDA GPU can show; every test here is skipped without one (first run on an H100 on 2026-12-06,
docs/benchmarks.md): flash / memory-efficient SDPA in bf16, fused AdamW with the
per-role groups, no host sync inside a training step, and nvJPEG decoding against the CPU decoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from train_helpers import losses, write_config

from mutransfer.models import create_model
from mutransfer.models.optim import OptimSection, build_optimizer, param_groups
from mutransfer.train.hardware import set_matmul_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
def test_sdpa_runs_on_the_fast_kernels_in_bf16(backend) -> None:
    """Restricted to one kernel, SDPA raises if it cannot use it: our attention (custom logit scale,
    permuted q/k/v) must fit flash and memory-efficient attention in bf16, forward and backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = create_model("vit_small_patch16", num_classes=10, parametrization="mup", base_width=192,
                         base_depth=4).cuda().to(torch.bfloat16)
    images = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        loss = F.cross_entropy(model(images).float(), torch.zeros(8, dtype=torch.long, device="cuda"))
        loss.backward()
    assert torch.isfinite(loss)


def test_fused_adamw_on_cuda_keeps_the_group_scales() -> None:
    """Fused AdamW moves every parameter as torch's per-tensor loop over the same per-role groups does.
    Compared by each parameter's whole update: single elements whose gradient is near zero (the key bias's,
    whose gradient softmax cancels) step by rounding noise in either kernel (measured on CPU: updates agree to
    3e-4 of their norm, single elements by 5e-5 absolute); a wrong group lr would be off by 30 % or more."""
    torch.manual_seed(0)
    shape = dict(width=64, depth=2, head_dim=16, patch_size=8, img_size=32, num_classes=10,
                 parametrization="depth_mup", base_width=32, base_depth=1)
    model = create_model("vit", **shape).cuda()
    reference = create_model("vit", **shape).cuda()
    reference.load_state_dict(model.state_dict())
    start = [p.detach().clone() for p in model.parameters()]
    fused = build_optimizer(model, OptimSection(lr=1e-2, weight_decay=0.05), fused=True)
    loop = torch.optim.AdamW(param_groups(reference, OptimSection(lr=1e-2, weight_decay=0.05)), foreach=False)
    assert all(group["fused"] for group in fused.param_groups)
    assert len({group["lr_scale"] for group in fused.param_groups}) >= 3  # the scales differ, or this shows nothing
    images, labels = torch.randn(4, 3, 32, 32, device="cuda"), torch.randint(0, 10, (4,), device="cuda")
    for _ in range(3):
        for net, opt in ((model, fused), (reference, loop)):
            opt.zero_grad()
            F.cross_entropy(net(images), labels).backward()
            opt.step()
    gaps = {name: ((mine - theirs).norm() / (theirs - before).norm()).item()
            for (name, mine), theirs, before in zip(model.named_parameters(), reference.parameters(), start)}
    worst = max(gaps, key=gaps.get)
    assert gaps[worst] < 1e-2, f"{worst}: fused and per-tensor updates differ by {gaps[worst]:.1e} of the update"


def host_waits(call, *args) -> set[str]:
    """Where `call(*args)` made the host wait for the GPU ("file:line (what)"): every wait CUDA's sync debug
    mode sees (copies and reads back to the host), and the explicit synchronizations it does not
    (torch.cuda.synchronize, Event.synchronize, Stream.synchronize), counted by wrapping them."""
    import sys
    import warnings

    explicit: set[str] = set()
    originals = [(torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"), (torch.cuda.Stream, "synchronize")]

    def counting(owner, name, real):
        def wrapper(*a, **k):
            caller = sys._getframe(1)
            explicit.add(f"{caller.f_code.co_filename}:{caller.f_lineno} ({getattr(owner, '__name__', owner)}.{name})")
            return real(*a, **k)
        return wrapper

    saved = [(owner, name, getattr(owner, name)) for owner, name in originals]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for owner, name, real in saved:
            setattr(owner, name, counting(owner, name, real))
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            for owner, name, real in saved:
                setattr(owner, name, real)
    return explicit | {f"{w.filename}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)}


def test_the_wait_watch_sees_planted_waits() -> None:
    """If `host_waits` missed waits, the empty lists of the test below would prove nothing."""
    assert host_waits(lambda: torch.ones(1, device="cuda").item())
    assert host_waits(torch.cuda.synchronize)
    assert host_waits(lambda: torch.cuda.current_stream().synchronize())
    assert not host_waits(lambda: torch.ones(1, device="cuda") * 2)


@pytest.mark.parametrize("zero_stage", [
    pytest.param(0, marks=pytest.mark.xfail(strict=True, raises=AssertionError,
                                            reason="ZeRO-0 in bf16 runs DeepSpeed's FP16_UnfusedOptimizer, whose "
                                                   "overflow and norm checks read values back every step; the engine warns")),
    1, 2])
def test_no_host_sync_inside_a_training_step(tmp_path: Path, monkeypatch, zero_stage: int) -> None:
    """Between sync points the host never waits for the GPU: every wait inside `train_step` (after two warm-up
    steps) is recorded with the Python line that caused it (`host_waits`), and there must be none. bf16, one
    process, ZeRO-1 and 2 (DeepSpeed's own waits removed by mutransfer.train.deepspeed_sync), clipping on, so
    that the clip's path runs too."""
    from mutransfer.data import write_synthetic_shards
    from mutransfer.train import trainer
    from mutransfer.train.config import load_config

    shards = tmp_path / "shards"
    write_synthetic_shards(str(shards), "train", classes=10, samples=256, image_size=32, seed=0, samples_per_shard=128)
    write_synthetic_shards(str(shards), "validation", classes=10, samples=32, image_size=32, seed=0)
    real_step = trainer.train_step
    waits: set[str] = set()

    def watched_step(run):
        if run.state.step < 2:
            return real_step(run)
        waits.update(host_waits(real_step, run))
        return None

    monkeypatch.setattr(trainer, "train_step", watched_step)
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "out", "sqlite:///unused.db",
                          deepspeed=dict(zero_stage=zero_stage, bf16=True), tracking=dict(enabled=False),
                          optim=dict(grad_clip=1.0),
                          run=dict(steps=12, log_interval=6))
    result = trainer.train(load_config(config))
    assert result.status == "finished"
    assert not waits, f"the host waited for the GPU inside train_step at: {sorted(waits)}"


@pytest.mark.parametrize("precision", ["highest", "high"])
def test_stack_members_follow_their_lone_runs_on_the_gpu(shard_set, tmp_path: Path, precision: str) -> None:
    """A stacked trial and the same trial alone, on the GPU, step by step (on CPU they agree to 1e-4:
    tests/integration/test_stacked.py). The H100 sweep of 2026-12-06 found final eval losses 0.2-3.5 % apart
    at lr <= 2^-6 after 120 steps, with PyTorch's defaults (TF32 in cuDNN's convolutions, here the patch
    embedding): the float32 chaos those trials show on CPU too (docs/benchmarks.md). These two members'
    runs are reproducible: in full float32 (run.matmul_precision=highest) they must agree as on CPU, in TF32
    (high) to 1e-2; the message gives the per-step gaps."""
    try:
        gaps = stacked_against_alone(shard_set(256, 32), tmp_path, precision)
    finally:
        set_matmul_precision("default")
    report = "; ".join(" ".join(f"{x:.0e}" for x in g) for g in gaps)
    bound = 1e-3 if precision == "highest" else 1e-2
    assert all(len(g) == 21 and all(x < bound for x in g) for g in gaps), f"relative gaps per step, then of the eval loss: {report}"


def stacked_against_alone(shards: Path, tmp_path: Path, precision: str) -> list[list[float]]:
    """Two members (lr 3e-3 seed 0, lr 1e-3 seed 1) trained as a stack and alone: each member's relative
    gap at each of 20 steps, then of its final eval loss."""
    from mutransfer.train import trainer
    from mutransfer.train.config import load_config
    from mutransfer.train.stacked import train_stacked

    members = [dict(lr=3e-3, seed=0), dict(lr=1e-3, seed=1)]
    cfgs = [load_config(write_config(tmp_path / f"m{i}.yaml", shards, tmp_path / f"m{i}", "sqlite:///unused.db",
                                     optim=dict(lr=m["lr"]), deepspeed=dict(zero_stage=0), tracking=dict(enabled=False),
                                     run=dict(steps=20, log_interval=1, seed=m["seed"], save_checkpoints=False,
                                              matmul_precision=precision)))
            for i, m in enumerate(members)]
    stacked = train_stacked(cfgs)
    gaps = []
    for outcome, cfg in zip(stacked, cfgs):
        result = trainer.train(cfg)
        assert outcome.status == result.status == "finished"
        alone = list(losses(Path(cfg.run.output_dir)).values())  # steps 1-20 in order
        gaps.append([abs(a / b - 1) for a, b in zip(outcome.losses, alone)]
                    + [abs(outcome.eval["eval/loss"] / result.eval["eval/loss"] - 1)])
    return gaps


def test_nvjpeg_batch_decode_matches_the_cpu_decoder(tmp_path: Path, make_gradient) -> None:
    import io

    import numpy as np
    from PIL import Image

    from mutransfer.data.gpu_decode import EncodedImage, collate_encoded, crop_batch

    rng = np.random.default_rng(0)
    items = []
    for i, (h, w) in enumerate([(375, 500), (500, 375), (224, 224)]):
        buffer = io.BytesIO()
        Image.fromarray(make_gradient(rng, h, w)).save(buffer, format="JPEG", quality=90)
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        items.append(((EncodedImage(data, True, (w, h)), (10, 20, h - 40, w - 60), i % 2 == 0, 1), i, str(i)))
    batch, _, _ = collate_encoded(items)
    on_gpu = crop_batch(batch, 224, torch.device("cuda")).cpu()
    on_cpu = crop_batch(batch, 224, torch.device("cpu"))
    assert (on_gpu - on_cpu).abs().mean() < 2.0
