"""Where the package's messages go: the `mutransfer` logger hierarchy, set up once by each command-line edge
(`mutransfer.cli.main`, `python -m mutransfer.train`).

Every module logs to `logging.getLogger(__name__)`; `configure_logging` sends that hierarchy to stderr as
plain lines (the message only: each one says what it is about), written around any tqdm bar rather than
through it, so a sweep's console holds its progress bar and our own lines. Other libraries stay quiet below
WARNING there: MLflow says at INFO, for every run, things like "Skip logging GPU metrics"
(MLFLOW_LOGGING_LEVEL=INFO brings them back). What a command prints as its result (tables, paths) goes to
stdout with print, not here.

A leaf module: it imports nothing of ours.
"""

from __future__ import annotations

import logging
import os
import sys

PACKAGE_LOGGER = "mutransfer"


class LineHandler(logging.Handler):
    """One plain line per record on the current sys.stderr (looked up at each record, so a redirected or
    captured stderr gets it), through tqdm.write so that a live bar is redrawn below it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> None:
    """The `mutransfer` loggers at `level` on stderr, and MLflow at WARNING; calling it again changes nothing
    but the level. It leaves propagation on, so pytest's caplog and an application's own root handlers still
    see the records."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.setLevel(level)
    if not any(isinstance(h, LineHandler) for h in logger.handlers):
        handler = LineHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    # MLflow sets its loggers' level from this variable when it is imported (later, lazily, and in trial
    # processes this one starts); if it is imported already, its logger is set here
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
