"""Claims on trials: a sweep trains a trial only while it holds the trial's claim, so that any number of
sweeps of one study (two terminals, a job array relaunched over a running one, array tasks that overlap)
train each trial once and never write one trial folder or MLflow run together.

A claim is the file `<study output_dir>/claims/<trial key>.claim`, written in full under a name of its own
and then hard-linked to its name: the link succeeds for exactly one process, on local and on network
filesystems alike (the classic NFS lock). It names its holder (host, pid).
The holder touches it every `heartbeat_s` while it holds it and removes it when the trial ends. A claim is
stale, and is taken over, when its holder is gone: on the same host, its pid no longer runs (a sweep killed
with kill -9 is taken over at once); from another host, its heartbeat stopped `stale_s` ago. Taking over
is itself claimed (`<claim>.takeover`), so that of several takers one replaces the stale claim.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

HEARTBEAT_S = 10.0
STALE_S = 120.0  # a claim from another host whose heartbeat stopped this long ago is taken over


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class TrialClaims:
    """The claims this process holds in one study's claims folder; a context manager whose exit releases
    every claim still held and stops the heartbeat."""

    def __init__(self, folder: Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> None:
        self.folder = Path(folder)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.holder = {"host": socket.gethostname(), "pid": os.getpid()}

    def __enter__(self) -> TrialClaims:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._beat = threading.Thread(target=self._heartbeat, name="mutransfer-claims", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        for key in list(self.held):
            self.release(key)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.claim"

    def take(self, key: str) -> bool:
        """Claim the trial; False when another live sweep holds it (or is taking it over right now)."""
        path = self.path(key)
        if self._create(path):
            return self._hold(key)
        if not self._stale(path):
            return False
        # taking over: one taker at a time holds `<claim>.takeover`, checks again that the claim is stale
        # (another taker may have just replaced it), and replaces it
        guard = path.with_name(path.name + ".takeover")
        if not self._create(guard):
            if self._stale(guard):  # a taker died within those few lines: clear its guard for next time
                guard.unlink(missing_ok=True)
            return False
        try:
            if not self._stale(path):
                return False
            path.unlink(missing_ok=True)
            return self._create(path) and self._hold(key)
        finally:
            guard.unlink(missing_ok=True)

    def release(self, key: str) -> None:
        with self._lock:
            if key in self.held:
                self.held.discard(key)
                self.path(key).unlink(missing_ok=True)

    def _hold(self, key: str) -> bool:
        with self._lock:
            self.held.add(key)
        return True

    def _create(self, path: Path) -> bool:
        """Write the claim in full under a name of its own, then link it to the claim's name: the link
        fails when the name exists, so a claim is never seen half written."""
        draft = path.with_name(f"{path.name}.draft-{uuid.uuid4().hex[:8]}")
        draft.write_text(json.dumps({**self.holder, "since": time.time()}))
        try:
            os.link(draft, path)
        except FileExistsError:
            return False
        finally:
            draft.unlink()
        return True

    def _stale(self, path: Path) -> bool:
        try:
            holder = json.loads(path.read_text())
            beat = path.stat().st_mtime
        except FileNotFoundError:
            return False  # released meanwhile: not ours to take over; the next sweep run finds it free
        except (OSError, ValueError):
            holder, beat = {}, 0.0  # unreadable: written by something else; treat its writer as gone
        if holder.get("host") == self.holder["host"] and isinstance(holder.get("pid"), int):
            return not _process_alive(holder["pid"])
        return time.time() - beat > self.stale_s

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                held = list(self.held)
            for key in held:
                try:
                    os.utime(self.path(key))
                except OSError:
                    pass  # a brief filesystem hiccup; a claim is only stale after stale_s without a beat
