"""MLflow beyond metrics, against real stores: experiment kind, the final model as an MLflow model (registered,
loaded back), and system metrics, from real training runs (a 2-rank ZeRO-3 DeepSpeed job among them)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from train_helpers import python_command, result, run, run_ranks, write_config

from mutransfer.cli import main
from mutransfer.models import load_model
from mutransfer.tags import EXPERIMENT_KIND as EXPERIMENT_KIND_TAG
from mutransfer.train.config import ConfigError, RunConfig, config_from_dict
from mutransfer.train.mlflow_model import wants_model
from mutransfer.train.tracking import MODEL_TRAINING_KIND, Tracker

pytestmark = pytest.mark.slow  # integration: real processes, engines or servers (make test-fast skips)

SYSTEM_METRICS = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes")


@pytest.fixture(scope="module")
def shards(shard_set) -> Path:
    return shard_set(256, 32, train_per_shard=64)


def test_experiments_are_marked_as_model_training(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    unmarked = client.create_experiment("made-elsewhere")
    chosen = client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("new", "made-elsewhere", "genai"):
        tracker = Tracker(uri, name)
        assert tracker.start("r", {}) is not None
        tracker.end("finished")
    kinds = {e.name: e.tags.get(EXPERIMENT_KIND_TAG) for e in client.search_experiments()}
    assert kinds["new"] == MODEL_TRAINING_KIND
    assert kinds["made-elsewhere"] == MODEL_TRAINING_KIND  # an experiment without a kind that we log into
    assert kinds["genai"] == "genai_development"  # a kind someone chose stays
    assert client.get_experiment(unmarked).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def config(**tracking) -> RunConfig:
    return config_from_dict({"run": {"steps": 1}, "tracking": tracking})


def test_which_runs_log_their_model() -> None:
    assert not wants_model(config())
    assert wants_model(config(tags={"mutransfer.role": "target"}))
    assert not wants_model(config(tags={"mutransfer.role": "proxy"}))
    assert wants_model(config(log_model=True))
    assert not wants_model(config(log_model=False, tags={"mutransfer.role": "target"}))
    assert wants_model(config(registered_model_name="vit"))
    assert not wants_model(config(log_model=True, enabled=False))
    with pytest.raises(ConfigError, match="tracking.registered_model_name"):
        config(log_model=False, registered_model_name="vit")


def test_zero3_run_logs_a_registered_model_and_system_metrics(shards: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for models:/ URIs in this process (run() drops it)
    out = tmp_path / "zero3"
    cfg = write_config(tmp_path / "run.yaml", shards, out, uri, deepspeed=dict(zero_stage=3),
                       run=dict(steps=4, log_interval=2), tracking=dict(uri=uri, experiment="eco",
                                                                        registered_model_name="tiny-vit"))
    proc = run_ranks(python_command(cfg), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "registered as tiny-vit" in proc.stderr
    client = MlflowClient(uri)
    run_id = result(out)["mlflow_run_id"]
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.data.tags["mutransfer.status"] == "finished"

    # system metrics at the log interval, at the training steps
    for key in SYSTEM_METRICS:
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == [2, 4], key
    assert all(m.value > 0 for m in client.get_metric_history(run_id, SYSTEM_METRICS[1]))

    # the registered model: version 1, from this run, with a signature and an input example
    version = client.get_model_version("tiny-vit", "1")
    assert version.run_id == run_id
    info = mlflow.models.get_model_info("models:/tiny-vit/1")
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 3, 32, 32)
    assert info.saved_input_example_info is not None

    # loaded back, it is the checkpoint's model (ZeRO-3 partitions gathered), with a free batch dimension
    loaded = mlflow.pytorch.load_model("models:/tiny-vit/1")
    assert main(["export", str(out), str(tmp_path / "final.safetensors")]) == 0
    reference = load_model(str(tmp_path / "final.safetensors")).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(images) - reference(images)).abs().max().item() < 1e-5
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")  # the run's own link to it works too
    assert np.allclose(pyfunc.predict(images.numpy()), reference(images).detach().numpy(), atol=1e-5)


def test_switches_off_system_metrics_and_logs_no_model_by_default(shards: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "plain"
    cfg = write_config(tmp_path / "run.yaml", shards, out, uri, deepspeed=dict(zero_stage=0),
                       run=dict(steps=2, log_interval=1, save_checkpoints=False))
    proc = run(python_command(cfg, "tracking.system_metrics=false"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = result(out)["mlflow_run_id"]
    client = MlflowClient(uri)
    metrics = client.get_run(run_id).data.metrics
    assert "train/loss" in metrics and not [k for k in metrics if k.startswith("system/")]
    experiment = client.get_run(run_id).info.experiment_id
    assert client.search_logged_models([experiment]) == []
    assert client.search_registered_models() == []
