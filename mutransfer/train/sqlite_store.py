"""Making a local sqlite MLflow store: once per process, under a lock on its folder, as a copy of an empty one.

Processes that create one store at once race in MLflow's schema setup ("duplicate column name: step"), and
one of them fails or trains untracked: a store is made under an exclusive lock on its folder.

MLflow sets up a new sqlite store by creating its tables and running every schema migration since its first
release: about 2 s on 2 CPU cores, paid by every new store (each demo, each study written to a new database
file, each test). The first new store on a machine under one MLflow version is built by MLflow itself in
the cache folder and kept as that version's template, without its one row that depends on where it was made
(the Default experiment, whose artifact location is the working directory's `mlruns`). Every later new
store is a copy of the template; MLflow opens it, finds its schema current, and adds the Default experiment
as it does for any new store. A template that MLflow does not accept (another version's, a damaged file) is
dropped and the store is made by MLflow as before: the template only ever saves time.

The cache folder is $MUTRANSFER_CACHE_DIR, else $XDG_CACHE_HOME/mutransfer, else ~/.cache/mutransfer;
MUTRANSFER_STORE_TEMPLATE=0 turns the template off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

from mutransfer.folder_lock import folder_lock

log = logging.getLogger(__name__)

_PREPARED_STORES: set[str] = set()


def prepare_store(uri: str, path: Path) -> None:
    """Make sure the sqlite store `uri` (the database `path`) exists with its schema: made here when new (a
    copy of the template when one can be used), checked by MLflow when not; once per process."""
    if uri in _PREPARED_STORES:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path.parent):
        seeded = not path.exists() and template_enabled() and seed_store(uri, path)
        if not seeded:
            open_store(uri)
    _PREPARED_STORES.add(uri)


def open_store(uri: str) -> None:
    """Open the store at `uri`: MLflow creates its database and tables, or checks them, before this returns."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def cache_dir() -> Path:
    if os.environ.get("MUTRANSFER_CACHE_DIR"):
        return Path(os.environ["MUTRANSFER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mutransfer"


def template_path() -> Path:
    """This MLflow version's template (a new version's schema differs, so it gets its own)."""
    import mlflow

    return cache_dir() / f"mlflow-{mlflow.__version__}-empty-store.db"


def template_enabled() -> bool:
    return os.environ.get("MUTRANSFER_STORE_TEMPLATE", "1") != "0"


def build_template() -> Path:
    """Have MLflow make a new store in the cache folder, take its Default experiment out, and put it in place
    as the template (atomically: a reader sees the whole file or none)."""
    target = template_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".template-") as work:
        database = Path(work) / "store.db"
        open_store(f"sqlite:///{database}")
        forget_engine(f"sqlite:///{database}")
        with sqlite3.connect(database) as connection:
            connection.execute("DELETE FROM experiments")  # the Default experiment: made where it was built
        connection.close()
        os.replace(database, target)
    return target


def seed_store(uri: str, path: Path) -> bool:
    """Make the new store `uri` (its database `path`, not there yet) a copy of the template, building the
    template first when there is none; then open it. True when the store is the template's copy;
    False when it is left to MLflow: no template could be made or used (the reason is logged), or the
    database appeared meanwhile (it is then left as it is), or a journal of an earlier database at that path
    is still there."""
    leftovers = [path.with_name(path.name + suffix) for suffix in ("-journal", "-wal", "-shm")]
    if any(leftover.exists() for leftover in leftovers):  # sqlite would replay a dead database's journal into
        return False                                      # the copy; into an empty file it replays nothing
    try:
        template = template_path()
        if not template.exists():
            build_template()
        copy = path.with_name(f".{path.name}.{os.getpid()}.seed")
        try:
            shutil.copyfile(template, copy)
            os.link(copy, path)  # fails if the database appeared meanwhile: a store is never overwritten
        finally:
            copy.unlink(missing_ok=True)
    except Exception as err:  # no cache folder, a full disk, another process's store: MLflow makes it
        log.debug("no store template for %s: %s", path, err)
        return False
    try:
        open_store(uri)
    except Exception as err:  # a template MLflow does not accept: remove both, MLflow makes the store
        log.info("the MLflow store template %s was not accepted (%s); MLflow sets up the store instead", template, err)
        forget_engine(uri)
        for made in (path, template):
            with contextlib.suppress(OSError):  # a template in a folder this user cannot write stays
                made.unlink(missing_ok=True)
        return False
    return True


def forget_engine(uri: str) -> None:
    """Close and drop the database engine MLflow keeps for `uri` (one per URI, for the process's life), so
    that the file can go and a new one be made at the same path."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)
    if engine is not None:
        engine.dispose()
