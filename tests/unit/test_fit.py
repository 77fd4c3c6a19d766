"""Fitted optima, trends, verdicts and the trend-based transfer rule, on synthetic curves with known answers."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from mutransfer.models.parametrization import Parametrization, parse_label
from mutransfer.study import analysis, fit
from mutransfer.study.store import Trial
from mutransfer.study.study_analysis import StudyAnalysis
from mutransfer.study.transfer import predict
from mutransfer.study.trial import TrialSpec
from mutransfer.typed_config import with_values

GRID = [float(x) for x in range(-10, -2)]  # log2 lr, one step apart


def parabola(x: float, centre: float, floor: float = 0.5, curvature: float = 0.3) -> float:
    return floor + curvature * (x - centre) ** 2


@pytest.mark.parametrize("centre", [-7.0, -6.6, -6.25, -5.5, -4.1])
def test_parabola_between_grid_points_is_recovered_exactly(centre: float) -> None:
    values = [parabola(x, centre) for x in GRID]
    optimum = fit.fit_optimum(GRID, values)
    assert optimum.how == fit.PARABOLA and not optimum.edge
    assert optimum.x == pytest.approx(centre, abs=1e-9)
    assert optimum.value == min(values)


def test_the_loss_at_the_optimum_is_observed_never_an_undershooting_parabola() -> None:
    values = [abs(x + 6.0) * 0.8 + 0.01 for x in GRID]  # a sharp V down to 0.01: a parabola dips below zero
    optimum = fit.fit_optimum(GRID, values)
    assert optimum.how == fit.PARABOLA and optimum.value == pytest.approx(0.01)


def test_asymmetric_curve_stays_within_half_a_step_of_the_best_point() -> None:
    values = [abs(x + 6.3) ** 1.5 for x in GRID]  # not a parabola: the fit is an estimate, bounded by design
    optimum = fit.fit_optimum(GRID, values)
    assert abs(optimum.x - (-6.3)) < 0.25


def test_noisy_curves_average_to_the_true_optimum_over_seeds() -> None:
    rng = np.random.default_rng(0)
    fits = [fit.fit_optimum(GRID, [parabola(x, -6.4) + rng.normal(0, 0.02) for x in GRID]) for _ in range(40)]
    summary = fit.SeedSummary(tuple(fits))
    assert summary.x == pytest.approx(-6.4, abs=0.1)
    assert 0 < summary.spread < 0.5


@pytest.mark.parametrize("centre, edge", [(-12.0, fit.LOW), (-1.0, fit.HIGH)])
def test_best_point_on_a_grid_edge_is_flagged_not_fitted(centre: float, edge: str) -> None:
    optimum = fit.fit_optimum(GRID, [parabola(x, centre) for x in GRID])
    assert optimum.edge == edge and optimum.how == fit.GRID
    assert optimum.x == (GRID[0] if edge == fit.LOW else GRID[-1])


def test_the_fit_never_crosses_into_diverged_learning_rates() -> None:
    values = [parabola(x, -4.6) for x in GRID]
    values[6:] = [math.inf, math.nan]  # lr 2^-4 diverged, 2^-3 gave NaN: the optimum lies at or below 2^-5
    optimum = fit.fit_optimum(GRID, values)
    assert optimum.x == -5.0 and not optimum.edge
    assert fit.fit_optimum(GRID, values, neighbours=0).how == fit.GRID  # a single point: no parabola
    assert fit.fit_optimum(GRID, [math.inf] * len(GRID)) is None


def test_rough_curves_are_smoothed_by_the_wider_window() -> None:
    rng = np.random.default_rng(3)
    curves = [[parabola(x, -6.4, curvature=0.1) + rng.normal(0, 0.05) for x in GRID] for _ in range(60)]
    spread = {n: np.std([fit.fit_optimum(GRID, c, neighbours=n).x for c in curves]) for n in (1, 2)}
    assert spread[2] < 0.8 * spread[1]


def test_flat_curve_gives_the_grid_point() -> None:
    assert fit.fit_optimum([0.0, 1.0, 2.0], [1.0, 1.0, 1.0]).how == fit.GRID


def test_bad_grid_is_an_error() -> None:
    with pytest.raises(ValueError, match="increasing"):
        fit.fit_optimum([1.0, 0.0], [1.0, 2.0])


def test_trend_recovers_known_slopes_and_their_errors_shrink_with_data() -> None:
    rng = np.random.default_rng(1)
    sizes = [{"width": w, "depth": d} for w in (32, 64, 128, 256) for d in (2, 4, 8, 16) for _ in range(3)]
    truth = [-3.0 - 0.5 * math.log2(s["depth"]) + 0.1 * math.log2(s["width"]) for s in sizes]
    trend = fit.fit_trend(sizes, [y + rng.normal(0, 0.1) for y in truth])
    assert trend.slopes["depth"] == pytest.approx(-0.5, abs=0.05)
    assert trend.slopes["width"] == pytest.approx(0.1, abs=0.05)
    assert 0 < trend.errors["depth"] < 0.05 and trend.significant("depth")
    prediction, error = trend.predict({"width": 1024, "depth": 64})
    assert prediction == pytest.approx(-3.0 - 0.5 * 6 + 0.1 * 10, abs=0.3) and error > trend.errors["depth"]


def test_trend_leaves_out_axes_that_do_not_vary_and_exact_fits_have_infinite_error() -> None:
    trend = fit.fit_trend([{"width": 32, "depth": d} for d in (2, 4)], [-5.0, -6.0])
    assert trend.axes == ("depth",) and trend.slopes["depth"] == pytest.approx(-1.0)
    assert trend.dof == 0 and math.isinf(trend.errors["depth"])


def test_insignificant_axes_are_treated_as_flat() -> None:
    rng = np.random.default_rng(2)
    sizes = [{"width": 32, "depth": d} for d in (2, 4, 8, 16) for _ in range(3)]
    trend = fit.flat_where_insignificant(sizes, [-5.0 + rng.normal(0, 0.2) for _ in sizes])
    assert trend.axes == ()
    assert trend.predict({"width": 32, "depth": 128})[0] == pytest.approx(trend.coefficients[0])


@pytest.mark.parametrize("slope, error, outcome", [
    (-0.4, 0.05, "drifts"), (0.05, 0.04, "holds"), (-0.3, 0.2, "unclear"), (0.01, 0.5, "unclear")])
def test_verdict_from_slope_and_error(slope: float, error: float, outcome: str) -> None:
    assert analysis.judge("depth", slope, error, 3.0).outcome == outcome


# --- trials with a planted trend, through analysis and the transfer rule --------------------------------
LR_GRID = [2.0**x for x in range(-10, -2)]
DEPTHS = (2, 4, 8, 16)


def planted_trials(label: str, depth_slope: float, seeds: int = 3, noise: float = 0.01,
                   loss_slope: float = -0.05) -> list[Trial]:
    """Proxies whose eval loss is a parabola in log2 lr centred at -5 + slope * log2(depth / 2)."""
    rng = np.random.default_rng(zlib.crc32(f"{label}{depth_slope}".encode()))
    trials = []
    for depth in DEPTHS:
        centre = -5.0 + depth_slope * math.log2(depth / 2)
        for seed in range(seeds):
            for lr in LR_GRID:
                value = parabola(math.log2(lr), centre, 0.8 + loss_slope * math.log2(depth)) + rng.normal(0, noise)
                trials.append(Trial(f"{label}-{depth}-{lr}-{seed}", f"k{depth}{lr}{seed}", "proxy",
                                    TrialSpec(label, 32, depth, 64, 100, lr, 0.9, 0.0, seed), "finished",
                                    {"final/eval_loss": value}))
    return trials


def test_analysis_flags_the_drifting_parametrization_and_passes_the_flat_one() -> None:
    trials = planted_trials("mup", -0.5) + planted_trials("depth_mup", 0.0)
    trends = analysis.trends(analysis.fit_shapes(trials, "final/eval_loss"))
    assert trends["mup"].verdicts["depth"].outcome == "drifts" and trends["mup"].transfers is False
    assert trends["mup"].verdicts["depth"].slope == pytest.approx(-0.5, abs=0.05)
    assert trends["depth_mup"].verdicts["depth"].outcome == "holds" and trends["depth_mup"].transfers is True
    assert "width" not in trends["mup"].verdicts  # width did not vary
    assert "drifts (depth -0.5" in analysis.summary_sentence(trends["mup"])
    assert analysis.summary_sentence(trends["depth_mup"]).startswith("depth_mup: transfers")


def test_bigger_must_be_better_or_the_study_is_flagged() -> None:
    trend = analysis.trends(analysis.fit_shapes(planted_trials("mup", 0.0, loss_slope=0.1), "final/eval_loss"))["mup"]
    assert trend.bigger_is_better == {"depth": False}
    assert "does not fall with depth" in analysis.summary_sentence(trend)


def test_transfer_extrapolates_the_trend_to_the_target() -> None:
    trials = planted_trials("mup", -0.5)
    prediction = predict(StudyAnalysis.of(trials, "final/eval_loss"), "mup", {"width": 32.0, "depth": 64.0})
    assert prediction.extrapolation == {"width": 0.0, "depth": 2.0, "batch": 0.0, "length": 0.0}
    assert prediction.log2_lr == pytest.approx(-5.0 - 0.5 * 5, abs=0.15)  # log2(64 / 2) = 5 doublings
    assert 0 < prediction.log2_lr_error < 0.2
    assert any("moves with depth" in w for w in prediction.warnings)
    params = prediction.params()
    assert params["transfer.rule"] == "trend" and float(params["transfer.lr"]) == pytest.approx(prediction.lr)


def test_transfer_of_a_flat_parametrization_uses_every_proxy_and_far_targets_are_warned() -> None:
    prediction = predict(StudyAnalysis.of(planted_trials("depth_mup", 0.0), "final/eval_loss"), "depth_mup",
                         {"width": 32.0, "depth": 256.0})
    assert prediction.flat_axes == ("depth",)
    assert prediction.log2_lr == pytest.approx(-5.0, abs=0.05)
    assert any("doublings from your largest proxy" in w for w in prediction.warnings)
    assert not any("moves with" in w for w in prediction.warnings)


def test_largest_rule_keeps_the_best_grid_point_of_the_largest_proxy() -> None:
    trials = planted_trials("mup", -0.5)
    prediction = predict(StudyAnalysis.of(trials, "final/eval_loss"), "mup", {"width": 32.0, "depth": 64.0}, rule="largest")
    deepest = [t for t in trials if t.spec.depth == 16]
    best_lr = min(LR_GRID, key=lambda lr: np.mean([t.metrics["final/eval_loss"] for t in deepest if t.spec.lr == lr]))
    assert prediction.lr == best_lr and prediction.rule == "largest"


def test_momentum_is_fitted_in_log2_one_minus_beta() -> None:
    trials = []
    for depth in (2, 8):
        for lr in LR_GRID:
            for momentum in (0.5, 0.75, 0.875, 0.9375):
                value = parabola(math.log2(lr), -5.0) + 0.2 * (math.log2(1 - momentum) + 2.6) ** 2
                trials.append(Trial("r", f"{depth}{lr}{momentum}", "proxy",
                                    TrialSpec("sgdp", 32, depth, 64, 100, lr, momentum, 0.0, 0), "finished",
                                    {"final/eval_loss": value}))
    fits = analysis.fit_shapes(trials, "final/eval_loss")
    assert all(f.momentum.x == pytest.approx(-2.6, abs=1e-6) for f in fits.values())
    assert fits[("sgdp", 32, 2, 64, 100)].momentum_value == pytest.approx(1 - 2**-2.6)


def test_parametrization_labels_round_trip() -> None:
    for p in (Parametrization("depth_mup", first_layer_lr_exponent=0.5), Parametrization("completep"),
              Parametrization("depth_mup", alpha=0.75), Parametrization("mup")):
        fields = parse_label(p.label)
        assert Parametrization(fields.pop("parametrization"), **fields) == p
    with pytest.raises(ValueError, match="bad parametrization label"):
        parse_label("depth_mup+fast")


def test_demo_verdict_names_the_parametrization_that_transfers_and_the_one_that_drifts() -> None:
    from mutransfer.study.demo import verdict_lines

    trials = planted_trials("mup", -0.5) + planted_trials("completep", 0.0)
    lines = verdict_lines(analysis.trends(analysis.fit_shapes(trials, "final/eval_loss")))
    assert lines[-1].startswith("[demo] verdict: tune completep proxies, not mup, for deeper targets: across depth")
    assert "and that of mup -0.50 +- 0.00: 0.49 +- 0.00 less" in lines[-1]
    assert lines[-1].endswith("its slope is measured within the 0.17 bar.")
    assert any("mup: optimal lr -0.50" in line and "drifts" in line for line in lines)


def test_demo_verdict_compares_how_far_the_optima_move_and_needs_two_errors_between_them() -> None:
    from mutransfer.study.demo import _axis_verdict

    sp, quiet = analysis.judge("width", -1.34, 0.17, 2), analysis.judge("width", 0.27, 0.27, 2)  # a demo run
    assert (sp.outcome, quiet.outcome) == ("drifts", "unclear")
    verdict = _axis_verdict("width", {"sp": sp, "depth_mup+fle0.5": quiet})
    assert verdict.startswith("tune depth_mup+fle0.5 proxies, not sp, for wider targets: across width the optimal "
                              "lr of depth_mup+fle0.5 moves +0.27 +- 0.27")
    assert "1.07 +- 0.32 less, 3.4 standard errors; whether its own slope is within the 0.17 bar needs more" in verdict
    drifts_less = analysis.judge("width", 0.48, 0.14, 2)  # drifts too, by far less
    assert _axis_verdict("width", {"sp": sp, "b": drifts_less}).endswith(
        "it drifts too, less, and `transfer` carries its fitted slope.")
    close = analysis.judge("width", -0.57, 0.35, 2)  # 0.77 less, but 2 errors are 0.78
    assert _axis_verdict("width", {"sp": sp, "b": close}).startswith("this run does not separate them (across width")
    other_way = analysis.judge("width", 1.10, 0.10, 2)  # as steep the other way: no steadier, however far apart
    assert "0.24 +- 0.20 less, 1.2 standard errors, under two" in _axis_verdict("width", {"sp": sp, "b": other_way})
    assert "no variant's optimum drifts" in _axis_verdict("width", {"b": quiet, "c": close})
    exact = analysis.judge("width", -1.0, 0.0, 2)  # planted, noiseless: as far apart as they will ever be
    tie = _axis_verdict("width", {"b": exact, "c": analysis.judge("width", 1.0, 0.0, 2)})
    assert "0.00 +- 0.00 less, 0.0 standard errors" in tie and "does not separate" in tie
    holds = analysis.judge("width", 0.05, 0.05, 2)
    assert "does not choose between them" in _axis_verdict("width", {"b": holds, "c": holds})


def test_a_study_label_becomes_typed_model_values_of_the_trial() -> None:
    from mutransfer.train.config import RunConfig, RunSection

    base = RunConfig(run=RunSection(steps=1))
    trial = TrialSpec("depth_mup+fle0.5", 128, 4, 64, 10, 2.0**-7, 0.8, 0.0, 1)
    cfg = trial.run_config(base)
    assert (cfg.model.parametrization, cfg.model.first_layer_lr_exponent) == ("depth_mup", 0.5)
    assert (cfg.model.width, cfg.model.depth, cfg.optim.lr, cfg.run.seed) == (128, 4, 2.0**-7, 1)
    assert (cfg.optim.beta1, cfg.optim.momentum) == (0.8, 0.9)  # AdamW tunes beta1
    sgd = trial.run_config(with_values(base, {"optim.name": "sgd"}))
    assert (sgd.optim.beta1, sgd.optim.momentum) == (0.9, 0.8)
    assert base.model.width is None  # the base is not changed


def test_demo_verdict_prefers_a_flat_but_noisy_slope_and_says_when_there_is_nothing_to_compare() -> None:
    from mutransfer.study.demo import verdict_lines

    noisy = planted_trials("depth_mup+fle0.5", 0.0, seeds=2, noise=0.15)
    trends = analysis.trends(analysis.fit_shapes(planted_trials("depth_mup", 1.0, seeds=2) + noisy,
                                                 "final/eval_loss"))
    assert trends["depth_mup+fle0.5"].verdicts["depth"].outcome in ("holds", "unclear")
    assert verdict_lines(trends)[-1].startswith("[demo] verdict: tune depth_mup+fle0.5 proxies, not depth_mup")
    flat_only = analysis.trends(analysis.fit_shapes(noisy, "final/eval_loss"))
    assert "one variant only (depth_mup+fle0.5), nothing to compare it with" in verdict_lines(flat_only)[-1]
