"""`mutransfer transfer`: carry a study's lr, momentum and weight decay to the target run.

Two rules pick the target's lr from the proxies of the target's variant (matched by resolved values):

- `trend` (default): each proxy shape's optimum is fitted between grid points and over seeds, the optimum's
  log2(lr) is fitted as linear in log2 of every axis the study varied (width, depth, global batch, length;
  `analysis.trend_of`), and the law is extrapolated to the target along each axis in which it differs. Axes
  whose slope is within two standard errors of zero are treated as flat (`fit.flat_where_insignificant`), so
  that noise is not carried over many doublings. Each axis's contribution is printed and recorded with its
  error and doublings. Where the target differs along an axis the study did not vary, transfer warns by name
  and applies a rule (`target.ASSUMED`): by default the slope docs/results.md measured, with its error.
- `largest`: the best grid point of the largest proxy (no fit: robust when a curve is too flat or too coarse to fit).

Weight decay follows AdamW's timescale (`target.timescale_weight_decay`), or the fitted law where the study
swept it; `--keep-beta2-half-life` moves beta2 with the batch. The target must share its proxies' optimizer,
base shape, head_dim and model family (`target.check_matches`). The target config records all of it under
`tracking.params`, so the target's MLflow run says how its settings were chosen.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mutransfer import tags
from mutransfer.errors import ConfigError, UsageError
from mutransfer.tags import RunStatus
from mutransfer.train.config import RunConfig, load_config, save_config, with_values
from mutransfer.train.tracking import resolve_tracking_uri

from . import analysis, fit, holdout
from .store import Trial, client_for
from .study_analysis import StudyAnalysis
from .target import Assumption, check_matches, matching_variant, target_sizes, timescale_weight_decay

RULES = ("trend", "largest")
FAR_DOUBLINGS = 3.0  # a target further than this beyond the largest proxy (x8) is warned about
MATERIAL_MISS = 0.25  # log2: a held-out miss below this is no reason to distrust the law, whatever its interval


@dataclass(frozen=True)
class Contribution:
    """How far one axis moves the target's log2(lr) from the largest proxy's."""

    axis: str
    doublings: float  # from the largest proxy along the axis
    slope: float
    error: float  # of the contribution: the slope's standard error x |doublings| (0 for a rule without one)
    source: str = "fitted"  # fitted | flat (not significant) | an assumption's source

    @property
    def value(self) -> float:
        return self.slope * self.doublings


@dataclass
class Prediction:
    """The target's settings and how they were chosen."""

    rule: str
    variant: str  # the variant whose proxies the settings come from
    target: dict[str, float]  # width, depth, batch, length (in `length_unit`)
    log2_lr: float
    log2_lr_error: float  # standard error (0 under `largest`: no model of the error)
    momentum: float
    weight_decay: float
    extrapolation: dict[str, float]  # doublings beyond the largest proxy, per axis
    trend: analysis.VariantTrend | None = None
    flat_axes: tuple[str, ...] = ()  # axes treated as flat because their slope was not significant
    warnings: list[str] = field(default_factory=list)
    contributions: dict[str, Contribution] = field(default_factory=dict)
    weight_decay_rule: str = ""
    beta2: float | None = None  # set when beta2 is moved by its half-life
    held_out: list[holdout.HeldOut] = field(default_factory=list)

    @property
    def lr(self) -> float:
        return 2.0**self.log2_lr

    def params(self) -> dict[str, str]:
        """What the target run records as MLflow params."""
        out = {"transfer.rule": self.rule, "transfer.variant": self.variant, "transfer.lr": repr(self.lr),
               "transfer.log2_lr": f"{self.log2_lr:.4f}", "transfer.log2_lr_error": f"{self.log2_lr_error:.4f}",
               "transfer.momentum": repr(self.momentum), "transfer.weight_decay": repr(self.weight_decay),
               "transfer.weight_decay_rule": self.weight_decay_rule[:400],
               "transfer.target_batch": f"{self.target['batch']:.0f}", "transfer.length_unit": self.length_unit,
               "transfer.target_length": f"{self.target['length']:.0f}"}
        out.update({f"transfer.doublings_{axis}": f"{d:.2f}" for axis, d in self.extrapolation.items()})
        if self.trend:
            out.update({f"transfer.slope_{a}": f"{v.slope:.4f}+-{v.error:.4f}" for a, v in self.trend.verdicts.items()})
        out.update({f"transfer.contribution_{a}": f"{c.value:+.4f}+-{c.error:.4f} ({c.source})"[:500]
                    for a, c in self.contributions.items()})
        if self.beta2 is not None:
            out["transfer.beta2"] = repr(self.beta2)
        if self.held_out:
            out["transfer.heldout_coverage"] = f"{holdout.coverage(self.held_out):.3f}"
        return out

    @property
    def length_unit(self) -> str:
        return self.trend.length_unit if self.trend else analysis.SAMPLES


def _axis_target(target: dict[str, float], fits: list[analysis.ShapeFit], unit: str) -> dict[str, float]:
    """The target's size on each axis; a batch or length it does not give is the largest proxy's."""
    largest = max(fits, key=lambda f: analysis.proxy_size(f.shape)).shape
    batch = target.get("batch", largest.batch_size)
    steps = target.get("steps", target["samples"] / batch if "samples" in target else largest.steps)
    return {"width": target["width"], "depth": target["depth"], "batch": batch,
            "length": steps * batch if unit == analysis.SAMPLES else steps}


def _extrapolation(trend: analysis.VariantTrend, target: dict[str, float]) -> dict[str, float]:
    """Doublings from the largest proxy to the target, per axis."""
    return {axis: math.log2(target[axis] / trend.sizes[axis][1]) for axis in analysis.AXES}


def _contributions(law: fit.Trend, trend: analysis.VariantTrend, doublings: dict[str, float],
                   assumed: dict[str, Assumption]) -> dict[str, Contribution]:
    """Each axis along which the target differs (or the study varied): fitted, flat, or assumed."""
    out = {}
    for axis, d in doublings.items():
        if axis in trend.lr.axes:
            source = "fitted" if axis in law.axes else "flat (slope not significant)"
            out[axis] = Contribution(axis, d, law.slopes.get(axis, 0.0), law.errors.get(axis, 0.0) * abs(d), source)
        elif abs(d) > 1e-9 and axis in assumed:
            out[axis] = Contribution(axis, d, assumed[axis].slope, assumed[axis].error * abs(d), assumed[axis].source)
    return out


def _predict_trend(fits: list[analysis.ShapeFit], trend: analysis.VariantTrend, target: dict[str, float],
                   assumed: dict[str, Assumption]) -> tuple[float, float, tuple[str, ...], dict[str, Contribution]]:
    """(log2 lr, its error, flat axes, contributions): the law at the target, plus assumed slopes."""
    law = fit.flat_where_insignificant(*analysis.lr_observations(fits, trend.length_unit), axes=analysis.AXES)
    x, error = law.predict(target)
    contributions = _contributions(law, trend, _extrapolation(trend, target), assumed)
    added = [c for c in contributions.values() if c.axis not in trend.lr.axes]
    x += sum(c.value for c in added)
    error = math.sqrt(error**2 + sum(c.error**2 for c in added))  # the assumed slopes' errors are independent
    return x, error, tuple(a for a in trend.lr.axes if a not in law.axes), contributions


def _predict_momentum(fits: list[analysis.ShapeFit], target: dict[str, float], unit: str) -> float:
    if not all(f.momentum for f in fits):
        return max(fits, key=lambda f: analysis.proxy_size(f.shape)).momentum_value
    sizes, ys = analysis.observations(fits, lambda f: [o.x for o in f.momentum.per_seed], unit)
    x, _ = fit.flat_where_insignificant(sizes, ys, axes=analysis.AXES).predict(target)
    return 1.0 - 2.0**x


def _unmeasured(prediction: Prediction) -> list[str]:
    """Axes along which the target differs from proxies that did not vary: warned by name."""
    out, trend = [], prediction.trend
    what = {"length": "trains {x} {dir} than the proxies", "batch": "uses a {x} {dir} batch than the proxies",
            "width": "is {x} {dir} than the proxies", "depth": "is {x} {dir} than the proxies"}
    words = {"length": ("longer", "shorter"), "batch": ("larger", "smaller"), "width": ("wider", "narrower"),
             "depth": ("deeper", "shallower")}
    for axis, d in prediction.extrapolation.items():
        if axis in trend.lr.axes or abs(d) < 1e-9:
            continue
        factor = f"{2 ** abs(d):.3g}x"
        head = f"the target {what[axis].format(x=factor, dir=words[axis][d < 0])}; this study did not measure how " \
               f"the optimum moves with {axis}"
        used = prediction.contributions.get(axis)
        tail = (f": assumed {used.slope:+.2f} +- {used.error / abs(d):.2f} log2 per doubling ({used.source}); "
                f"`--assume {axis}=RULE` chooses another rule (see docs/results.md)" if used else
                ": the proxies' lr is used as is" + (f"; `--assume {axis}=RULE` applies a documented rule "
                                                        "(see docs/results.md)" if axis in ("length", "batch") else ""))
        out.append(head + tail)
    return out


def _warnings(prediction: Prediction, what: str = "optimal lr") -> list[str]:
    out, trend = _unmeasured(prediction), prediction.trend
    for axis, verdict in trend.verdicts.items():
        beyond = abs(prediction.extrapolation[axis]) > 0.05
        if axis not in prediction.flat_axes and trend.lr.significant(axis) and beyond:
            out.append(f"the {what} moves with {axis} ({verdict.slope:+.2f} +- {verdict.error:.2f} log2 per "
                       f"doubling): the prediction extrapolates that trend {prediction.extrapolation[axis]:+.1f} "
                       "doublings; transfer along it is not parameter-free")
        small = math.log2(prediction.target[axis] / trend.sizes[axis][0])
        if small < -1e-9:
            out.append(f"the target's {axis} ({prediction.target[axis]:g}) is below every proxy's (smallest "
                       f"{trend.sizes[axis][0]:g}): extrapolating {small:+.1f} doublings below them")
    for axis, doublings in prediction.extrapolation.items():
        if doublings > FAR_DOUBLINGS and axis in trend.lr.axes:
            out.append(f"the target's {axis} lies {doublings:+.1f} doublings from your largest proxy (x"
                       f"{2 ** abs(doublings):.0f}): confirm with a proxy nearer the target")
    if trend.edge_optima:
        out.append(f"{trend.edge_optima} of {trend.observations} seed optima of {prediction.variant} sit on an lr grid "
                   "edge: they are bounds, and the trend may be steeper; widen the grid")
    missed = [c for c in prediction.held_out if not c.within and abs(c.miss) > MATERIAL_MISS]
    if missed:
        out.append(f"{len(missed)} of {len(prediction.held_out)} held-out shapes miss their 95 % interval ("
                   + ", ".join(f"{c.axis} {c.size:g}: {c.miss:+.2f} vs +-{c.interval:.2f}" for c in missed[:3])
                   + "): the law does not extrapolate; tune closer to the target")
    return out


def _weight_decay(study: StudyAnalysis, variant: str, x: float, target: dict[str, float], optimizer: str
                  ) -> tuple[float, str]:
    """(target weight decay, how it was chosen): AdamW's timescale held at the largest proxy's, or the fitted
    law of the grid optima where the study swept weight decay (and every optimum is positive)."""
    largest, trend = study.largest_fit(variant), study.trends[variant]
    swept = len({t.spec.weight_decay for t in study.trials_of(variant)}) > 1
    own = {f.shape for f in study.fits_of(variant)}
    optima = {s: o for s, o in study.optima.items() if s in own}
    if swept and optima and all(o.weight_decay > 0 for o in optima.values()):
        law = fit.flat_where_insignificant([analysis.axis_sizes(s, trend.length_unit) for s in optima],
                                           [math.log2(o.weight_decay) for o in optima.values()], axes=analysis.AXES)
        return 2.0 ** law.predict(target)[0], "the fitted law of the swept weight decay's grid optima"
    if optimizer != "adamw" or largest.weight_decay == 0:
        why = "the proxies used none" if largest.weight_decay == 0 else "the timescale rule is AdamW's"
        return largest.weight_decay, f"the proxies' ({why})"
    shape = analysis.axis_sizes(largest.shape, analysis.SAMPLES)
    samples = target["length"] * (target["batch"] if trend.length_unit == analysis.STEPS else 1.0)
    wd = timescale_weight_decay(largest.weight_decay, largest.lr_value, shape["batch"], shape["length"], 2.0**x,
                                target["batch"], samples)
    timescale = shape["batch"] / (largest.lr_value * largest.weight_decay * shape["length"])
    return wd, (f"AdamW's timescale B/(lr*wd*samples) = {timescale:.3g} of the run held at the largest proxy's "
                "(Wang & Aitchison, arXiv 2405.13698)")


def predict(study: StudyAnalysis, variant: str, target: dict[str, float], rule: str = "trend",
            assumed: dict[str, Assumption] | None = None, optimizer: str = "adamw") -> Prediction:
    """The target's lr, momentum and weight decay from the study's proxies of `variant`, by `rule`. `target`
    gives width and depth, and batch and steps (or samples) where they differ from the largest proxy's.
    `assumed`: the rules for axes the study did not vary; None: the defaults (`target.default_assumptions`),
    {}: none."""
    if rule not in RULES:
        raise UsageError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    fits = study.fits_of(variant)
    if not fits:
        raise UsageError(f"no finished proxy of {variant!r} to transfer from")
    largest, trend = study.largest_fit(variant), study.trends[variant]
    sizes = _axis_target(target, fits, trend.length_unit)
    contributions: dict[str, Contribution] = {}
    if rule == "largest":
        grid_best = study.optima.get(largest.shape)
        if grid_best is None:
            raise UsageError(f"no grid point of the largest {variant} proxy finished in every seed: use --from trend")
        x, error, flat, momentum = math.log2(grid_best.lr), 0.0, (), grid_best.momentum
    else:
        from .target import default_assumptions

        rules = default_assumptions() if assumed is None else assumed
        x, error, flat, contributions = _predict_trend(fits, trend, sizes, rules)
        momentum = _predict_momentum(fits, sizes, trend.length_unit)
    wd, wd_rule = _weight_decay(study, variant, x, sizes, optimizer)
    prediction = Prediction(rule, variant, sizes, x, error, momentum, wd, _extrapolation(trend, sizes), trend, flat,
                            contributions=contributions, weight_decay_rule=wd_rule, held_out=study.heldout[variant])
    prediction.warnings = _warnings(prediction)
    return prediction


@dataclass
class TransferPlan:
    study: StudyAnalysis
    """The analysis the prediction came from."""
    prediction: Prediction
    target_config: Path
    command: list[str]


def plan_transfer(study: StudyAnalysis, target: str, out: str | None = None, tracking_uri: str | None = None,
                  num_gpus: int = 1, overrides: list[str] = (), rule: str = "trend", ranks: int | None = None,
                  assume: list[str] = (), keep_beta2_half_life: bool = False) -> TransferPlan:
    """Predict the target's settings from a study's analysis (`StudyAnalysis.load` from the MLflow store at
    `tracking_uri`) and write its config. The target's batch counts `ranks` data-parallel ranks (default:
    `num_gpus`, the GPUs of the printed command)."""
    from .target import parse_assumptions

    assumed = parse_assumptions(list(assume))
    if not study.fits:
        raise UsageError(f"study {study.name!r} has no finished trial with metric {study.metric!r} (all diverged "
                         "or missing)")
    target_cfg = load_config(target, list(overrides), check=False)
    variant = matching_variant(target_cfg, set(study.variants))
    check_matches(_proxy_params(study.trials, variant), target_cfg)
    prediction = predict(study, variant, target_sizes(target_cfg, ranks or num_gpus), rule, assumed,
                         target_cfg.optim.name)
    if keep_beta2_half_life and target_cfg.optim.name == "adamw":
        _move_beta2(prediction, study.trials, variant)
    target_cfg = _carry_drop_path(study.trials, variant, target_cfg, overrides, prediction)
    uri = resolve_tracking_uri(tracking_uri)
    parent = study.parent.info
    experiment_name = client_for(uri).get_experiment(parent.experiment_id).name
    out_path = _write_target(study.name, target, target_cfg, out, prediction, study.metric,
                             {"uri": uri, "experiment": experiment_name, "parent_run_id": parent.run_id})
    command = ["deepspeed", "--num_gpus", str(num_gpus), "--module", "mutransfer.train", "--config", str(out_path)]
    return TransferPlan(study, prediction, out_path, command)


def _proxy_params(trials: list[Trial], variant: str) -> dict[str, str]:
    """The logged config of a finished proxy of `variant` (they share every field `check_matches` compares)."""
    finished = [t for t in trials if t.spec.variant == variant and t.status == RunStatus.FINISHED]
    return finished[0].params if finished else {}


def _move_beta2(prediction: Prediction, trials: list[Trial], variant: str) -> None:
    """Beta2 with its half-life in samples kept at the largest proxy's (Marek et al., arXiv 2507.07101)."""
    from .target import half_life_beta2

    own = [t for t in trials if t.spec.variant == variant and "optim.beta2" in t.params]
    if not own:
        prediction.warnings.append("the proxies did not log optim.beta2: beta2 is left as the target gives it")
        return
    largest = max(own, key=lambda t: analysis.proxy_size(t.shape))
    prediction.beta2 = half_life_beta2(float(largest.params["optim.beta2"]), largest.spec.batch_size,
                                       prediction.target["batch"])


def _carry_drop_path(trials: list[Trial], variant: str, target_cfg: RunConfig, overrides: list[str],
                     prediction: Prediction) -> RunConfig:
    """The target with the model.drop_path_rate its proxies logged (the rate transfers as it is,
    docs/parametrizations.md), unless the command line sets it or the proxies disagree (a warning)."""
    rates = {float(t.params.get("model.drop_path_rate", 0.0)) for t in trials if t.spec.variant == variant and t.params}
    if len(rates) != 1 or any(o.split("=", 1)[0].strip() == "model.drop_path_rate" for o in overrides):
        if len(rates) > 1:
            prediction.warnings.append("the proxies logged several model.drop_path_rate values: the target keeps its own")
        return target_cfg
    rate, own = rates.pop(), target_cfg.model.drop_path_rate
    if rate != own:
        prediction.warnings.append(f"model.drop_path_rate {rate:g}, which the proxies trained with, replaces the "
                                   f"target config's {own:g}")
    return with_values(target_cfg, {"model.drop_path_rate": rate})


def _write_target(study: str, target: str, target_cfg: RunConfig, out: str | None, prediction: Prediction,
                  metric: str, tracking_fields: dict[str, str]) -> Path:
    """The target config with the transferred settings and the study's MLflow placement, built as typed values
    (checked once more) and written in full."""
    run_tags = {**target_cfg.tracking.tags, tags.STUDY: study, tags.ROLE: tags.RunRole.TARGET.value,
                tags.TRIAL_KEY: f"target_{Path(target).stem}", tags.TRANSFER_RULE: prediction.rule}
    beta2 = {"optim.beta2": prediction.beta2} if prediction.beta2 is not None else {}
    cfg = with_values(target_cfg, {
        "optim.lr": prediction.lr, f"optim.{target_cfg.optim.momentum_key}": prediction.momentum,
        "optim.weight_decay": prediction.weight_decay, "tracking.tags": run_tags, **beta2,
        "tracking.params": {**target_cfg.tracking.params, **prediction.params()},
        **{f"tracking.{key}": value for key, value in tracking_fields.items()},
    })
    out_path = Path(out) if out else Path(cfg.run.output_dir) / "target.yaml"
    save_config(cfg, out_path, header=(
        f"# written by: mutransfer transfer --study {study} --target {target} --from {prediction.rule}\n"
        f"# lr {prediction.lr:.4g} (log2 {prediction.log2_lr:.2f} +- {prediction.log2_lr_error:.2f}) "
        f"from the {prediction.variant} proxies' {metric}\n"))
    return out_path


def describe(plan: TransferPlan) -> str:
    """The table of fitted optima, the law in words, each axis's contribution, the prediction, the weight
    decay, the held-out check and the warnings."""
    p = plan.prediction
    lines = [f"study {plan.study.name}: fitted optimum per proxy shape ({plan.study.metric}; lr = 2^x, x averaged "
             "over seeds)",
             f"  {'variant':<20}{'width':>6}{'depth':>6}{'batch':>6}{'steps':>7}{'lr':>11}{'log2 lr':>9}"
             f"{'+-':>6}{'momentum':>10}{'value':>9}  edge"]
    for shape, f in plan.study.fits.items():
        lines.append(f"  {shape.variant:<20}{shape.width:>6}{shape.depth:>6}{shape.batch_size:>6}{shape.steps:>7}{f.lr_value:>11.4g}"
                     f"{f.lr.x:>9.2f}{f.lr.spread:>6.2f}{f.momentum_value:>10.3g}{f.lr.value:>9.4f}  "
                     f"{','.join(f.lr.edges) or '-'}")
    if p.trend:
        lines.append(analysis.summary_sentence(p.trend))
        lines += ["  " + analysis.axis_sentence(v, p.trend.sizes[a]) for a, v in p.trend.verdicts.items()]
    flat = f"; flat in {', '.join(p.flat_axes)} (slope not significant)" if p.flat_axes else ""
    shape = ", ".join(f"{a} {p.target[a]:g}" for a in analysis.AXES)
    lines.append(f"target {p.variant} ({shape}; length in {p.length_unit}): lr {p.lr:.4g} = 2^({p.log2_lr:.2f} +- "
                 f"{p.log2_lr_error:.2f}), momentum {p.momentum:.4g}, by rule '{p.rule}'{flat}")
    lines += [f"  {c.axis}: {c.doublings:+.2f} doublings x {c.slope:+.3f} = {c.value:+.2f} +- {c.error:.2f} log2 "
              f"({c.source})" for c in p.contributions.values()]
    lines.append(f"weight decay {p.weight_decay:.4g}: {p.weight_decay_rule}")
    if p.beta2 is not None:
        lines.append(f"beta2 {p.beta2:.6g}: its half-life in samples kept at the largest proxy's")
    lines.append(holdout.sentence(p.held_out))
    lines += [f"warning: {w}" for w in p.warnings]
    lines.append(f"target config: {plan.target_config}")
    lines.append("run it with:  " + " ".join(plan.command))
    return "\n".join(lines)


def launch_target(plan: TransferPlan, launcher: str = "inprocess") -> int:
    """Train the target: in this process, or through the printed deepspeed command."""
    if launcher == "inprocess":
        from mutransfer.train.trainer import EXIT_DIVERGED, train

        result = train(load_config(plan.target_config))
        return EXIT_DIVERGED if result.status == RunStatus.DIVERGED else 0
    import subprocess

    command = list(plan.command)
    command[0] = str(Path(sys.executable).parent / "deepspeed")
    return subprocess.call(command)


def check_target_exists(target: str) -> None:
    if not Path(target).is_file():
        raise ConfigError("--target", f"no such file: {target}")
