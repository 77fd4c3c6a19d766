"""Batch size and training length as study axes: the law over every axis, transfer along each, the held-out
check, weight decay by its timescale, and what a target must share with its proxies. Synthetic trials with
known answers; the store and `transfer` through a real sqlite MLflow store."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from mutransfer.cli import main
from mutransfer.models.parametrization import resolve_parametrization
from mutransfer.study import analysis, holdout, target
from mutransfer.study.store import Trial
from mutransfer.study.study_analysis import StudyAnalysis
from mutransfer.study.transfer import Prediction, predict
from mutransfer.study.trial import TrialSpec
from mutransfer.train.config import RunConfig, RunSection, load_config, with_values
from mutransfer.train.tracking import flatten

LENGTH_SLOPE, LENGTH_ERROR, BATCH_SLOPE = -0.43, 0.12, 0.48  # docs/results.md: the measured defaults
LR_GRID = [2.0**x for x in range(-11, -1)]
METRIC = "final/eval_loss"


def planted(slopes: dict[str, float], shapes: list[tuple[int, int, int, int]], seeds: int = 3,
            noise: float = 0.01, label: str = "depth_mup+fle0.5", bend: dict | None = None,
            loss_slopes: dict[str, float] | None = None) -> list[Trial]:
    """Proxies (width, depth, batch, steps) whose eval loss is a parabola in log2 lr centred at
    -6 + sum of slope x log2(size / smallest), length in samples; `bend` moves some shapes' optima off the law."""
    rng = np.random.default_rng(zlib.crc32(repr((slopes, shapes, bend)).encode()))
    loss_slopes = loss_slopes or {"width": -0.05, "depth": -0.05, "batch": 0.0, "length": -0.1}
    trials = []
    for width, depth, batch, steps in shapes:
        sizes = {"width": width, "depth": depth, "batch": batch, "length": batch * steps}
        logs = {a: math.log2(sizes[a] / min(s[i] if a != "length" else s[2] * s[3] for s in shapes))
                for i, a in enumerate(analysis.AXES)}
        centre = -6.0 + sum(slopes.get(a, 0.0) * logs[a] for a in analysis.AXES)
        centre += (bend or {}).get((width, depth, batch, steps), 0.0)
        floor = 1.0 + sum(loss_slopes.get(a, 0.0) * logs[a] for a in analysis.AXES)
        for seed in range(seeds):
            for lr in LR_GRID:
                value = floor + 0.3 * (math.log2(lr) - centre) ** 2 + rng.normal(0, noise)
                spec = TrialSpec(label, width, depth, batch, steps, lr, 0.9, 0.0, seed)
                trials.append(Trial(spec.key, spec.key, "proxy", spec, "finished", {METRIC: value}))
    return trials


LENGTHS = [(32, 4, 64, steps) for steps in (100, 200, 400, 800, 1600)]
BATCH_AT_FIXED_SAMPLES = [(32, 4, batch, 25600 // batch) for batch in (16, 32, 64, 128, 256)]
FOUR_AXES = [(w, d, b, s) for w in (32, 64) for d in (2, 4) for b in (32, 64) for s in (100, 400)]


def predict_for(trials: list[Trial], target_shape: dict[str, float], **options) -> Prediction:
    """`transfer.predict` for the planted variant, from the analysis of `trials`."""
    return predict(StudyAnalysis.of(trials, METRIC), "depth_mup+fle0.5", target_shape, **options)


def law(trials: list[Trial]) -> analysis.VariantTrend:
    return analysis.trends(analysis.fit_shapes(trials, METRIC))["depth_mup+fle0.5"]


def test_a_planted_length_trend_is_recovered_with_its_error() -> None:
    trend = law(planted({"length": -0.22}, LENGTHS, noise=0.02))
    assert trend.lr.axes == ("length",) and trend.length_unit == analysis.SAMPLES
    assert trend.lr.slopes["length"] == pytest.approx(-0.22, abs=0.03)
    assert 0 < trend.lr.errors["length"] < 0.05
    assert trend.verdicts["length"].outcome == "drifts"
    assert trend.bigger_is_better == {"length": True}
    assert math.isfinite(trend.bootstrap_errors["length"]) and trend.bootstrap_errors["length"] < 0.05
    assert trend.mean_curve_lr.slopes["length"] == pytest.approx(-0.22, abs=0.03)


def test_a_planted_batch_trend_at_fixed_samples_is_recovered_and_loss_is_not_required_to_fall() -> None:
    trend = law(planted({"batch": 0.29}, BATCH_AT_FIXED_SAMPLES, noise=0.02, loss_slopes={"batch": 0.05}))
    assert trend.lr.axes == ("batch",) and trend.length_unit == analysis.SAMPLES
    assert trend.lr.slopes["batch"] == pytest.approx(0.29, abs=0.03) and trend.lr.errors["batch"] < 0.05
    assert trend.bigger_is_better == {}  # a bigger batch at fixed samples need not reach a lower loss


def test_batch_varied_at_fixed_steps_measures_length_in_steps() -> None:
    shapes = [(32, 4, batch, 200) for batch in (16, 64, 256)]
    trend = law(planted({"batch": 0.1}, shapes, loss_slopes={"batch": -0.1}))
    assert trend.length_unit == analysis.STEPS and trend.lr.axes == ("batch",)
    assert trend.lr.slopes["batch"] == pytest.approx(0.1, abs=0.03)
    assert trend.bigger_is_better == {"batch": True}


def test_four_axes_are_fitted_jointly() -> None:
    slopes = {"width": -0.05, "depth": 0.1, "batch": 0.3, "length": -0.2}
    trend = law(planted(slopes, FOUR_AXES, seeds=2, noise=0.01))
    for axis, slope in slopes.items():
        assert trend.lr.slopes[axis] == pytest.approx(slope, abs=0.03), axis
        assert trend.lr.errors[axis] < 0.03


def test_transfer_extrapolates_along_length_and_batch_with_each_contribution() -> None:
    trials = planted({"length": -0.22}, LENGTHS, noise=0.02)
    prediction = predict_for(trials, {"width": 32, "depth": 4, "batch": 64, "steps": 6400})
    assert prediction.contributions["length"].doublings == pytest.approx(2.0)
    assert prediction.contributions["length"].value == pytest.approx(-0.44, abs=0.06)
    assert prediction.log2_lr == pytest.approx(-6.0 - 0.22 * 6, abs=0.1)
    assert prediction.contributions["length"].error > 0
    assert prediction.params()["transfer.contribution_length"].startswith("-0.4")
    batch = planted({"batch": 0.29}, BATCH_AT_FIXED_SAMPLES, noise=0.02)
    wide = predict_for(batch, {"width": 32, "depth": 4, "batch": 1024, "samples": 25600})
    assert wide.contributions["batch"].doublings == pytest.approx(2.0)
    assert wide.log2_lr == pytest.approx(-6.0 + 0.29 * 6, abs=0.1)


def test_an_axis_the_study_did_not_vary_is_warned_by_name_and_the_measured_slope_applied_by_default() -> None:
    trials = planted({"depth": 0.0}, [(32, d, 64, 100) for d in (2, 4, 8)])
    longer = {"width": 32, "depth": 8, "batch": 64, "steps": 6400}
    plain = predict_for(trials, longer, assumed={})
    assert "the proxies' lr is used as is" in next(w for w in plain.warnings if "longer" in w)
    default = predict_for(trials, longer)  # target.DEFAULT_RULES: length=measured
    warning = next(w for w in default.warnings if "longer" in w)
    assert "the target trains 64x longer than the proxies; this study did not measure how the optimum moves " \
           "with length" in warning and "--assume length=RULE" in warning
    # docs/results.md, "Batch size and training length": LENGTH_SLOPE +- LENGTH_ERROR per doubling
    assert default.log2_lr == pytest.approx(plain.log2_lr + LENGTH_SLOPE * 6)
    assert default.contributions["length"].error == pytest.approx(LENGTH_ERROR * 6)
    assert default.log2_lr_error == pytest.approx(math.hypot(plain.log2_lr_error, LENGTH_ERROR * 6))
    assert "docs/results.md" in default.contributions["length"].source
    flat = predict_for(trials, longer, assumed=target.parse_assumptions(["length=flat"]))
    assert flat.log2_lr == pytest.approx(plain.log2_lr) and flat.log2_lr_error == pytest.approx(plain.log2_lr_error)
    wider = predict_for(trials, {**longer, "steps": 100, "batch": 1024})
    assert wider.contributions["batch"].value == pytest.approx(BATCH_SLOPE * 4)  # at the proxies' 6,400 samples
    with pytest.raises(ValueError, match="length rules are"):
        target.parse_assumptions(["length=bogus"])


def test_held_out_check_passes_a_straight_law_and_flags_a_planted_miss() -> None:
    straight = holdout.held_out(list(analysis.fit_shapes(planted({"length": -0.22}, LENGTHS), METRIC).values()))
    assert [c.axis for c in straight] == ["length"] and all(c.within for c in straight)
    assert holdout.coverage(straight) == 1.0
    bent = planted({"length": -0.22}, LENGTHS, bend={LENGTHS[-1]: 1.0})
    missed = holdout.held_out(list(analysis.fit_shapes(bent, METRIC).values()))
    assert not missed[0].within and missed[0].miss == pytest.approx(1.0, abs=0.1)
    prediction = predict_for(bent, {"width": 32, "depth": 4, "batch": 64, "steps": 6400})
    assert any("held-out shapes miss their 95 % interval" in w for w in prediction.warnings)


def test_weight_decay_keeps_adamws_timescale_by_hand() -> None:
    # proxy: wd 0.1 at lr 2^-6, batch 64, 6,400 samples: timescale 64 / (2^-6 * 0.1 * 6400) = 6.4
    # target: lr 2^-7, batch 256, 409,600 samples: wd = 256 / (2^-7 * 6.4 * 409600) = 0.0125
    assert target.timescale_weight_decay(0.1, 2**-6, 64, 6400, 2**-7, 256, 409600) == pytest.approx(0.0125)
    assert target.timescale_weight_decay(0.0, 2**-6, 64, 6400, 2**-7, 256, 409600) == 0.0
    # beta2 0.99 at batch 64: half-life 64 ln .5 / ln .99 = 4,414 samples; at batch 256: 0.99^4 = 0.96059601
    assert target.half_life_beta2(0.99, 64, 256) == pytest.approx(0.96059601)
    assert target.beta2_half_life_samples(0.99, 64) == pytest.approx(target.beta2_half_life_samples(0.96059601, 256))


def test_transfer_moves_weight_decay_with_the_targets_lr_batch_and_length() -> None:
    trials = [Trial(t.run_id, t.key, t.role, TrialSpec(*t.spec.shape, lr=t.spec.lr, momentum=0.9, weight_decay=0.05,
                                                        seed=t.spec.seed), t.status, t.metrics)
              for t in planted({"length": -0.22}, LENGTHS)]
    prediction = predict_for(trials, {"width": 32, "depth": 4, "batch": 256, "steps": 1600})
    largest = analysis.fit_shapes(trials, METRIC)[max(t.shape for t in trials if t.spec.steps == 1600)]
    expected = target.timescale_weight_decay(0.05, largest.lr_value, 64, 64 * 1600, prediction.lr, 256, 256 * 1600)
    assert prediction.weight_decay == pytest.approx(expected)
    assert "timescale" in prediction.weight_decay_rule and "transfer.weight_decay" in prediction.params()


def test_depth_mup_means_one_thing_in_a_run_config_and_a_study_label() -> None:
    plain = with_values(RunConfig(run=RunSection(steps=1)), {"model.parametrization": "depth_mup"})
    assert target.resolved_variant(plain).label == "depth_mup"  # a bare name: first_layer_lr_exponent 0
    assert resolve_parametrization("depth_mup").first_layer_lr_exponent == 0.0
    assert target.resolved_variant(RunConfig(run=RunSection(steps=1))).label == "depth_mup+fle0.5"  # no name
    assert target.matching_variant(plain, {"depth_mup+fle0.5", "depth_mup"}) == "depth_mup"


def test_transfer_matches_a_target_to_its_proxies_by_resolved_values_not_spelling() -> None:
    cfg = with_values(RunConfig(run=RunSection(steps=1)), {"model.parametrization": "depth_mup",
                                                           "model.first_layer_lr_exponent": 0.5})
    assert target.matching_variant(cfg, {"depth_mup+alpha0.5+fle0.5", "mup"}) == "depth_mup+alpha0.5+fle0.5"
    with pytest.raises(ValueError, match="tuned only mup"):
        target.matching_variant(cfg, {"mup"})


@pytest.mark.parametrize("change, field", [({"optim.name": "sgd"}, "optim.name"),
                                           ({"model.base_width": 64}, "model.base_width"),
                                           ({"model.head_dim": 32}, "model.head_dim"),
                                           ({"model.name": "resmlp", "model.head_dim": None, "model.patch_size": None},
                                            "model.name")])
def test_a_target_that_does_not_share_its_proxies_fields_is_refused_naming_the_first(change, field) -> None:
    proxy = with_values(RunConfig(run=RunSection(steps=1)), {"model.base_width": 32, "model.head_dim": 16,
                                                             "model.width": 64})
    params = flatten(proxy.to_dict())
    target.check_matches(params, with_values(proxy, {"model.width": 128, "model.head_dim": 16}))  # same: fine
    explicit = with_values(proxy, {"model.head_dim": None, "model.base_width": 32})
    target.check_matches(flatten(explicit.to_dict()), with_values(proxy, {"model.head_dim": 64, "model.width": 128}))
    with pytest.raises(ValueError, match=f"^{field}:"):
        target.check_matches(params, with_values(proxy, change))


def test_a_target_below_the_proxies_is_warned() -> None:
    trials = planted({"depth": 0.0}, [(32, d, 64, 100) for d in (4, 8, 16)])
    prediction = predict_for(trials, {"width": 32, "depth": 2, "batch": 64, "steps": 100})
    assert any("below every proxy's" in w and "-1.0 doublings" in w for w in prediction.warnings)


# --- through a real MLflow store ------------------------------------------------------------------------
STUDY = "axes-study"


def _store(root: Path, target_cfg: RunConfig, shapes: list = LENGTHS[:3], edit=None) -> str:
    """A study whose proxies logged `target_cfg`'s config (at their own shapes) and the tags a sweep writes
    (passed through `edit`, where given, to spoil them)."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("axes")
    parent = client.create_run(experiment, tags={"mutransfer.study": STUDY, "mutransfer.role": "study"})
    for trial in planted({"length": -0.22}, shapes, seeds=1):
        spec = trial.spec
        run_tags = {"mlflow.parentRunId": parent.info.run_id, "mutransfer.study": STUDY, "mutransfer.role": "proxy",
                    "mutransfer.trial_key": spec.key, "mutransfer.status": "finished", **spec.identity_tags()}
        run = client.create_run(experiment, tags=edit(run_tags) if edit else run_tags)
        logged = flatten(with_values(target_cfg, {"run.steps": spec.steps, "model.width": spec.width}).to_dict())
        logged["world_size"] = "1"
        client.log_batch(run.info.run_id, metrics=[Metric(METRIC, trial.metrics[METRIC], 0, 0)],
                         params=[Param(k, v) for k, v in logged.items()])
        client.set_terminated(run.info.run_id)
    return uri


def _transfer(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["transfer", "--study", STUDY, *args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def target_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("target") / "target.yaml"
    path.write_text("model: {name: vit, width: 64, depth: 4, head_dim: 16, patch_size: 8, base_width: 32,\n"
                    "        parametrization: depth_mup, first_layer_lr_exponent: 0.5}\n"
                    "data: {batch_size: 16, train_num_samples: 6400}\n"
                    "optim: {name: adamw, weight_decay: 0.0}\nrun: {epochs: 16, output_dir: out}\n")
    return path


@pytest.fixture(scope="module")
def store(target_file: Path) -> str:
    return _store(target_file.parent, load_config(str(target_file), ["run.epochs=null", "run.steps=1"], check=False))


def test_transfer_extrapolates_length_from_epochs_and_ranks_and_records_it(tmp_path: Path, target_file: Path,
                                                                          store: str) -> None:
    uri = store
    code, printed, _ = _transfer(["--target", str(target_file), "--tracking-uri", uri, "--ranks", "4",
                                  "--out", str(tmp_path / "t.yaml")])
    assert code == 0, printed
    # 4 ranks x 16 = batch 64; 16 epochs of 6,400 samples = 1,600 steps = 102,400 samples, x4 the largest proxy
    assert "batch 64" in printed and "length 102400" in printed
    assert "length: +2.00 doublings" in printed
    written = load_config(str(tmp_path / "t.yaml"), check=False)
    assert written.tracking.params["transfer.target_batch"] == "64"
    assert written.tracking.params["transfer.contribution_length"].startswith("-0.4")


def test_transfer_refuses_a_target_with_another_optimizer(target_file: Path, store: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    uri = store
    code = main(["transfer", "--study", STUDY, "--target", str(target_file), "--tracking-uri", uri,
                 "optim.name=sgd"])
    assert code == 2 and "optim.name: the target has sgd, its proxies adamw" in capsys.readouterr().err


def _identity_without(field: str):
    """An `edit` for `_store`: the identity tag without `field` (its single-field copy stays)."""
    def edit(run_tags: dict[str, str]) -> dict[str, str]:
        identity = json.loads(run_tags["mutransfer.trial"])
        del identity[field]
        return {**run_tags, "mutransfer.trial": json.dumps(identity)}

    return edit


@pytest.mark.parametrize(("edit", "said"), [
    (_identity_without("width"), "missing ['width']"),
    (_identity_without("lr"), "missing ['lr']"),
    (lambda t: {k: v for k, v in t.items() if k != "mutransfer.trial"}, "has no tag mutransfer.trial"),
    (lambda t: {**t, "mutransfer.trial": t["mutransfer.trial"].replace('"depth": ', '"depth": 0.5 * ')},
     "malformed tag mutransfer.trial"),
    (lambda t: {**t, "mutransfer.trial": t["mutransfer.trial"].replace('"width": ', '"width": "') + "x"},
     "malformed tag mutransfer.trial"),
])
def test_a_stored_run_with_a_missing_or_malformed_identity_is_an_error_naming_it(
        tmp_path: Path, target_file: Path, edit, said: str) -> None:
    """The store reads a trial's identity from its one structured tag and fills nothing in: a run recorded
    without it (or an older one), or with a field missing or spoilt, is an error that names the run, even
    where the single-field copies a user filters on in the UI are all there."""
    from mutransfer.study.store import StoredRunError, client_for, load_trials

    uri = _store(tmp_path, load_config(str(target_file), ["run.epochs=null", "run.steps=1"], check=False),
                 LENGTHS[:1], edit=edit)
    client = client_for(uri)
    with pytest.raises(StoredRunError) as raised:
        load_trials(client, STUDY)
    run_ids = {run.info.run_id for run in client.search_runs([client.get_experiment_by_name("axes").experiment_id])}
    assert said in str(raised.value) and any(f"run {run_id} " in str(raised.value) for run_id in run_ids)


@pytest.mark.parametrize(("field", "value", "said"), [
    ("lr", float("nan"), "lr nan is out of range"), ("lr", 0.0, "out of range"), ("momentum", 1.0, "out of range"),
    ("width", 32.0, "not a whole number"), ("depth", 0, "not positive"), ("seed", True, "not a number"),
    ("variant", "", "not a variant's label"),
])
def test_an_identity_is_read_strictly(field: str, value, said: str) -> None:
    spec = TrialSpec("mup", 32, 2, 64, 100, 0.01, 0.9, 0.0, 0)
    identity = json.loads(spec.identity_tags()["mutransfer.trial"])
    assert TrialSpec.from_identity(identity) == spec
    with pytest.raises(ValueError, match=said):
        TrialSpec.from_identity({**identity, field: value})
    with pytest.raises(ValueError, match="unknown"):
        TrialSpec.from_identity({**identity, "extra": 1})


def test_the_trainer_writes_the_identity_the_store_reads() -> None:
    """What a run trained (resolved width and depth, global batch over accumulation and ranks, length in
    steps) goes into its identity tag, and reads back as that TrialSpec."""
    from types import SimpleNamespace

    from mutransfer.models.parametrization import Parametrization
    from mutransfer.train.run_log import run_tags

    cfg = with_values(RunConfig(run=RunSection(steps=1)), {"data.batch_size": 8, "optim.accumulation": 2,
                                                          "optim.lr": 0.004, "optim.weight_decay": 0.05, "run.seed": 3})
    model = SimpleNamespace(parametrization=Parametrization("depth_mup", first_layer_lr_exponent=0.5), width=48,
                            depth=6)
    written = run_tags(cfg, model, world_size=4, total_steps=250)
    spec = TrialSpec.from_identity(json.loads(written["mutransfer.trial"]))
    assert spec == TrialSpec("depth_mup+fle0.5", 48, 6, 64, 250, 0.004, cfg.optim.momentum_value, 0.05, 3)
    assert written["mutransfer.batch_size"] == "64" and written["mutransfer.samples"] == str(64 * 250)


def test_the_identity_tag_holds_every_trial_field_and_its_copies_match() -> None:
    spec = TrialSpec("depth_mup+fle0.5", 32, 2, 64, 100, 2.0 ** -7, 0.9, 0.05, 3)
    written = spec.identity_tags()
    assert set(json.loads(written["mutransfer.trial"])) == {f.name for f in dataclasses.fields(TrialSpec)}
    assert written["mutransfer.variant"] == "depth_mup+fle0.5" and written["mutransfer.lr"] == repr(2.0 ** -7)
    assert written["mutransfer.width"] == "32" and written["mutransfer.weight_decay"] == "0.05"


# --- the study's shapes ---------------------------------------------------------------------------------
BASE = "run: {steps: 1}\ndata: {batch_size: 16}\nmodel: {head_dim: 16}\noptim: {warmup_steps: 5}\n"


def _study(tmp_path: Path, shapes: dict, base: str = BASE) -> Path:
    import yaml

    (tmp_path / "base.yaml").write_text(base)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"study": {"name": "s", "base_config": "base.yaml", "steps": 50},
                                    "shapes": {"widths": [32], "depths": [2], **shapes}, "grid": {"lr": [0.01]}}))
    return path


def test_lengths_in_samples_or_epochs_become_steps_per_batch(tmp_path: Path) -> None:
    from mutransfer.study.config import load_study

    by_samples = load_study(_study(tmp_path, {"batch_sizes": [16, 64], "samples": [6400]}))
    assert [(s.batch_size, s.steps) for s in by_samples.shape_list()] == [(16, 400), (64, 100)]
    default = load_study(_study(tmp_path, {}))
    assert [(s.batch_size, s.steps) for s in default.shape_list()] == [(16, 50)]  # the base's batch, study.steps
    epochs = load_study(_study(tmp_path, {"batch_sizes": [32], "epochs": [2]},
                               "run: {steps: 1}\ndata: {batch_size: 16, train_num_samples: 1000}\n"
                               "model: {head_dim: 16}\n"))
    assert [s.steps for s in epochs.shape_list()] == [62]  # 2 x 1000 / 32 = 62.5, rounded to a whole step
    trial = by_samples.trials()[-1]
    cfg = trial.run_config(by_samples.base_run_config(), ranks=2)
    assert (cfg.data.batch_size, cfg.run.steps, cfg.run.epochs) == (32, 100, None)  # 64 over 2 ranks
    assert "_b64_t100_" in trial.key and trial.shape == (trial.variant, 32, 2, 64, 100)


@pytest.mark.parametrize("shapes, message", [
    ({"batch_sizes": [48], "samples": [1000]}, "not a whole number of batches"),
    ({"steps": [10], "samples": [100]}, "one unit"),
    ({"list": [{"variant": "mup", "width": 8, "depth": 2, "steps": 5, "epochs": 1}]}, "one of steps"),
])
def test_bad_lengths_are_config_errors(tmp_path: Path, shapes: dict, message: str) -> None:
    from mutransfer.errors import ConfigError
    from mutransfer.study.config import load_study

    with pytest.raises(ConfigError, match=message):
        load_study(_study(tmp_path, shapes))


def test_the_verdict_is_about_width_and_depth_and_says_how_length_moves_the_optimum() -> None:
    shapes = [(32, d, 64, s) for d in (2, 4, 8) for s in (100, 400, 1600)]
    trend = law(planted({"length": -0.22}, shapes, noise=0.01))
    assert trend.verdicts["length"].outcome == "drifts" and trend.transfers is True
    sentence = analysis.summary_sentence(trend)
    assert sentence.startswith("depth_mup+fle0.5: transfers") and "moves with length (-0.22" in sentence


def test_a_swept_weight_decay_follows_its_fitted_law() -> None:
    trials = []
    for base in planted({"length": -0.22}, LENGTHS[:3]):
        for wd, penalty in ((0.01, 0.05), (0.1, 0.0), (1.0, 0.2)):  # 0.1 best at every shape
            spec = TrialSpec(*base.spec.shape, lr=base.spec.lr, momentum=0.9, weight_decay=wd, seed=base.spec.seed)
            trials.append(Trial(spec.key, spec.key, "proxy", spec, "finished",
                                {METRIC: base.metrics[METRIC] + penalty}))
    prediction = predict_for(trials, {"width": 32, "depth": 4, "batch": 64, "steps": 6400})
    assert prediction.weight_decay == pytest.approx(0.1) and "fitted law" in prediction.weight_decay_rule
