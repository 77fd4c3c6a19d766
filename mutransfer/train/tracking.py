"""MLflow from rank 0, and training that never stops because tracking did.

With no URI in the config and no $MLFLOW_TRACKING_URI, runs go to an embedded local store,
`sqlite:///mlflow.db` in the working directory (artifacts in ./mlruns), with no server. If a server cannot be
reached, the run goes on and says so once.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Fail fast against a dead server instead of retrying for minutes (MLflow's default backoff).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

TAG_PREFIX = "mutransfer."
STATUS_TAG = "mutransfer.status"
MLFLOW_STATUS = {"finished": "FINISHED", "diverged": "FAILED", "failed": "FAILED", "preempted": "KILLED"}
# MLflow 3 shows an experiment as model training (runs table, charts) rather than GenAI (traces) by this tag;
# the value is the UI's ExperimentKind.CUSTOM_MODEL_DEVELOPMENT ("Machine learning").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def resolve_tracking_uri(uri: str | None = None) -> str:
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def server_reachable(uri: str, timeout: float = 3.0) -> bool:
    """True for local stores; for http(s) servers, whether /health answers."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def training_experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created if missing, marked as a model-training experiment.

    An existing experiment without a kind gets ours; one a user already gave a kind keeps it.
    """
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    if not found.tags.get(EXPERIMENT_KIND_TAG):
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return found.experiment_id


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


class Tracker:
    """A thin MLflow client wrapper. Inactive (every call a no-op) off rank 0 or once tracking has failed."""

    def __init__(self, uri: str | None, experiment: str, active: bool = True) -> None:
        self.uri = resolve_tracking_uri(uri)
        self.experiment = experiment
        self.active = active
        self.run_id: str | None = None
        self._client = None
        if active and not server_reachable(self.uri):
            self._disable(f"the MLflow server at {self.uri} cannot be reached")

    def _disable(self, why: str) -> None:
        if self.active:
            print(f"mutransfer: {why}; training goes on without tracking", file=sys.stderr, flush=True)
        self.active = False

    def _call(self, what: str, fn, *args, **kwargs):
        if not self.active:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # tracking must never stop training
            self._disable(f"MLflow {what} failed ({type(err).__name__}: {err})")
            return None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _experiment_id(self) -> str:
        return training_experiment_id(self.client, self.experiment)

    def start(self, run_name: str | None, tags: Mapping[str, str], parent_run_id: str | None = None,
              run_id: str | None = None) -> str | None:
        """Start a new run, or continue `run_id` (a resumed training run keeps its MLflow run)."""
        def _start() -> str:
            if run_id:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            all_tags = dict(tags)
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(self._experiment_id(), run_name=run_name, tags=all_tags)
            return run.info.run_id

        self.run_id = self._call("start_run", _start)
        if self.run_id is None:
            self.active = False
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:  # before `self.client`: an inactive rank must not open the store
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._call("log_params", self.client.log_batch, self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active:  # inactive ranks must not open the store (two ranks migrating one sqlite file race)
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if items:
            self._call("log_metrics", self.client.log_batch, self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.active:  # before `self.client`: an inactive rank must not open the store
            return
        for key, value in tags.items():
            self._call("set_tag", self.client.set_tag, self.run_id, key, str(value))

    def log_artifact(self, path: str | os.PathLike) -> None:
        if not self.active:  # before `self.client`: an inactive rank must not open the store
            return
        self._call("log_artifact", self.client.log_artifact, self.run_id, str(path))

    def end(self, status: str) -> None:
        if not self.active:
            return
        self.set_tags({STATUS_TAG: status})
        self._call("end_run", self.client.set_terminated, self.run_id, MLFLOW_STATUS.get(status, "FINISHED"))
