"""Trial claims (`study.claims`), which let concurrent sweeps of one study train each trial once: a claim is
held once and released, a claim whose holder is gone is taken over (at once on this host, after its heartbeat
goes stale on another), and racing processes each take a different set. Two real sweeps of one study at once:
tests/integration/test_recovery_and_concurrency.py."""

from __future__ import annotations

import os
import subprocess


def test_a_claim_is_held_once_and_released(tmp_path) -> None:
    from mutransfer.study.claims import TrialClaims

    with TrialClaims(tmp_path) as mine, TrialClaims(tmp_path) as other:
        assert mine.take("t1") and not other.take("t1") and not mine.take("t1")
        mine.release("t1")
        assert other.take("t1")
    assert not list(tmp_path.iterdir())  # every claim released on exit, no drafts left


def test_a_claim_whose_holder_is_gone_is_taken_over(tmp_path) -> None:
    """Same host: a claim of a pid that no longer runs (kill -9) is taken at once; another host's claim only
    once its heartbeat is older than stale_s."""
    import json
    import time

    from mutransfer.study.claims import TrialClaims

    dead = subprocess.Popen(["true"])
    dead.wait()
    with TrialClaims(tmp_path, stale_s=60) as claims:
        (tmp_path / "dead.claim").write_text(json.dumps({"host": claims.holder["host"], "pid": dead.pid}))
        (tmp_path / "remote.claim").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
        (tmp_path / "old.claim").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
        old = time.time() - 61
        os.utime(tmp_path / "old.claim", (old, old))
        assert claims.take("dead") and claims.take("old") and not claims.take("remote")
        assert json.loads((tmp_path / "dead.claim").read_text())["pid"] == os.getpid()


CLAIM_RACE = """
import sys, time
from pathlib import Path
from mutransfer.study.claims import TrialClaims
folder, start = Path(sys.argv[1]), float(sys.argv[2])
with TrialClaims(folder) as claims:
    while time.time() < start:
        pass
    won = [key for key in map(str, range(40)) if claims.take(key)]
    print(",".join(won))
    time.sleep(0.5)  # hold them while the others try
"""


def test_racing_processes_each_take_a_different_set_of_claims(tmp_path) -> None:
    import sys
    import time

    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM_RACE, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    won = [p.communicate(timeout=60)[0].strip() for p in procs]
    keys = [key for line in won for key in line.split(",") if key]
    assert sorted(keys, key=int) == [str(i) for i in range(40)]  # every key once, none twice
