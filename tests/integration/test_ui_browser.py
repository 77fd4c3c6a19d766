"""`mutransfer ui` as a user sees it: a real study, a real `mlflow server`, the printed URLs in headless Chromium.

Skips (and says why) without Chromium; `make test` installs Debian's `chromium` package when apt-get is there.
Set MUTRANSFER_SCREENSHOTS=DIR to keep the screenshots (docs/ui_*.png come from there).
"""

from __future__ import annotations

import html
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_ui import EXIT_WAIT_S, MUTRANSFER, descendants, kill_all, read_lines, wait_for_line
from train_helpers import BIN, run, run_env, write_proxy_config, write_study

from mutransfer.netutil import free_port
from mutransfer.study.store import latest_per_key, load_trials

STUDY = "browser"
LRS = [1e-3, 1e-2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not found: `make browser` (or `apt-get install chromium`) "
                             "installs Debian's chromium package")]
RENDER_TRIES = 3  # a page still loading on a busy machine gets a longer virtual-time budget next time


@pytest.fixture(scope="module")
def study(tmp_path_factory, shard_set) -> dict:
    """A real proxy study: 2 widths x 2 learning rates of tiny mup ViTs, 4 steps each, in a sqlite store."""
    root = tmp_path_factory.mktemp("browser")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    base = write_proxy_config(root, shard_set(256, 64), uri, steps=4)
    config = write_study(root, base, STUDY, "browser", LRS, steps=4)
    proc = run([str(BIN / "mutransfer"), "sweep", "--config", str(config), "--tracking-uri", uri], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = latest_per_key(load_trials(MlflowClient(uri), STUDY))
    assert len(trials) == 4 and all(t.status == "finished" for t in trials)
    return {"root": root, "uri": uri, "trials": trials}


def page_text(dom: str) -> str:
    """The text a reader sees: tags, scripts and styles gone, whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def chromium(url: str, profile: Path, budget_ms: int, *mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={profile}", "--window-size=1600,1000", "--hide-scrollbars",
                           f"--virtual-time-budget={budget_ms}", *mode, url],
                          capture_output=True, text=True, timeout=300)


def render(url: str, screenshot: Path, wanted: list[str]) -> str:
    """The page's text once every `wanted` string is in it (retried with more time), and its screenshot."""
    text = ""
    for attempt in range(1, RENDER_TRIES + 1):
        budget = 15000 * attempt
        dom = chromium(url, screenshot.parent / "profile", budget, "--dump-dom")
        text = page_text(dom.stdout)
        if all(w in text for w in wanted):
            shot = chromium(url, screenshot.parent / "profile", budget, f"--screenshot={screenshot}")
            assert screenshot.is_file() and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
            return text
    missing = [w for w in wanted if w not in text]
    raise AssertionError(f"{url} never showed {missing}; it rendered: {text[:3000]}")


def printed_urls(uri: str, cwd: Path) -> tuple[subprocess.Popen, str, str]:
    """Start `mutransfer ui --study`, return it and the two URLs it prints."""
    cli = subprocess.Popen([str(MUTRANSFER), "ui", "--study", STUDY, "--tracking-uri", uri, "--port",
                            str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                           cwd=cwd, env=run_env(), start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(cli.stdout, lines), daemon=True).start()
    seen: list[str] = []
    runs_url = wait_for_line(lines, f"study {STUDY}: ", seen).split(": ", 1)[1]
    compare_url = wait_for_line(lines, "compare proxies: ", seen).split(": ", 1)[1]
    return cli, runs_url, compare_url


def test_the_printed_urls_show_the_study_in_a_browser(study: dict, tmp_path: Path) -> None:
    cli, runs_url, compare_url = printed_urls(study["uri"], study["root"])
    started = descendants(cli.pid)
    try:
        by_loss = sorted(study["trials"], key=lambda t: t.metrics["final/eval_loss"])
        names = [t.key for t in by_loss]  # the run names, which carry width and lr
        # runs view: the model-training pages (not GenAI's overview), the four trials, best final loss first
        text = render(runs_url, tmp_path / "ui_runs.png", ["4 matching runs", *names])
        assert "Sort: final/eval_loss" in text and "Model training" in text
        assert "Traces 0" not in text and "Token Usage" not in text
        assert [text.index(name) for name in names] == sorted(text.index(name) for name in names)
        # compare view: every proxy's lr, momentum, width, depth and parametrization beside its final metrics,
        # one column per proxy, ordered by width and then learning rate
        columns = sorted(study["trials"], key=lambda t: (t.spec.width, t.spec.lr))
        rows = {"optim.lr": [f"{t.spec.lr:g}" for t in columns], "optim.beta1": ["0.9"] * 4,
                "model.width": [str(t.spec.width) for t in columns], "model.depth": ["1"] * 4,
                "parametrization": ["mup"] * 4}
        wanted = [" ".join([name, *values]) for name, values in rows.items()]
        text = render(compare_url, tmp_path / "ui_compare.png",
                      ["Comparing 4 Runs from 1 Experiment", *wanted, "Metrics Show diff only"])
        metrics = text[text.index("Metrics Show diff only"):]
        assert "final/eval_loss" in metrics and "final/train_loss" in metrics
        for trial in columns:  # the UI rounds to 3 decimals
            shown = f"{trial.metrics['final/eval_loss']:.3f}".rstrip("0").rstrip(".")
            assert f" {shown} " in metrics, (shown, metrics[:1500])
        keep = os.environ.get("MUTRANSFER_SCREENSHOTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            for png in tmp_path.glob("ui_*.png"):
                shutil.copy(png, Path(keep) / png.name)
    finally:
        os.kill(cli.pid, signal.SIGINT)
        assert cli.wait(timeout=EXIT_WAIT_S) == 0
        kill_all(started)  # a no-op when mutransfer ui stopped its server, as it must
