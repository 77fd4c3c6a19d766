"""The proxy-to-target workflow against a real MLflow store: sweep, resume, divergence, transfer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from train_helpers import BIN, PROXY_MODEL, losses, run, write_config, write_proxy_config, write_study

from mutransfer.study.store import latest_per_key, load_trials
from mutransfer.train.config import load_config

pytestmark = pytest.mark.slow  # integration: real processes, engines or servers (make test-fast skips)

STUDY = "tiny"
LRS = [1e-3, 1e-2, 30.0]  # the last one diverges (Adam at lr 30 on a ViT)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shard_set) -> dict:
    root = tmp_path_factory.mktemp("study")
    shards = shard_set(512, 100, validation_per_shard=50)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    base = write_proxy_config(root, shards, uri, steps=6, divergence_loss=20.0)
    return {"root": root, "shards": shards, "uri": uri, "base": base}


def study_file(workspace: dict, lrs: list[float]) -> Path:
    return write_study(workspace["root"], workspace["base"], STUDY, "tests", lrs, steps=6)


def mutransfer(*args: str, cwd: Path) -> object:
    return run([str(BIN / "mutransfer"), *args], cwd, timeout=600)


def test_sweep_resume_divergence_and_transfer(workspace) -> None:
    root, uri = workspace["root"], workspace["uri"]
    # first a partial grid, then the full one: the second command runs only what is new
    first = mutransfer("sweep", "--config", str(study_file(workspace, LRS[:2])), "--tracking-uri", uri, cwd=root)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "ran 4, skipped 0" in first.stdout
    second = mutransfer("sweep", "--config", str(study_file(workspace, LRS)), "--tracking-uri", uri, cwd=root)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "ran 2, skipped 4" in second.stdout and "2 diverged" in second.stdout

    client = MlflowClient(uri)
    trials = latest_per_key(load_trials(client, STUDY))
    assert len(trials) == 6 and len({t.key for t in trials}) == 6
    parent = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                filter_string="tags.`mutransfer.role` = 'study'")
    assert len(parent) == 1
    for trial in trials:
        tags = client.get_run(trial.run_id).data.tags
        assert tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert tags["mutransfer.study"] == STUDY and tags["mutransfer.role"] == "proxy"
        assert int(tags["mutransfer.width"]) in (16, 32) and tags["mutransfer.depth"] == "1"
        assert tags["mutransfer.parametrization"] == "mup" and float(tags["mutransfer.momentum"]) == 0.9
        assert float(tags["mutransfer.lr"]) in LRS
        expected = "diverged" if trial.spec.lr == LRS[-1] else "finished"
        assert tags["mutransfer.status"] == expected, trial.key
    # a trial run in a sweep process (after other trials) equals the same trial run on its own
    last = next(t for t in trials if t.spec.width == 32 and t.spec.lr == LRS[1])
    trial_dir = root / "trials" / last.key
    alone = run([str(BIN / "python"), "-m", "mutransfer.train", "--config", str(trial_dir / "config.yaml"),
                 f"run.output_dir={root / 'alone'}", "tracking.enabled=false"], root)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert losses(root / "alone") == pytest.approx(losses(trial_dir), abs=1e-6)

    diverged = [t for t in trials if t.status == "diverged"]
    assert all(len(client.get_metric_history(t.run_id, "train/loss")) < 6 for t in diverged)  # stopped early

    # transfer: the argmin of final/eval_loss over the largest proxy's finished trials, computed here
    largest = [t for t in trials if t.spec.width == 32 and t.status == "finished"]
    best = min(largest, key=lambda t: t.metrics["final/eval_loss"])
    target = write_config(root / "target.yaml", workspace["shards"], root / "target_run", uri,
                          model=dict(PROXY_MODEL, width=64, depth=2, drop_path_rate=0.3),
                          optim=dict(lr=0.5, beta1=0.5, warmup_steps=0),
                          run=dict(steps=4, log_interval=2), deepspeed=dict(zero_stage=1))
    out = root / "transferred.yaml"
    transfer = mutransfer("transfer", "--study", STUDY, "--target", str(target), "--out", str(out),
                          "--tracking-uri", uri, "--from", "largest", "--launch", "--launcher", "inprocess", cwd=root)
    assert transfer.returncode == 0, transfer.stderr[-3000:]
    assert "by rule 'largest'" in transfer.stdout and "deepspeed --num_gpus" in transfer.stdout
    cfg = load_config(out, check=False)
    assert cfg.optim.lr == best.spec.lr and cfg.optim.beta1 == 0.9
    # the proxies' stochastic depth (none) is carried over the target's own, and said so
    assert cfg.model.drop_path_rate == 0.0 and "replaces the target config's 0.3" in transfer.stdout
    target_runs = load_trials(client, STUDY, role="target")
    assert len(target_runs) == 1 and target_runs[0].status == "finished"
    target_tags = client.get_run(target_runs[0].run_id).data.tags
    assert target_tags["mlflow.parentRunId"] == parent[0].info.run_id
    assert float(target_tags["mutransfer.lr"]) == best.spec.lr and target_tags["mutransfer.width"] == "64"
    target_params = client.get_run(target_runs[0].run_id).data.params
    assert target_params["tracking.params.transfer.rule"] == "largest"
    assert float(target_params["tracking.params.transfer.lr"]) == best.spec.lr
    assert math.isfinite(target_runs[0].metrics["final/eval_loss"])
    # the target (and no proxy) logs its final model to MLflow by default
    models = client.search_logged_models([parent[0].info.experiment_id])
    assert [m.source_run_id for m in models] == [target_runs[0].run_id]


def test_transfer_unknown_study_is_a_clear_error(workspace) -> None:
    proc = mutransfer("transfer", "--study", "nope", "--target", str(workspace["base"]), "--tracking-uri",
                      workspace["uri"], cwd=workspace["root"])
    assert proc.returncode == 2
    assert "no study named 'nope'" in proc.stderr


def test_bad_study_config_names_the_key(workspace, tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"study": {"name": "x", "base_config": str(workspace["base"])},
                                   "shapes": {"widths": [16], "depths": [1]}, "grid": {"lr": "fast"}}))
    proc = mutransfer("sweep", "--config", str(bad), "--tracking-uri", workspace["uri"], cwd=tmp_path)
    assert proc.returncode == 2 and "grid.lr" in proc.stderr


def test_the_demo_runs_end_to_end_on_a_small_study(tmp_path: Path) -> None:
    """`mutransfer demo` with the shipped demo study cut to 2 widths x 2 lrs x 1 seed of 5 steps: shards,
    sweep, report, transfer to the study's target (the shipped one cut to width 128 and 20 steps: at width 256
    its training and eval took 34 of the test's 80 s on a slow machine), its training, its loss against the best
    proxy, and the verdict line; `--seeds` makes a study of its own."""
    configs = Path(__file__).resolve().parents[2] / "configs"
    target = yaml.safe_load((configs / "demo_target.yaml").read_text())
    target["model"].update(width=128)
    target["run"].update(steps=20, eval_interval=20, log_interval=10)
    (tmp_path / "target.yaml").write_text(yaml.safe_dump(target))
    study = yaml.safe_load((configs / "demo_study.yaml").read_text())
    study["study"].update(base_config=str(configs / "demo_proxy.yaml"), steps=5, target="target.yaml")
    study["shapes"]["widths"] = [32, 64]
    study["grid"]["lr"] = [2.0 ** -6, 2.0 ** -4]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = mutransfer("demo", "--out", str(tmp_path / "demo"), "--config", str(tmp_path / "study.yaml"),
                        "--tracking-uri", uri, "--seeds", "7", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("[demo] verdict: ")
    assert any(line.startswith("[demo] done in") and "8 trials run" in line for line in lines)
    assert any(line.startswith("[demo] study demo-width-seeds-7: 8 proxy trials") and "seeds [7]" in line for line in lines)
    assert any(line.startswith("[demo] target eval loss ") and "the best depth_mup+fle0.5 proxy's" in line
               for line in lines)
    for name in ("lr_curves.png", "trend.png", "optima.md", "optima.csv"):
        assert (tmp_path / "demo" / "report" / name).is_file(), name
    target = load_config(tmp_path / "demo" / "target" / "target.yaml", check=False)
    assert target.tracking.tags["mutransfer.role"] == "target" and target.tracking.params["transfer.rule"] == "trend"
    assert json.loads((tmp_path / "demo" / "target" / "result.json").read_text())["step"] == 20


def test_a_demo_whose_study_names_a_missing_target_says_so_before_it_runs(tmp_path: Path) -> None:
    configs = Path(__file__).resolve().parents[2] / "configs"
    study = yaml.safe_load((configs / "demo_study.yaml").read_text())
    study["study"].update(base_config=str(configs / "demo_proxy.yaml"), target="no_such_target.yaml")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    result = mutransfer("demo", "--out", str(tmp_path / "demo"), "--config", str(tmp_path / "study.yaml"),
                        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert result.returncode == 2 and "study.target" in result.stderr and "no_such_target.yaml" in result.stderr
    assert not (tmp_path / "demo" / "shards").exists() and not (tmp_path / "mlflow.db").exists()
