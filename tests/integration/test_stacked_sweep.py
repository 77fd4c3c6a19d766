"""`mutransfer sweep` with stacked trials, against a real MLflow store: each trial of a stack gets the child run a
trial trained alone gets (tags, params, metrics, status), a diverged member included; a resumed sweep runs its
unfinished trials again as a stack in their own child runs; `--stack` refuses what cannot stack; a stop signal
ends every member preempted."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from train_helpers import write_proxy_config

from mutransfer.errors import UsageError
from mutransfer.study.config import load_study
from mutransfer.study.stacks import plan_stacks, shape_key
from mutransfer.study.store import latest_per_key, load_trials
from mutransfer.study.sweep import run_sweep
from mutransfer.study.trial import TrialSpec

pytestmark = pytest.mark.slow  # integration: in-process DeepSpeed engines and MLflow stores

STUDY = "stacked"
LRS = [1e-3, 1e-2, 30.0]  # the last one diverges (Adam at lr 30 on a ViT)


def make_study(root: Path, shards: Path, **run_values) -> Path:
    """root/study.yaml: mup ViTs at width 16, depth 1, three lrs x two seeds (six trials of one shape)."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    base = write_proxy_config(root, shards, uri, steps=6, divergence_loss=20.0, **run_values)
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump({
        "study": {"name": STUDY, "experiment": "tests", "base_config": str(base), "output_dir": str(root / "trials"),
                  "steps": 6},
        "shapes": {"variants": ["mup"], "widths": [16], "depths": [1]},
        "grid": {"lr": LRS, "momentum": [0.9]},
        "seeds": [0, 1],
    }))
    return path


@pytest.fixture(scope="module")
def shards(shard_set) -> Path:
    return shard_set(512, 100, validation_per_shard=50)


def sweep(root: Path, **kwargs):
    """run_sweep of root/study.yaml into root's own MLflow store."""
    return run_sweep(load_study(root / "study.yaml"), tracking_uri=f"sqlite:///{root / 'mlflow.db'}", progress=False,
                     **kwargs)


def trials_of(root: Path) -> dict:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return {t.key: t for t in latest_per_key(load_trials(client, STUDY, "tests"))}


def child_run(root: Path, run_id: str):
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(run_id)


def comparable_params(run, root: Path) -> dict[str, str]:
    """The run's params but the ones naming its own folder, store or parent run."""
    parent = run.data.tags["mlflow.parentRunId"]
    return {k: v for k, v in run.data.params.items() if str(root) not in v and parent not in v}


def history(root: Path, run_id: str, metric: str) -> list[tuple[int, float]]:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))


def test_each_stacked_trial_is_recorded_as_the_same_trial_alone(shards, tmp_path) -> None:
    alone_root, stacked_root = tmp_path / "alone", tmp_path / "stacked"
    for root in (alone_root, stacked_root):
        root.mkdir()
        make_study(root, shards)
    alone, stacked = sweep(alone_root, stack=1), sweep(stacked_root)
    assert alone.statuses == stacked.statuses and alone.exit_code == stacked.exit_code == 0
    assert sorted(stacked.statuses.values()).count("diverged") == 2
    lone_trials, stacked_trials = trials_of(alone_root), trials_of(stacked_root)
    assert sorted(lone_trials) == sorted(stacked_trials) and len(stacked_trials) == 6
    for key, trial in stacked_trials.items():
        mine, theirs = child_run(stacked_root, trial.run_id), child_run(alone_root, lone_trials[key].run_id)
        assert trial.status == lone_trials[key].status
        mine_tags = {k: v for k, v in mine.data.tags.items() if k != "mlflow.parentRunId"}
        assert mine_tags == {k: v for k, v in theirs.data.tags.items() if k != "mlflow.parentRunId"}
        assert comparable_params(mine, stacked_root) == comparable_params(theirs, alone_root)
        assert set(mine.data.metrics) == set(theirs.data.metrics), key
        mine_losses, their_losses = history(stacked_root, trial.run_id, "train/loss"), \
            history(alone_root, lone_trials[key].run_id, "train/loss")
        assert [s for s, _ in mine_losses] == [s for s, _ in their_losses]
        if trial.status == "finished":
            assert [v for _, v in mine_losses] == pytest.approx([v for _, v in their_losses], rel=1e-4)
            assert trial.metrics["final/eval_loss"] == pytest.approx(lone_trials[key].metrics["final/eval_loss"],
                                                                     rel=1e-4)

    # one process, one machine: every member gets the stack's one system sample at each logging point (each
    # member sampling in turn gave all but the first a CPU utilisation over the microseconds since the last)
    cpu = {key: dict(history(stacked_root, t.run_id, "system/cpu_utilization_percentage"))
           for key, t in stacked_trials.items()}
    longest = max(cpu.values(), key=len)
    assert len(longest) >= 2 and all(cpu.values())  # (a diverged member's history ends where it left)
    assert all(longest[step] == value for values in cpu.values() for step, value in values.items())

    # a stack stopped part way: its trials run again, as a stack, in their own child runs
    client = MlflowClient(f"sqlite:///{stacked_root / 'mlflow.db'}")
    again = [key for key, t in stacked_trials.items() if t.spec.lr == LRS[0]]
    for key in again:
        client.set_tag(stacked_trials[key].run_id, "mutransfer.status", "interrupted")
        client.set_terminated(stacked_trials[key].run_id, "KILLED")
    resumed = sweep(stacked_root)
    assert sorted(resumed.ran) == sorted(again) and len(resumed.skipped) == 4
    after = trials_of(stacked_root)
    for key in again:
        assert after[key].run_id == stacked_trials[key].run_id and after[key].status == "finished"
        steps = [s for s, _ in history(stacked_root, after[key].run_id, "train/loss")]
        assert steps == sorted(set(steps))  # each step recorded once


def test_stacks_group_every_field_but_the_member_ones() -> None:
    def spec(**values) -> TrialSpec:
        return TrialSpec(**{**dict(variant="mup", width=16, depth=1, batch_size=16, steps=6, lr=1e-3,
                                   momentum=0.9, weight_decay=0.0, seed=0), **values})

    trials = [spec(lr=lr, seed=seed) for lr in (1e-3, 1e-2, 1e-1) for seed in (0, 1)]
    trials += [spec(width=32), spec(variant="sp", momentum=0.5, weight_decay=0.1, seed=2),
               spec(batch_size=32), spec(steps=12, lr=1e-2)]
    assert shape_key(trials[0]) == ("mup", 16, 1, 16, 6)  # every field but lr, momentum, weight decay, seed
    stacks = plan_stacks(trials, lambda trial, count: 4)
    assert [len(s) for s in stacks] == [4, 2, 1, 1, 1, 1]
    assert all(len({shape_key(t) for t in s}) == 1 for s in stacks)
    assert [len(s) for s in plan_stacks(trials, lambda trial, count: 1)] == [1] * 10


def test_explicit_stack_refuses_configs_that_cannot_stack(shards, tmp_path) -> None:
    make_study(tmp_path, shards, record_samples=True)
    with pytest.raises(UsageError, match="record_samples"):
        sweep(tmp_path, stack=3)
    with pytest.raises(UsageError, match="--stack"):
        sweep(tmp_path, launcher="torchrun", stack=3)


def test_a_stop_signal_ends_every_member_preempted(shards, tmp_path, monkeypatch) -> None:
    from mutransfer.train import stacked

    real = stacked.log_members

    def log_then_signal(stack) -> None:  # SIGTERM arrives while step 2's metrics are logged
        real(stack)
        if stack.step == 2:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(stacked, "log_members", log_then_signal)
    make_study(tmp_path, shards)
    summary = sweep(tmp_path)
    assert summary.interrupted is not None and summary.exit_code > 128 and len(summary.ran) == 6
    trials = trials_of(tmp_path)
    stopped = [t for t in trials.values() if t.spec.lr != LRS[-1]]  # lr 30 may have diverged before the signal
    assert {summary.statuses[t.key] for t in stopped} == {"interrupted"}
    assert {t.status for t in stopped} == {"preempted"}  # as a lone trial's run ends
    assert all(history(tmp_path, t.run_id, "train/loss")[-1][0] == 4 for t in stopped)
