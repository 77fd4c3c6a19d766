"""A new local sqlite store is a copy of this MLflow version's empty store (`train/sqlite_store.py`): the
same schema and the same Default experiment as a store MLflow makes, existing stores left alone, and a
template MLflow refuses or a cache folder that cannot be written changes nothing but the time it takes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mutransfer.train import sqlite_store
from mutransfer.train.tracking import mlflow_client


def schema(path: Path) -> tuple[dict[str, frozenset[str]], list[tuple[str]]]:
    """Each table's and index's definition (its lines as a set: MLflow's own migrations write a table's
    constraints in a different order from one run to the next) and the schema revision."""
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT name, sql FROM sqlite_master").fetchall()
        version = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    connection.close()
    return {name: frozenset(line.strip().rstrip(",") for line in (sql or "").splitlines()) for name, sql in rows}, version


def default_experiment(client: MlflowClient) -> tuple[str, str]:
    found = client.get_experiment("0")
    return found.name, found.artifact_location


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("MUTRANSFER_CACHE_DIR", str(folder))
    monkeypatch.chdir(tmp_path)  # MLflow puts the Default experiment's artifacts under ./mlruns
    return folder


def test_new_stores_copy_the_template_and_match_mlflows_own(cache: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    first = mlflow_client(f"sqlite:///{tmp_path / 'first.db'}")
    template = sqlite_store.template_path()
    assert template.parent == cache and template.exists()
    built = template.stat().st_mtime_ns
    assert sqlite_store.seed_store(f"sqlite:///{tmp_path / 'second.db'}", tmp_path / "second.db")
    second = mlflow_client(f"sqlite:///{tmp_path / 'second.db'}")
    assert template.stat().st_mtime_ns == built  # the second store was a copy: the template was not built again
    monkeypatch.setenv("MUTRANSFER_STORE_TEMPLATE", "0")
    by_mlflow = mlflow_client(f"sqlite:///{tmp_path / 'by_mlflow.db'}")
    assert schema(tmp_path / "first.db") == schema(tmp_path / "second.db") == schema(tmp_path / "by_mlflow.db")
    assert default_experiment(first) == default_experiment(second) == default_experiment(by_mlflow) == \
        ("Default", str(tmp_path / "mlruns" / "0"))
    experiment = second.create_experiment("trials")
    run = second.create_run(experiment).info.run_id
    second.log_metric(run, "loss", 0.5)
    assert second.get_run(run).data.metrics == {"loss": 0.5}


def test_an_existing_store_is_opened_never_replaced(cache: Path, tmp_path: Path) -> None:
    store = tmp_path / "kept.db"
    client = MlflowClient(f"sqlite:///{store}")  # made by MLflow, before any template exists
    run = client.create_run(client.create_experiment("kept")).info.run_id
    assert not sqlite_store.seed_store(f"sqlite:///{store}", store)  # a store that is there is no seed's target
    found = mlflow_client(f"sqlite:///{store}").get_run(run)
    assert found.info.run_id == run


def test_a_refused_template_is_dropped_and_mlflow_makes_the_store(cache: Path, tmp_path: Path) -> None:
    mlflow_client(f"sqlite:///{tmp_path / 'first.db'}")
    template = sqlite_store.template_path()
    with sqlite3.connect(template) as connection:  # as if another MLflow version had made it
        connection.execute("UPDATE alembic_version SET version_num = 'not-a-revision'")
    connection.close()
    client = mlflow_client(f"sqlite:///{tmp_path / 'second.db'}")
    assert default_experiment(client)[0] == "Default"
    assert schema(tmp_path / "second.db") == schema(tmp_path / "first.db")
    assert not template.exists()  # the next new store builds it again
    assert not list(tmp_path.glob(".*.seed"))


def test_an_unwritable_cache_folder_leaves_the_store_to_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MUTRANSFER_CACHE_DIR", str(blocker / "cache"))
    client = mlflow_client(f"sqlite:///{tmp_path / 'store.db'}")
    assert default_experiment(client)[0] == "Default"
    assert not list(tmp_path.glob(".*.seed"))


def test_a_journal_left_at_the_path_leaves_the_store_to_mlflow(cache: Path, tmp_path: Path) -> None:
    """sqlite replays a journal it finds beside a database that is not empty: a copy would take in pages of the
    dead database the journal belonged to, where MLflow's empty new file takes none."""
    store = tmp_path / "store.db"
    journal = tmp_path / "store.db-journal"
    journal.write_bytes(b"journal of a database that is gone")
    assert not sqlite_store.seed_store(f"sqlite:///{store}", store)
    assert not store.exists()
    client = mlflow_client(f"sqlite:///{store}")
    assert default_experiment(client)[0] == "Default"
