"""Unit tests of the trainer's pure pieces, in one process and without a DeepSpeed engine: the LR factor and
scheduler (every step of a small run against a closed form written here), the DeepSpeed config built from
a RunConfig (merging, the user's JSON file, ZeRO / bf16 / offload / clipping, batch sizes), where a sqlite
store's artifacts go."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from mutransfer.train.config import ConfigError, config_from_dict
from mutransfer.train.engine import deepspeed_config, merge_config
from mutransfer.train.schedule import build_scheduler, lr_factor


def closed_form(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup (step + 1) / warmup, then a half cosine from 1 at step == warmup down to min_ratio at
    step == total, flat at min_ratio after."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(step, total) - warmup
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * t / (total - warmup))) / 2


# --- lr_factor ---------------------------------------------------------------------------------------------------
def test_cosine_with_warmup_at_every_step() -> None:
    total, warmup, floor = 10, 3, 0.1
    factors = [lr_factor(step, total, warmup, "cosine", floor) for step in range(total + 3)]
    assert factors == pytest.approx([closed_form(s, total, warmup, floor) for s in range(total + 3)], rel=1e-12)
    # the landmarks by hand, so that a closed form wrong in the same way as the code would still fail
    assert factors[:4] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0], rel=1e-12)
    assert factors[3 + 7 // 2] == pytest.approx(floor + (1 - floor) * (1 + math.cos(math.pi * 3 / 7)) / 2, rel=1e-12)
    assert factors[total] == pytest.approx(floor, rel=1e-12)
    assert factors[total + 1] == factors[total + 2] == pytest.approx(floor, rel=1e-12)  # no climb after the end
    decay = factors[warmup:total + 1]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly down from warmup to the end


def test_cosine_midpoint_is_halfway_to_the_floor() -> None:
    assert lr_factor(7, 11, 3, "cosine", 0.2) == pytest.approx(0.6, rel=1e-12)  # (1 + 0.2) / 2 at progress 1/2


def test_constant_schedule_is_warmup_then_one() -> None:
    factors = [lr_factor(step, 10, 4, "constant", 0.1) for step in range(14)]
    assert factors == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 11, rel=1e-12)  # min_lr_ratio plays no part


def test_no_warmup_starts_at_full_lr() -> None:
    total, floor = 8, 0.0
    factors = [lr_factor(step, total, 0, "cosine", floor) for step in range(total + 1)]
    assert factors == pytest.approx([closed_form(s, total, 0, floor) for s in range(total + 1)], rel=1e-12, abs=1e-15)
    assert factors[0] == 1.0 and factors[total] == pytest.approx(0.0, abs=1e-15)
    assert lr_factor(0, 8, 0, "constant", 0.5) == 1.0


def test_min_lr_ratio_one_is_flat_after_warmup() -> None:
    factors = [lr_factor(step, 10, 2, "cosine", 1.0) for step in range(12)]
    assert factors == pytest.approx([0.5] + [1.0] * 11, rel=1e-12)


def test_an_unknown_schedule_is_refused_when_the_config_is_read_naming_it() -> None:
    """Checked once, at load, before any step: a typo must not pass for the warmup's steps."""
    for typo in ("linear", "cosin"):
        with pytest.raises(ConfigError, match=f"optim.schedule: must be one of cosine, constant, got '{typo}'"):
            config_from_dict({"optim": {"schedule": typo}, "run": {"steps": 10}})


# --- build_scheduler ---------------------------------------------------------------------------------------------
def test_scheduler_scales_each_group_by_the_factor_and_keeps_their_ratio() -> None:
    """Two groups whose LRs differ by 2.5x (as the parametrization's per-role scales do): at every step each
    group's LR is its own base LR times the factor, so the ratio stays 2.5."""
    total, warmup, floor = 10, 3, 0.1
    weight, bias = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [weight], "lr": 1e-2}, {"params": [bias], "lr": 4e-3}], lr=1.0)
    scheduler = build_scheduler(optimizer, total, warmup, "cosine", floor)
    seen = []
    for step in range(total + 1):
        lrs = [group["lr"] for group in optimizer.param_groups]
        factor = closed_form(step, total, warmup, floor)
        assert lrs == pytest.approx([1e-2 * factor, 4e-3 * factor], rel=1e-12), step
        assert lrs[0] / lrs[1] == pytest.approx(2.5, rel=1e-12), step
        seen.append(lrs[0])
        optimizer.step()
        scheduler.step()
    assert len(set(seen)) > total // 2  # the schedule did move the LRs; a frozen LR would not check the ratio


def test_scheduler_defaults_are_cosine_to_zero_without_warmup() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = build_scheduler(optimizer, total_steps=4)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.5 * closed_form(s, 4, 0, 0.0) for s in range(5)], rel=1e-12, abs=1e-15)
    assert lrs[0] == 0.5 and lrs[-1] == pytest.approx(0.0, abs=1e-15)


# --- merge_config ------------------------------------------------------------------------------------------------
def test_merge_config_is_recursive_and_leaves_base_alone() -> None:
    base = {"a": {"b": 1, "c": {"d": 2, "e": 3}}, "f": 4, "g": {"h": 5}}
    extra = {"a": {"c": {"e": 30, "new": 6}}, "f": {"now": "a dict"}, "g": 7, "i": [8]}
    before = copy.deepcopy(base)
    merged = merge_config(base, extra)
    assert merged == {"a": {"b": 1, "c": {"d": 2, "e": 30, "new": 6}}, "f": {"now": "a dict"}, "g": 7, "i": [8]}
    assert base == before  # nested dicts of base were not written into
    assert merge_config(base, {}) == base and merge_config({}, extra) == extra


# --- deepspeed_config --------------------------------------------------------------------------------------------
def run_config(**sections):
    return config_from_dict({"run": {"steps": 10}, **sections})


def test_defaults_are_explicit() -> None:
    config = deepspeed_config(run_config(), world_size=1)
    assert config["zero_optimization"] == {"stage": 0}
    assert config["gradient_clipping"] == 0.0  # DeepSpeed would clip at 1.0 if the key were missing
    assert config["bf16"] == {"enabled": False, "check_grad_overflow": False}
    assert config["fp16"] == {"enabled": False}
    assert config["zero_allow_untested_optimizer"] is True
    assert "scheduler" not in config and "optimizer" not in config  # ours are passed to deepspeed.initialize


@pytest.mark.parametrize("world_size", [1, 3, 8])
def test_batch_sizes_follow_the_data_config(world_size: int) -> None:
    cfg = run_config(data={"batch_size": 6}, optim={"accumulation": 4})
    config = deepspeed_config(cfg, world_size)
    assert config["train_micro_batch_size_per_gpu"] == 6
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 6 * 4 * world_size


def test_zero_bf16_offload_and_clipping_reach_the_config() -> None:
    cfg = run_config(deepspeed={"zero_stage": 3, "bf16": True, "offload_optimizer": True, "offload_param": True},
                     optim={"grad_clip": 0.5})
    config = deepspeed_config(cfg, world_size=2)
    offload = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": offload, "offload_param": offload}
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert config["gradient_clipping"] == 0.5
    stage2 = deepspeed_config(run_config(deepspeed={"zero_stage": 2, "offload_optimizer": True}), world_size=2)
    assert stage2["zero_optimization"] == {"stage": 2, "offload_optimizer": offload}  # no parameter offload


def test_user_json_wins_except_for_batch_sizes(tmp_path: Path) -> None:
    user = {
        "gradient_clipping": 2.0,
        "zero_optimization": {"stage": 1, "reduce_bucket_size": 7, "offload_optimizer": {"pin_memory": True}},
        "bf16": {"check_grad_overflow": True},
        "communication_data_type": "fp32",
        "train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 99,
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    cfg = run_config(data={"batch_size": 8}, optim={"accumulation": 2, "grad_clip": 0.25},
                     deepspeed={"zero_stage": 2, "bf16": True, "offload_optimizer": True, "config": str(path)})
    config = deepspeed_config(cfg, world_size=3)
    assert config["gradient_clipping"] == 2.0  # the file's keys win over the generated ones ...
    assert config["zero_optimization"] == {
        "stage": 1, "reduce_bucket_size": 7,  # ... nested mappings merge key by key ...
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
    }
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert config["communication_data_type"] == "fp32"  # ... keys of its own pass through ...
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (8, 2, 8 * 2 * 3)  # ... but batch sizes follow the data config
    assert json.loads(path.read_text()) == user  # the user's file is only read


def test_a_sqlite_stores_artifacts_go_beside_it_and_other_stores_keep_mlflows_default(tmp_path: Path) -> None:
    from mutransfer.train.tracking import artifact_location_beside

    db = tmp_path / "runs" / "mlflow.db"
    assert artifact_location_beside(f"sqlite:///{db}", "a b/c") == (tmp_path / "runs" / "mlruns" / "a-b-c").as_uri()
    assert artifact_location_beside("http://127.0.0.1:5000", "x") is None
    assert artifact_location_beside(f"file://{tmp_path}", "x") is None
