"""`mutransfer transfer`: carry a study's best lr and momentum to the target run.

The best settings are read from the proxy shape nearest the target (the largest proxy of the target's
parametrization); the optimum of every other shape is printed beside it with its shift in grid steps, and a
shift of more than one grid step is warned about: then the proxies disagree and transfer is in doubt.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from mutransfer.train.config import ConfigError, apply_overrides, config_from_dict, load_config, load_yaml
from mutransfer.train.tracking import resolve_tracking_uri

from .analysis import Optimum, grids, optimum_per_shape, proxy_size, shifts, verdicts
from .store import (
    DEFAULT_METRIC,
    KEY_TAG,
    ROLE_TAG,
    STUDY_TAG,
    client_for,
    find_study_run,
    latest_per_key,
    load_trials,
)


@dataclass
class TransferPlan:
    study: str
    parent_run_id: str
    source: Optimum
    optima: dict
    shifts: dict
    warnings: list[str]
    target_config: Path
    command: list[str]


def plan_transfer(study: str, target: str, out: str | None = None, metric: str = DEFAULT_METRIC,
                  tracking_uri: str | None = None, experiment: str | None = None, num_gpus: int = 1,
                  overrides: list[str] = ()) -> TransferPlan:
    uri = resolve_tracking_uri(tracking_uri)
    client = client_for(uri)
    parent = find_study_run(client, study, experiment)
    if parent is None:
        raise ValueError(f"no study named {study!r} in the MLflow store at {uri}")
    trials = latest_per_key(load_trials(client, study, experiment))
    optima = optimum_per_shape(trials, metric)
    if not optima:
        raise ValueError(f"study {study!r} has no finished trial with metric {metric!r} (all diverged or missing)")
    target_cfg = load_config(target, list(overrides), check=False)
    parametrization = target_cfg.model.parametrization
    own = [shape for shape in optima if shape[0] == parametrization]
    if not own:
        known = sorted({shape[0] for shape in optima})
        raise ValueError(f"the target uses {parametrization!r} but study {study!r} tuned only {', '.join(known)}")
    source_shape = max(own, key=proxy_size)
    source = optima[source_shape]
    moved = shifts(optima)
    lr_grid, momentum_grid, _ = grids(trials)
    warnings = []
    for p, verdict in verdicts(optima, moved).items():
        if verdict["max_lr_shift"] > 1:
            warnings.append(f"{p}: the optimal lr moves by {verdict['max_lr_shift']} grid steps across proxy shapes "
                            "(more than one): transfer is in doubt for this parametrization")
        if verdict["max_momentum_shift"] > 1:
            warnings.append(f"{p}: the optimal momentum moves by {verdict['max_momentum_shift']} grid steps across "
                            "proxy shapes")

    optimizer = target_cfg.optim.name
    momentum_key = "optim.momentum" if optimizer == "sgd" else "optim.beta1"
    raw = load_yaml(Path(target).read_text(), f"--target {target}") or {}
    raw = apply_overrides(raw, list(overrides) + [f"optim.lr={source.lr!r}", f"{momentum_key}={source.momentum!r}",
                                                  f"optim.weight_decay={source.weight_decay!r}"])
    tracking = raw.setdefault("tracking", {})
    tracking.update(uri=uri, experiment=client.get_experiment(parent.info.experiment_id).name,
                    parent_run_id=parent.info.run_id)
    tracking["tags"] = {**(tracking.get("tags") or {}), STUDY_TAG: study, ROLE_TAG: "target",
                        KEY_TAG: f"target_{Path(target).stem}",
                        "mutransfer.transferred_from": "_".join(map(str, source_shape))}
    config_from_dict(apply_overrides(yaml.safe_load(yaml.safe_dump(raw)), []))  # the result must be valid
    out_path = Path(out) if out else Path(raw.get("run", {}).get("output_dir", "runs/target")) / "target.yaml"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(f"# written by: mutransfer transfer --study {study} --target {target}\n"
                        f"# lr and momentum from proxy {'_'.join(map(str, source_shape))} ({metric} "
                        f"{source.value:.4g}); lr grid {len(lr_grid)} points, momentum grid {len(momentum_grid)}\n"
                        + yaml.safe_dump(raw, sort_keys=False))
    command = ["deepspeed", "--num_gpus", str(num_gpus), "--module", "mutransfer.train", "--config", str(out_path)]
    return TransferPlan(study, parent.info.run_id, source, optima, moved, warnings, out_path, command)


def describe(plan: TransferPlan, metric: str) -> str:
    lines = [f"study {plan.study}: optimum per proxy shape ({metric}; shift in grid steps from the smallest shape)"]
    lines.append(f"  {'parametrization':<16}{'width':>6}{'depth':>6}{'lr':>11}{'momentum':>10}{'value':>10}"
                 f"{'lr shift':>9}{'m shift':>8}")
    for shape, opt in plan.optima.items():
        lr_shift, m_shift = plan.shifts[shape]
        mark = "  <- transferred" if shape == plan.source.shape else ""
        lines.append(f"  {shape[0]:<16}{shape[1]:>6}{shape[2]:>6}{opt.lr:>11.4g}{opt.momentum:>10.3g}"
                     f"{opt.value:>10.4f}{lr_shift:>+9d}{m_shift:>+8d}{mark}")
    lines += [f"warning: {w}" for w in plan.warnings]
    lines.append(f"target config: {plan.target_config} (lr {plan.source.lr:.4g}, momentum {plan.source.momentum:g})")
    lines.append("run it with:  " + " ".join(plan.command))
    return "\n".join(lines)


def launch_target(plan: TransferPlan, launcher: str = "inprocess") -> int:
    """Train the target: in this process, or through the printed deepspeed command."""
    if launcher == "inprocess":
        from mutransfer.train.trainer import EXIT_DIVERGED, train

        result = train(load_config(plan.target_config))
        return EXIT_DIVERGED if result.status == "diverged" else 0
    import subprocess

    command = list(plan.command)
    command[0] = str(Path(sys.executable).parent / "deepspeed")
    return subprocess.call(command)


def check_target_exists(target: str) -> None:
    if not Path(target).is_file():
        raise ConfigError("--target", f"no such file: {target}")
