"""A tiny study over four axes (2 widths x 2 global batches x 2 lengths at depth 1, 2 learning rates) swept,
reported and transferred on CPU in this process: the whole workflow with batch and length as axes."""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

import pytest
import yaml
from train_helpers import write_proxy_config

from mutransfer.cli import main
from mutransfer.train.config import load_config


def _run(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    return code, out.getvalue()


@pytest.mark.slow  # 16 tiny trials in process
def test_a_four_axis_study_sweeps_reports_and_transfers(shard_set, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = write_proxy_config(tmp_path, shard_set(256, 32), uri, steps=4)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "study": {"name": "axes", "experiment": "tests", "base_config": str(base), "output_dir": str(tmp_path / "t")},
        "shapes": {"variants": ["mup"], "widths": [16, 32], "depths": [1], "batch_sizes": [8, 16],
                   "samples": [32, 64]},
        "grid": {"lr": [2.0**-8, 2.0**-6], "momentum": [0.9]},
    }))
    code, printed = _run(["sweep", "--config", str(study), "--tracking-uri", uri])
    assert code == 0 and "16 finished" in printed, printed
    code, printed = _run(["report", "--study", "axes", "--tracking-uri", uri, "--out", str(tmp_path / "report")])
    assert code == 0, printed
    with (tmp_path / "report" / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["batch_size"], r["steps"]) for r in rows} == {("8", "4"), ("8", "8"), ("16", "2"), ("16", "4")}
    assert {r["axis"] for r in csv.DictReader((tmp_path / "report" / "trends.csv").open())} <= {
        "width", "batch", "length"}
    target = tmp_path / "target.yaml"
    target.write_text(base.read_text())
    code, printed = _run(["transfer", "--study", "axes", "--target", str(target), "--tracking-uri", uri,
                          "--ranks", "1", "--out", str(tmp_path / "target_out.yaml"),
                          "model.width=64", "data.batch_size=32", "run.steps=16"])
    assert code == 0, printed
    for axis in ("width", "batch", "length"):
        assert f"  {axis}: " in printed, printed  # each axis's contribution
    assert "held-out check" in printed and "weight decay" in printed
    written = load_config(str(tmp_path / "target_out.yaml"), check=False)
    assert written.tracking.params["transfer.target_batch"] == "32"
    assert written.tracking.params["transfer.target_length"] == "512"  # 16 steps x 32 samples
