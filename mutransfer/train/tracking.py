"""MLflow from rank 0, and training that never stops because tracking did.

With no URI in the config and no $MLFLOW_TRACKING_URI, runs go to an embedded local store,
`sqlite:///mlflow.db` in the working directory (artifacts in ./mlruns), with no server. If the server cannot
be reached when the run starts, the run goes on without tracking and says so once.

Once a run has started, a failed request does not end its tracking: the request is held, in order, with
everything after it (a bounded buffer; the oldest metric values go first when it is full), and retried with
exponential backoff while training goes on. At the end of the run the tracker waits a while
(`tracking.wait_at_end_s`) for the server, so that a run whose server came back ends with its final metrics
and status; otherwise it says what was not recorded and where the same numbers are (`metrics.jsonl`).
A resumed run does not record again the steps its MLflow run already holds (the replay after a resume).

Metric values may wait up to `send_interval_s` (tracking.send_interval_s) to go out together, one log_batch per
run instead of one per logging point: on a local sqlite store each request costs ~10 ms, as much as a proxy
trial's whole logging point. Held values go out, in order, before any other request (tags, the end) and
whenever `flush()` is called: trainers call it before each checkpoint, so that MLflow holds every step a
resumed run does not train again.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mutransfer import tags
from mutransfer.errors import UsageError
from mutransfer.tags import RunStatus

from .sqlite_store import prepare_store

log = logging.getLogger(__name__)

# Fail fast against a dead server instead of retrying for minutes (MLflow's default backoff): we retry
# ourselves, without holding up training.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

# MLflow 3 shows an experiment as model training (runs table, charts) rather than GenAI (traces) by this tag;
# the value is the UI's ExperimentKind.CUSTOM_MODEL_DEVELOPMENT ("Machine learning").
MODEL_TRAINING_KIND = "custom_model_development"

RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
END_POLL_S = 2.0  # at the end of a run, how often to try a server that stopped answering
MAX_HELD_VALUES = 200_000  # metric values held while the server is away (a few tens of MB at most)
TRANSIENT_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED")


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


def local_store_path(tracking_uri: str) -> tuple[str, Path]:
    """("sqlite" | "file", path) of a local store; ValueError for anything else (a server, a remote DB)."""
    parsed = urllib.parse.urlparse(tracking_uri)
    if parsed.scheme in ("http", "https"):
        raise UsageError(f"{tracking_uri} is an MLflow server already: open it in a browser instead")
    if parsed.scheme == "sqlite":
        # sqlite:////abs/path.db and sqlite:///rel/path.db (relative to the working directory)
        raw = tracking_uri[len("sqlite:///"):] if tracking_uri.startswith("sqlite:///") else ""
        if not raw or raw == ":memory:":
            raise UsageError(f"{tracking_uri} is not a sqlite file")
        return "sqlite", Path(urllib.parse.unquote(raw)).resolve()
    if parsed.scheme == "file":
        return "file", Path(urllib.parse.unquote(parsed.path)).resolve()
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (or a Windows drive letter)
        return "file", Path(tracking_uri).resolve()
    raise UsageError(f"{tracking_uri} is not a local sqlite or file store")


def store_artifact_root(tracking_uri: str) -> Path:
    """Where a local store's artifacts belong: inside a file store, and beside a sqlite database
    (`<its folder>/mlruns`), whichever directory a run or a server starts in. ValueError for other stores."""
    kind, path = local_store_path(tracking_uri)
    return path if kind == "file" else path.parent / "mlruns"


def artifact_location_beside(tracking_uri: str, experiment: str) -> str | None:
    """For a local sqlite store, `<the database's folder>/mlruns/<experiment>` (MLflow's own default is ./mlruns
    of the directory that happens to create the experiment); None, MLflow's default, for other stores."""
    try:
        kind, _ = local_store_path(tracking_uri)
    except ValueError:
        return None
    if kind != "sqlite":
        return None
    return (store_artifact_root(tracking_uri) / re.sub(r"[^A-Za-z0-9_.-]+", "-", experiment)).as_uri()


def import_mlflow(uri: str | None = None) -> None:
    """Import what a client of the store `uri` uses: MLflow's client, and its SQLAlchemy store for a database
    (1-2 s on 2 CPU cores). An entry point runs this among its lasting imports (`mutransfer.process`)."""
    import mlflow.tracking  # noqa: F401
    from mlflow.store.db.db_types import DATABASE_ENGINES

    # a scheme names its engine, then maybe a driver (postgresql+psycopg2), as MLflow reads it
    if urllib.parse.urlparse(resolve_tracking_uri(uri)).scheme.split("+")[0] in DATABASE_ENGINES:
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def mlflow_client(uri: str | None = None):
    """An MlflowClient of the store; a local sqlite store is made first when new (`sqlite_store.prepare_store`)."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(uri)
    try:
        kind, path = local_store_path(uri)
    except ValueError:
        kind = ""
    if kind == "sqlite":
        prepare_store(uri, path)
    return MlflowClient(tracking_uri=uri)


def training_experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created if missing, marked as a model-training experiment.

    An existing experiment without a kind gets ours; one a user already gave a kind keeps it.
    """
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, artifact_location=artifact_location_beside(client.tracking_uri, name),
                                        tags={tags.EXPERIMENT_KIND: MODEL_TRAINING_KIND})
    if not found.tags.get(tags.EXPERIMENT_KIND):
        client.set_experiment_tag(found.experiment_id, tags.EXPERIMENT_KIND, MODEL_TRAINING_KIND)
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


def transient(err: BaseException) -> bool:
    """Whether a failed request may succeed later (server away, overloaded, a network error), rather than
    being refused for what it asked (a 4xx answer)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return True
    return err.error_code in TRANSIENT_CODES or err.get_http_status_code() >= 500


@dataclass
class _Request:
    what: str
    send: Callable[[], Any] | None = None  # None for metrics and tags: consecutive ones go out as one log_batch
    values: int = 0  # metric values it carries (what the buffer bound counts)
    step: int | None = None
    metrics: list | None = None  # a metrics request's values
    tags: list | None = None  # a tags request's values (sent at once, with the metrics held before them)


class Tracker:
    """A thin MLflow client wrapper. Inactive (every call a no-op) off rank 0, or when the server could not be
    reached at the start. `fallback` names the file that holds the same metrics (for the end message)."""

    def __init__(self, uri: str | None, experiment: str, active: bool = True,
                 fallback: str | os.PathLike | None = None, wait_at_end_s: float = 60.0,
                 send_interval_s: float = 0.0) -> None:
        self.uri = resolve_tracking_uri(uri)
        self.experiment = experiment
        self.active = active
        self.fallback = fallback
        self.wait_at_end_s = wait_at_end_s
        self.send_interval_s = send_interval_s
        self._send_at = 0.0  # when held metric values are due (send_interval_s after the last send)
        self.run_id: str | None = None
        self.experiment_id: str | None = None  # of the run this tracker started
        self._client = None
        self._held: deque[_Request] = deque()
        self._held_values = 0
        self._dropped: list[_Request] = []  # metric requests dropped from a full buffer
        self._refused = 0  # requests the server refused (not retried)
        self._retry_at = 0.0
        self._delay = RETRY_FIRST_S
        self._outage = False
        self._recorded: dict[str, int] = {}  # metric -> last step the MLflow run holds (when resuming)
        if active and not server_reachable(self.uri):
            self._disable(f"the MLflow server at {self.uri} cannot be reached")

    @classmethod
    def for_run(cls, tracking: Any, output_dir: Path, active: bool) -> Tracker:
        """The tracker of one run from its `tracking` config section (metrics.jsonl in `output_dir` as the
        fallback); `active` also needs tracking.enabled."""
        return cls(tracking.uri, tracking.experiment, active=tracking.enabled and active,
                   fallback=output_dir / "metrics.jsonl", wait_at_end_s=tracking.wait_at_end_s,
                   send_interval_s=tracking.send_interval_s)

    def _disable(self, why: str) -> None:
        if self.active:
            log.warning(f"mutransfer: {why}; training goes on without tracking")
        self.active = False

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow_client(self.uri)
        return self._client

    @property
    def held(self) -> int:
        """Requests waiting for the server."""
        return len(self._held)

    # --- sending, holding, retrying ------------------------------------------------------------------------
    def _submit(self, request: _Request) -> None:
        if not self.active or self.run_id is None:
            return
        self._held.append(request)
        self._held_values += request.values
        while self._held_values > MAX_HELD_VALUES:
            oldest = next((r for r in self._held if r.values), None)
            if oldest is None:
                break
            self._held.remove(oldest)
            self._held_values -= oldest.values
            self._dropped.append(oldest)
        if request.metrics is None or time.monotonic() >= self._send_at:
            self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send what is held, oldest first, unless backing off (`force` ignores the backoff). Stops at the
        first transient failure and backs off; True when nothing is held any more."""
        if not self._held:
            return True
        if not force and time.monotonic() < self._retry_at:
            return False
        while self._held:
            requests = self._next_requests()
            try:
                self._send(requests)
            except Exception as err:
                if transient(err):
                    self._back_off(requests[0], err)
                    return False
                self._refused += len(requests)
                log.warning(f"mutransfer: MLflow refused {requests[0].what} ({type(err).__name__}: {err}); dropped")
            for request in requests:
                self._held.popleft()
                self._held_values -= request.values
        self._send_at = time.monotonic() + self.send_interval_s
        if self._outage:
            log.info(f"mutransfer: the MLflow server at {self.uri} is back; everything held is recorded")
        self._outage, self._delay = False, RETRY_FIRST_S
        return True

    def _next_requests(self) -> list[_Request]:
        """The first held request, or the metrics and tags requests in a row from it (one log_batch)."""
        first = self._held[0]
        if first.send is not None:
            return [first]
        return list(itertools.takewhile(lambda request: request.send is None, self._held))

    def _send(self, requests: list[_Request]) -> None:
        if requests[0].send is not None:
            requests[0].send()
        else:
            self.client.log_batch(self.run_id, metrics=[metric for request in requests for metric in request.metrics or ()],
                                  tags=[tag for request in requests for tag in request.tags or ()])

    def _back_off(self, request: _Request, err: Exception) -> None:
        if not self._outage:
            log.warning(f"mutransfer: MLflow {request.what} failed ({type(err).__name__}: {str(err)[:200]}); "
                        f"training goes on, holding what is not recorded and retrying with backoff")
        self._outage = True
        self._retry_at = time.monotonic() + self._delay
        self._delay = min(2 * self._delay, RETRY_MAX_S)

    # --- the run -----------------------------------------------------------------------------------------------
    def _experiment_id(self) -> str:
        return training_experiment_id(self.client, self.experiment)

    def start(self, run_name: str | None, run_tags: Mapping[str, str], parent_run_id: str | None = None,
              run_id: str | None = None, experiment_id: str | None = None) -> str | None:
        """Start a new run, or continue `run_id` (a resumed training run keeps its MLflow run, and does not
        record again the steps it already holds). `experiment_id`: the id of tracking.experiment when the
        caller knows it (a stack's members share it), else looked up (and created) by name."""
        if not self.active:
            return None
        try:
            if run_id:
                self.client.update_run(run_id, status="RUNNING")
                self.client.set_tag(run_id, tags.STATUS, RunStatus.RUNNING)
                self._recorded = {m.key: m.step for m in self.client.get_run(run_id).data.to_proto().metrics}
                self.run_id = run_id
            else:
                all_tags = dict(run_tags)
                if parent_run_id:
                    all_tags["mlflow.parentRunId"] = parent_run_id
                run = self.client.create_run(experiment_id or self._experiment_id(), run_name=run_name, tags=all_tags)
                self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        except Exception as err:
            self._disable(f"MLflow start_run failed ({type(err).__name__}: {err})")
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:  # before `self.client`: an inactive rank must not open the store
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]  # MLflow's client batches and truncates them
        self._submit(_Request("log_params", lambda: self.client.log_batch(self.run_id, params=items)))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active:  # inactive ranks must not open the store (two ranks migrating one sqlite file race)
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and step > self._recorded.get(k, -1)]
        if items:
            self._submit(_Request("log_metrics", values=len(items), step=step, metrics=items))

    def set_tags(self, values: Mapping[str, str]) -> None:
        if not self.active:  # before `self.client`: an inactive rank must not open the store
            return
        from mlflow.entities import RunTag

        items = [RunTag(key, str(value)) for key, value in values.items()]
        self._submit(_Request(f"set_tags {', '.join(values)}", tags=items))

    def log_artifact(self, path: str | os.PathLike) -> None:
        self._submit(_Request("log_artifact", lambda: self.client.log_artifact(self.run_id, str(path))))

    def end(self, status: str) -> bool:
        """Record the run's status and end it. When the server is away, wait up to `wait_at_end_s` for it;
        if it does not come back, say what was not recorded. True when everything was recorded."""
        if not self.active or self.run_id is None:
            return True
        self.set_tags({tags.STATUS: status})
        self._submit(_Request(f"the end of the run ({status})", lambda: self.client.set_terminated(
            self.run_id, RunStatus(status).mlflow)))
        deadline = time.monotonic() + self.wait_at_end_s
        if self._held:
            log.info(f"mutransfer: waiting up to {self.wait_at_end_s:g} s for the MLflow server at {self.uri} to "
                     f"record {len(self._held)} held request(s)")
        while self._held and time.monotonic() < deadline:  # nothing else to do now: poll at a short interval
            time.sleep(max(0.0, min(END_POLL_S, deadline - time.monotonic())))
            self.flush(force=True)
        if self._held or self._dropped:
            self._report_unrecorded(status)
        return not (self._held or self._dropped)

    def _report_unrecorded(self, status: str) -> None:
        lost = [*self._dropped, *self._held]
        values = sum(r.values for r in lost)
        steps = [r.step for r in lost if r.step is not None]
        span = f" (steps {min(steps)}-{max(steps)})" if steps else ""
        others = sorted({r.what for r in lost if not r.values})
        where = f"; the same numbers are in {self.fallback}" if self.fallback else ""
        log.warning(f"mutransfer: the MLflow server at {self.uri} did not record all of run {self.run_id}: "
                    f"{values} metric value(s){span}" + (f", {', '.join(others)}" if others else "")
                    + f" are missing there, and it may still show the run as RUNNING although it ended {status}{where}")
