"""`mutransfer transfer`: carry a study's lr and momentum to the target run.

Two rules pick the target's settings from the proxies of the target's parametrization label:

- `trend` (default): each proxy shape's optimum is fitted between grid points and over seeds, the optimum's
  log2(lr) is fitted against log2(width) and log2(depth) (`analysis.trend_of`), and the fit is extrapolated to
  the target's shape. Axes whose slope is within two standard errors of zero are treated as flat
  (`fit.flat_where_insignificant`), so that noise is not carried over many doublings. The prediction comes
  with its standard error and with how many doublings it extrapolates; a significant trend, a target far
  beyond the proxies and optima on a grid edge are warned about.
- `largest`: the best grid point of the largest proxy (no fit: robust when a curve is too flat or too coarse to fit).

The target config records the rule and the prediction under `tracking.params`, so the target's MLflow run
says how its lr was chosen.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mutransfer import tags
from mutransfer.errors import ConfigError
from mutransfer.tags import RunStatus
from mutransfer.train.config import RunConfig, load_config, save_config, with_values
from mutransfer.train.tracking import resolve_tracking_uri

from . import analysis, fit
from .store import DEFAULT_METRIC, Trial, client_for, find_study_run, latest_per_key, load_trials

RULES = ("trend", "largest")
FAR_DOUBLINGS = 3.0  # a target further than this beyond the largest proxy (x8) is warned about


@dataclass
class Prediction:
    """The target's settings and how they were chosen."""

    rule: str
    label: str  # the parametrization label the proxies were selected by
    target: dict[str, float]  # width, depth
    log2_lr: float
    log2_lr_error: float  # standard error (0 under `largest`: no model of the error)
    momentum: float
    weight_decay: float
    extrapolation: dict[str, float]  # doublings beyond the largest proxy, per axis
    trend: analysis.ParamTrend | None = None
    flat_axes: tuple[str, ...] = ()  # axes treated as flat because their slope was not significant
    warnings: list[str] = field(default_factory=list)

    @property
    def lr(self) -> float:
        return 2.0**self.log2_lr

    def params(self) -> dict[str, str]:
        """What the target run records as MLflow params."""
        out = {"transfer.rule": self.rule, "transfer.label": self.label, "transfer.lr": repr(self.lr),
               "transfer.log2_lr": f"{self.log2_lr:.4f}", "transfer.log2_lr_error": f"{self.log2_lr_error:.4f}",
               "transfer.momentum": repr(self.momentum)}
        out.update({f"transfer.doublings_{axis}": f"{d:.2f}" for axis, d in self.extrapolation.items()})
        if self.trend:
            out.update({f"transfer.slope_{a}": f"{v.slope:.4f}+-{v.error:.4f}" for a, v in self.trend.verdicts.items()})
        return out


def target_shape(cfg: RunConfig) -> tuple[str, dict[str, float]]:
    """(parametrization label, {width, depth}) of a run config, zoo defaults filled in."""
    from mutransfer.models.parametrization import resolve_parametrization
    from mutransfer.models.zoo import zoo_entry

    defaults = zoo_entry(cfg.model.name).defaults
    width, depth = cfg.model.width or defaults.get("width"), cfg.model.depth or defaults.get("depth")
    label = resolve_parametrization(cfg.model.parametrization, alpha=cfg.model.alpha,
                                    first_layer_lr_exponent=cfg.model.first_layer_lr_exponent).label
    return label, {"width": float(width), "depth": float(depth)}


def _extrapolation(trend: analysis.ParamTrend, target: dict[str, float]) -> dict[str, float]:
    """Doublings from the largest proxy to the target, per axis."""
    return {axis: math.log2(target[axis] / trend.sizes[axis][1]) for axis in analysis.AXES}


def _predict_trend(fits: list[analysis.ShapeFit], full: fit.Trend, target: dict[str, float]
                   ) -> tuple[float, float, tuple[str, ...]]:
    sizes, ys = analysis.observations(fits, lambda f: [o.x for o in f.lr.per_seed])
    trend = fit.flat_where_insignificant(sizes, ys)
    x, error = trend.predict(target)
    return x, error, tuple(a for a in full.axes if a not in trend.axes)


def _predict_momentum(fits: list[analysis.ShapeFit], target: dict[str, float]) -> float:
    if not all(f.momentum for f in fits):
        return max(fits, key=lambda f: analysis.proxy_size(f.shape)).momentum_value
    sizes, ys = analysis.observations(fits, lambda f: [o.x for o in f.momentum.per_seed])
    x, _ = fit.flat_where_insignificant(sizes, ys).predict(target)
    return 1.0 - 2.0**x


def _warnings(prediction: Prediction, what: str = "optimal lr") -> list[str]:
    out, trend = [], prediction.trend
    for axis, verdict in (trend.verdicts.items() if trend else []):
        if axis not in prediction.flat_axes and trend.lr.significant(axis):
            out.append(f"the {what} moves with {axis} ({verdict.slope:+.2f} +- {verdict.error:.2f} log2 per "
                       f"doubling): the prediction extrapolates that trend {prediction.extrapolation[axis]:+.1f} "
                       "doublings; transfer along it is not parameter-free")
    for axis, doublings in prediction.extrapolation.items():
        if abs(doublings) > FAR_DOUBLINGS:
            out.append(f"the target's {axis} lies {doublings:+.1f} doublings from your largest proxy (x"
                       f"{2 ** abs(doublings):.0f}): confirm with a proxy nearer the target")
    if trend and trend.edge_optima:
        out.append(f"{trend.edge_optima} of {trend.observations} seed optima of {prediction.label} sit on an lr grid "
                   "edge: they are bounds, and the trend may be steeper; widen the grid")
    return out


def predict(trials: list[Trial], metric: str, label: str, target: dict[str, float], rule: str = "trend") -> Prediction:
    """The target's lr and momentum from the proxies of `label`, by `rule`."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    fits = [f for shape, f in analysis.fit_shapes(trials, metric).items() if shape[0] == label]
    if not fits:
        raise ValueError(f"no finished proxy of {label!r} to transfer from")
    largest = max(fits, key=lambda f: analysis.proxy_size(f.shape))
    trend = analysis.trend_of(label, fits)
    if rule == "largest":
        grid_best = analysis.optimum_per_shape([t for t in trials if t.shape == largest.shape], metric)[largest.shape]
        x, error, flat, momentum = math.log2(grid_best.lr), 0.0, (), grid_best.momentum
    else:
        x, error, flat = _predict_trend(fits, trend.lr, target)
        momentum = _predict_momentum(fits, target)
    prediction = Prediction(rule, label, target, x, error, momentum, largest.weight_decay,
                            _extrapolation(trend, target), trend, flat)
    prediction.warnings = _warnings(prediction)
    return prediction


@dataclass
class TransferPlan:
    study: str
    parent_run_id: str
    prediction: Prediction
    fits: dict
    target_config: Path
    command: list[str]


def plan_transfer(study: str, target: str, out: str | None = None, metric: str = DEFAULT_METRIC,
                  tracking_uri: str | None = None, experiment: str | None = None, num_gpus: int = 1,
                  overrides: list[str] = (), rule: str = "trend") -> TransferPlan:
    uri = resolve_tracking_uri(tracking_uri)
    client = client_for(uri)
    parent = find_study_run(client, study, experiment)
    if parent is None:
        raise ValueError(f"no study named {study!r} in the MLflow store at {uri}")
    trials = latest_per_key(load_trials(client, study, experiment))
    fits = analysis.fit_shapes(trials, metric)
    if not fits:
        raise ValueError(f"study {study!r} has no finished trial with metric {metric!r} (all diverged or missing)")
    target_cfg = load_config(target, list(overrides), check=False)
    label, shape = target_shape(target_cfg)
    if label not in {s[0] for s in fits}:
        known = ", ".join(sorted({s[0] for s in fits}))
        raise ValueError(f"the target uses {label!r} but study {study!r} tuned only {known}")
    prediction = predict(trials, metric, label, shape, rule)
    experiment_name = client.get_experiment(parent.info.experiment_id).name
    out_path = _write_target(study, target, target_cfg, out, prediction, metric,
                             {"uri": uri, "experiment": experiment_name, "parent_run_id": parent.info.run_id})
    command = ["deepspeed", "--num_gpus", str(num_gpus), "--module", "mutransfer.train", "--config", str(out_path)]
    return TransferPlan(study, parent.info.run_id, prediction, fits, out_path, command)


def _write_target(study: str, target: str, target_cfg: RunConfig, out: str | None, prediction: Prediction,
                  metric: str, tracking_fields: dict[str, str]) -> Path:
    """The target config with the transferred settings and the study's MLflow placement, built as typed values
    (checked once more) and written in full."""
    run_tags = {**target_cfg.tracking.tags, tags.STUDY: study, tags.ROLE: tags.RunRole.TARGET.value,
                tags.TRIAL_KEY: f"target_{Path(target).stem}", tags.TRANSFER_RULE: prediction.rule}
    cfg = with_values(target_cfg, {
        "optim.lr": prediction.lr, f"optim.{target_cfg.optim.momentum_key}": prediction.momentum,
        "optim.weight_decay": prediction.weight_decay, "tracking.tags": run_tags,
        "tracking.params": {**target_cfg.tracking.params, **prediction.params()},
        **{f"tracking.{key}": value for key, value in tracking_fields.items()},
    })
    out_path = Path(out) if out else Path(cfg.run.output_dir) / "target.yaml"
    save_config(cfg, out_path, header=(
        f"# written by: mutransfer transfer --study {study} --target {target} --from {prediction.rule}\n"
        f"# lr {prediction.lr:.4g} (log2 {prediction.log2_lr:.2f} +- {prediction.log2_lr_error:.2f}) "
        f"from the {prediction.label} proxies' {metric}\n"))
    return out_path


def describe(plan: TransferPlan, metric: str) -> str:
    """The table of fitted optima, the trend in words, the prediction and its warnings."""
    p = plan.prediction
    lines = [f"study {plan.study}: fitted optimum per proxy shape ({metric}; lr = 2^x, x averaged over seeds)",
             f"  {'parametrization':<20}{'width':>6}{'depth':>6}{'lr':>11}{'log2 lr':>9}{'+-':>6}{'momentum':>10}"
             f"{'value':>9}  edge"]
    for shape, f in plan.fits.items():
        lines.append(f"  {shape[0]:<20}{shape[1]:>6}{shape[2]:>6}{f.lr_value:>11.4g}{f.lr.x:>9.2f}{f.lr.spread:>6.2f}"
                     f"{f.momentum_value:>10.3g}{f.lr.value:>9.4f}  {','.join(f.lr.edges) or '-'}")
    if p.trend:
        lines.append(analysis.summary_sentence(p.trend))
        lines += ["  " + analysis.axis_sentence(v, p.trend.sizes[a]) for a, v in p.trend.verdicts.items()]
    flat = f"; flat in {', '.join(p.flat_axes)} (slope not significant)" if p.flat_axes else ""
    shape = " x ".join(f"{p.target[a]:g}" for a in analysis.AXES)
    lines.append(f"target {p.label} {shape} (width x depth): lr {p.lr:.4g} = 2^({p.log2_lr:.2f} +- "
                 f"{p.log2_lr_error:.2f}), momentum {p.momentum:.4g}, by rule '{p.rule}'{flat}; extrapolating "
                 + ", ".join(f"{d:+.1f} doublings in {a}" for a, d in p.extrapolation.items()))
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
