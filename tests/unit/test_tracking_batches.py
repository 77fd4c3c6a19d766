"""Metric values held for `tracking.send_interval_s` go to MLflow as one request, in order, and nothing is
held past a flush or the end of the run (a real local sqlite store)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from mutransfer.train.tracking import Tracker


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_held_metrics_go_out_together_at_a_flush_and_at_the_end(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "tests", send_interval_s=3600)
    run_id = tracker.start("batched", {})
    for step in range(1, 6):
        tracker.log_metrics({"train/loss": 1.0 / step, "lr/hidden": 0.1}, step)
    assert tracker.held == 4  # the first point went out at once, the next ones wait
    assert history(uri, run_id, "train/loss") == [(1, 1.0)]
    sent = []
    real_log_batch = tracker.client.log_batch
    tracker.client.log_batch = lambda *args, **kwargs: sent.append(kwargs) or real_log_batch(*args, **kwargs)
    assert tracker.flush()
    assert len(sent) == 1 and len(sent[0]["metrics"]) == 8  # four points of two metrics, one request
    assert history(uri, run_id, "train/loss") == [(step, 1.0 / step) for step in range(1, 6)]
    tracker.log_metrics({"train/loss": 0.1}, 6)
    tracker.set_tags({"note": "a tag sends what is held before it"})
    assert tracker.held == 0 and history(uri, run_id, "train/loss")[-1] == (6, 0.1)
    tracker.log_metrics({"final/eval_loss": 0.5}, 7)
    assert tracker.end("finished")
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.metrics["final/eval_loss"] == 0.5 and run.info.status == "FINISHED"


def test_without_an_interval_every_logging_point_goes_out_at_once(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "tests")
    run_id = tracker.start("unbatched", {})
    for step in range(1, 4):
        tracker.log_metrics({"train/loss": float(step)}, step)
        assert tracker.held == 0
    assert history(uri, run_id, "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    tracker.end("finished")


def test_the_status_goes_out_with_the_held_metrics_as_one_request(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "tests", send_interval_s=3600)
    run_id = tracker.start("ending", {})
    tracker.log_metrics({"train/loss": 1.0}, 1)  # the first point goes out at once
    tracker.log_metrics({"final/eval_loss": 0.5, "final/eval_top1": 0.75}, 2)  # held
    batches, single_tags = [], []
    real_log_batch, real_set_tag = tracker.client.log_batch, tracker.client.set_tag
    tracker.client.log_batch = lambda *args, **kwargs: batches.append(kwargs) or real_log_batch(*args, **kwargs)
    tracker.client.set_tag = lambda *args, **kwargs: single_tags.append(args) or real_set_tag(*args, **kwargs)
    assert tracker.end("finished")
    assert len(batches) == 1 and not single_tags
    assert len(batches[0]["metrics"]) == 2 and [(t.key, t.value) for t in batches[0]["tags"]] == \
        [("mutransfer.status", "finished")]
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.tags["mutransfer.status"] == "finished" and run.info.status == "FINISHED"
    assert run.data.metrics == {"train/loss": 1.0, "final/eval_loss": 0.5, "final/eval_top1": 0.75}


def test_tags_set_together_go_out_as_one_request(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "tests")
    run_id = tracker.start("tagged", {})
    batches = []
    real_log_batch = tracker.client.log_batch
    tracker.client.log_batch = lambda *args, **kwargs: batches.append(kwargs) or real_log_batch(*args, **kwargs)
    tracker.set_tags({"a": "1", "b": 2})
    assert len(batches) == 1 and tracker.held == 0
    assert {k: v for k, v in MlflowClient(uri).get_run(run_id).data.tags.items() if k in "ab"} == {"a": "1", "b": "2"}
    tracker.end("finished")
