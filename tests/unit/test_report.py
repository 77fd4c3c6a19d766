"""`mutransfer report` over a small study logged straight into a real sqlite MLflow store."""

from __future__ import annotations

import contextlib
import csv
import io
import math
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from mutransfer.cli import main
from mutransfer.study.trial import TrialSpec

STUDY = "report-study"
LOG2_LRS = list(range(-11, -3))  # lr = 2**-11 .. 2**-4, one grid step = x2
SEEDS = (0, 1)
# Planted: mup's optimum falls 0.5 log2 per depth doubling (it drifts); depth_mup's stays at -6.3 (it transfers).
# (parametrization, width, depth) -> (log2 lr of the optimum, momentum of the optimum, momenta tried)
SHAPES: dict[tuple[str, int, int], tuple[float, float, tuple[float, ...]]] = {
    ("mup", 64, 2): (-6.3, 0.8, (0.8, 0.9)),
    ("mup", 64, 4): (-6.8, 0.9, (0.9,)),
    ("mup", 64, 8): (-7.3, 0.9, (0.9,)),
    ("mup", 64, 16): (-7.8, 0.9, (0.9,)),
    ("depth_mup", 64, 2): (-6.3, 0.9, (0.8, 0.9)),
    ("depth_mup", 64, 4): (-6.3, 0.9, (0.9,)),
    ("depth_mup", 64, 8): (-6.3, 0.9, (0.9,)),
    ("depth_mup", 64, 16): (-6.3, 0.9, (0.9,)),
}
# This trial reports the lowest loss of the study but diverged: it must never be an optimum.
DIVERGED = (("mup", 64, 4), -4, 0.9)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def loss(shape: tuple[str, int, int], log2_lr: int, momentum: float, seed: int = 0) -> float:
    """A parabola in log2 lr around the planted optimum, lower for deeper proxies; seeds differ a little."""
    best_log2_lr, best_momentum, _ = SHAPES[shape]
    return (1.2 - 0.05 * math.log2(shape[2]) + 0.15 * (log2_lr - best_log2_lr) ** 2
            + 3.0 * (momentum - best_momentum) ** 2 + 0.002 * seed * (log2_lr + 7))


def build_study(tracking_uri: str) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.create_experiment("report-test")
    parent = client.create_run(experiment, run_name=STUDY,
                               tags={"mutransfer.study": STUDY, "mutransfer.role": "study"})
    for shape, (_, _, momenta) in SHAPES.items():
        for log2_lr in LOG2_LRS:
            for momentum in momenta:
                for seed in SEEDS:
                    log_trial(client, experiment, parent.info.run_id, shape, log2_lr, momentum, seed)
    client.set_terminated(parent.info.run_id)
    return client, parent.info.run_id


def log_trial(client: MlflowClient, experiment: str, parent_id: str, shape: tuple[str, int, int], log2_lr: int,
              momentum: float, seed: int) -> None:
    param, width, depth = shape
    diverged = (shape, log2_lr, momentum) == DIVERGED
    key = f"{param}-w{width}-d{depth}-lr{log2_lr}-m{momentum}-s{seed}"
    run = client.create_run(experiment, run_name=key, tags={
        "mlflow.parentRunId": parent_id, "mutransfer.study": STUDY,
        "mutransfer.trial_key": key, "mutransfer.role": "proxy",
        **TrialSpec(param, width, depth, 64, 100, 2.0 ** log2_lr, momentum, 0.0, seed).identity_tags(),
        "mutransfer.status": "diverged" if diverged else "finished",
    })
    value = 0.01 if diverged else loss(shape, log2_lr, momentum, seed)
    client.log_batch(run.info.run_id, metrics=[Metric("final/eval_loss", value, 0, 100)],
                     params=[Param("data.num_classes", "10")])
    client.set_terminated(run.info.run_id, "FAILED" if diverged else "FINISHED")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the local client writes artifacts under ./mlruns
        client, parent_id = build_study(uri)
        out = root / "out"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = main(["report", "--study", STUDY, "--out", str(out), "--tracking-uri", uri])
    assert code == 0
    return {"client": client, "parent": parent_id, "out": out, "printed": printed.getvalue(), "uri": uri}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_optima_csv_has_the_fitted_optimum_and_the_grid_argmin_of_every_shape(report) -> None:
    rows = {(r["variant"], int(r["width"]), int(r["depth"])): r
            for r in read_csv(report["out"] / "optima.csv")}
    assert set(rows) == set(SHAPES)
    for shape, (best_log2_lr, best_momentum, _) in SHAPES.items():
        row = rows[shape]
        assert float(row["log2_lr"]) == round(best_log2_lr), shape  # the grid argmin
        assert float(row["fitted_log2_lr"]) == pytest.approx(best_log2_lr, abs=0.02), shape
        assert float(row["log2_lr_spread"]) < 0.05 and row["seeds"] == "2" and row["edge"] == ""
        assert float(row["momentum"]) == best_momentum, shape
    diverged_shape = DIVERGED[0]
    assert float(rows[diverged_shape]["lr"]) != 2.0 ** DIVERGED[1]


def test_report_flags_the_planted_drift_and_passes_the_flat_parametrization(report) -> None:
    text = (report["out"] / "optima.md").read_text()
    verdict = {line.split("**")[1].split(":")[0]: line for line in text.splitlines() if line.startswith("- **")}
    assert "drifts (depth -0.50 log2 per doubling)" in verdict["mup"]
    assert "depth_mup: transfers" in verdict["depth_mup"]
    trends = {(r["variant"], r["axis"]): r for r in read_csv(report["out"] / "trends.csv")}
    assert float(trends[("mup", "depth")]["slope_per_doubling"]) == pytest.approx(-0.5, abs=0.02)
    assert trends[("mup", "depth")]["outcome"] == "drifts" and trends[("depth_mup", "depth")]["outcome"] == "holds"
    assert trends[("mup", "depth")]["bigger_is_better"] == "True"
    assert "mup: drifts" in report["printed"] and "depth_mup: transfers" in report["printed"]


def test_parent_run_carries_the_fitted_numbers(report) -> None:
    metrics = report["client"].get_run(report["parent"]).data.metrics
    assert metrics["trend/mup/depth_slope"] == pytest.approx(-0.5, abs=0.02)
    assert metrics["trend/depth_mup/depth_holds"] == 1.0 and metrics["trend/mup/depth_holds"] == 0.0
    assert metrics["optimum/mup/w64_d16/log2_lr"] == pytest.approx(-7.8, abs=0.02)
    assert metrics["optimum/mup/w64_d16/on_edge"] == 0.0


def test_trials_csv_lists_every_trial_with_its_status(report) -> None:
    rows = read_csv(report["out"] / "trials.csv")
    assert len(rows) == sum(len(LOG2_LRS) * len(momenta) * len(SEEDS) for _, _, momenta in SHAPES.values())
    diverged = [r for r in rows if r["status"] != "finished"]
    assert len(diverged) == len(SEEDS)
    row = diverged[0]
    assert (row["variant"], int(row["width"]), int(row["depth"])) == DIVERGED[0]
    assert row["status"] == "diverged" and math.log2(float(row["lr"])) == DIVERGED[1]


def test_plots_are_png_files_and_all_files_are_on_the_parent_run(report) -> None:
    out = report["out"]
    heatmaps = {f"heatmap_{p}_w{w}_d{d}.png" for p, w, d in SHAPES}
    pngs = {"lr_curves.png", "trend.png", "momentum_curves.png"} | heatmaps
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 5000, name  # more than an empty canvas
    logged = {Path(a.path).name for a in report["client"].list_artifacts(report["parent"], "report")}
    assert pngs | {"optima.csv", "trends.csv", "optima.md", "trials.csv"} <= logged
    assert str(out) in report["printed"]


def test_unknown_study_is_a_usage_error_naming_it(report, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["report", "--study", "no-such-study", "--out", str(report["out"] / "x"),
                 "--tracking-uri", report["uri"]])
    assert code == 2
    err = capsys.readouterr().err
    assert "no-such-study" in err and report["uri"] in err
    assert not (report["out"] / "x").exists()
    missing = report["out"] / "missing.db"
    assert main(["report", "--study", STUDY, "--out", str(report["out"] / "x"),
                 "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not missing.exists()


def test_unknown_metric_is_a_usage_error_listing_the_logged_ones(report, capsys) -> None:
    code = main(["report", "--study", STUDY, "--out", str(report["out"] / "y"), "--tracking-uri", report["uri"],
                 "--metric", "final/nope"])
    assert code == 2
    assert "final/eval_loss" in capsys.readouterr().err


def test_report_and_transfer_read_one_analysis(report, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One StudyAnalysis, loaded once, is what the report tabulates and what transfer predicts from: transfer
    reads no trial again, and its law and held-out check are the very objects the report wrote."""
    from mutransfer.study import store, study_analysis
    from mutransfer.study.report import write_report
    from mutransfer.study.transfer import plan_transfer

    study = study_analysis.StudyAnalysis.load(report["client"], STUDY, "final/eval_loss")
    written = write_report(report["client"], study, tmp_path / "report", log_to_parent=False)
    assert written.analysis is study and written.artifact_uri is None
    trends = {(r["variant"], r["axis"]): r for r in read_csv(tmp_path / "report" / "trends.csv")}
    assert float(trends[("mup", "depth")]["slope_per_doubling"]) == pytest.approx(study.trends["mup"].verdicts["depth"].slope, abs=1e-4)

    def no_second_read(*_args, **_kwargs):
        raise AssertionError("transfer read the study's trials again")

    monkeypatch.setattr(store, "load_trials", no_second_read)
    monkeypatch.setattr(study_analysis, "load_trials", no_second_read)
    target = tmp_path / "target.yaml"
    target.write_text("run: {steps: 100}\nmodel: {parametrization: mup, width: 64, depth: 32}\ndata: {batch_size: 64}\n")
    plan = plan_transfer(study, str(target), out=str(tmp_path / "planned.yaml"), tracking_uri=report["uri"])
    assert plan.study is study and plan.prediction.variant == "mup"
    assert plan.prediction.trend is study.trends["mup"] and plan.prediction.held_out is study.heldout["mup"]


@pytest.mark.parametrize("keys", [
    {"mup-w64-d2-lr-6-m0.8-s0", "mup-w64-d2-lr-6-m0.9-s1"},  # one shape's: their common prefix matches more runs
    {"mup-w64-d4-lr-5-m0.9-s0", "depth_mup-w64-d4-lr-5-m0.9-s0"},  # no common prefix: every run is searched
    {"mup-w64-d8-lr-7-m0.9-s1"},
    {"mup_w64-d8-lr-7-m0.9-s1"},  # LIKE's `_` matches the `-` of a stored key: not that trial
])
def test_reading_some_trials_gives_exactly_those(report, keys: set[str]) -> None:
    from mutransfer.study.store import load_trials

    found = load_trials(report["client"], STUDY, keys=keys)
    stored = {key for key in keys if "_w" not in key}
    assert sorted(t.key for t in found) == sorted(stored)
