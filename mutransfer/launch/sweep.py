"""`mutransfer sweep`: run every trial of a proxy study and record it in MLflow.

The study is one MLflow parent run; each trial is a child run tagged with its key, shape and grid point.
Running the same command again resumes: trials whose child run finished or diverged are skipped. Trials run
in this process one after another (CPU, small proxies), or as separate `deepspeed` / `torchrun` launches,
`--parallel K` at a time, each pinned to its own `--gpus-per-trial G` GPUs. `--trial-index I` runs only
trial I (in the order of `StudyConfig.trials()`): one task of a SLURM job array (`mutransfer sweep --slurm`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm import tqdm

from mutransfer.train.config import RunConfig, apply_overrides, config_from_dict
from mutransfer.train.tracking import flatten, resolve_tracking_uri, training_experiment_id

from .store import (
    KEY_TAG,
    ROLE_TAG,
    STATUS_TAG,
    STUDY_TAG,
    client_for,
    find_study_run,
    latest_per_key,
    load_trials,
)
from .study import StudyConfig, TrialSpec

LAUNCHERS = ("inprocess", "deepspeed", "torchrun")
DONE = ("finished", "diverged")


@dataclass
class SweepSummary:
    study: str
    parent_run_id: str
    tracking_uri: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)


def ensure_study_run(client, cfg: StudyConfig) -> str:
    """The study's parent run id, created (with the study config as params) on first use."""
    experiment_id = training_experiment_id(client, cfg.study.experiment)  # marks stores made before, too
    found = find_study_run(client, cfg.study.name, cfg.study.experiment)
    if found is not None:
        return found.info.run_id
    run = client.create_run(experiment_id, run_name=f"study {cfg.study.name}",
                            tags={STUDY_TAG: cfg.study.name, ROLE_TAG: "study"})
    from mlflow.entities import Param

    raw = yaml.safe_load(Path(cfg.source).read_text()) if cfg.source else {}
    params = [Param(k, v[:6000]) for k, v in flatten(raw).items()]
    params.append(Param("trials", str(len(cfg.trials()))))
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id


def trial_config(cfg: StudyConfig, trial: TrialSpec, parent_run_id: str, tracking_uri: str) -> RunConfig:
    base = cfg.base_run_config().to_dict()
    raw = apply_overrides(base, trial.overrides(base["optim"]["name"]) + [
        f"run.steps={cfg.study.steps}", "run.epochs=null", f"run.output_dir={cfg.output_dir / trial.key}",
        "run.progress=false",
    ])
    raw["tracking"].update(uri=tracking_uri, experiment=cfg.study.experiment, parent_run_id=parent_run_id,
                           run_name=trial.key)
    raw["tracking"]["tags"] = {**raw["tracking"].get("tags", {}), STUDY_TAG: cfg.study.name, KEY_TAG: trial.key,
                               ROLE_TAG: "proxy", "mutransfer.weight_decay": repr(trial.weight_decay),
                               "mutransfer.seed": str(trial.seed)}
    return config_from_dict(raw)


def _mark_abandoned(client, trials) -> None:
    """Child runs left RUNNING by a killed sweep are closed as failed before their trial runs again."""
    for trial in trials:
        if trial.status not in DONE + ("failed",):
            client.set_tag(trial.run_id, STATUS_TAG, "failed")
            client.set_terminated(trial.run_id, "KILLED")


def launch_command(launcher: str, config_path: Path, gpus: list[int], port: int) -> tuple[list[str], dict[str, str]]:
    """The command that trains one trial on `gpus` (CPU: that many processes)."""
    env = dict(os.environ)
    bin_dir = Path(sys.executable).parent
    count = max(1, len(gpus))
    if launcher == "deepspeed":
        import torch

        where = ["--include", "localhost:" + ",".join(map(str, gpus))] if torch.cuda.is_available() else \
            ["--num_gpus", str(count)]
        cmd = [str(bin_dir / "deepspeed"), *where, "--master_port", str(port), "--module", "mutransfer.train",
               "--config", str(config_path)]
    elif launcher == "torchrun":
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        cmd = [str(bin_dir / "torchrun"), "--nproc_per_node", str(count), "--master_port", str(port),
               "-m", "mutransfer.train", "--config", str(config_path)]
    else:
        raise ValueError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    return cmd, env


def select_trials(cfg: StudyConfig, trial_index: int | None = None) -> list[TrialSpec]:
    """Every trial of the study, or just the one at `trial_index`."""
    trials = cfg.trials()
    if trial_index is None:
        return trials
    if not 0 <= trial_index < len(trials):
        raise ValueError(f"--trial-index {trial_index}: study {cfg.study.name} has {len(trials)} trials, "
                         f"indices 0-{len(trials) - 1}")
    return [trials[trial_index]]


def check_shared_tracking(uri: str) -> None:
    """Array tasks write to MLflow at the same time from many nodes: a sqlite or file store cannot take
    that (locks on network filesystems), a tracking server (or a database server behind one) can."""
    from mutransfer.train.tracking import server_reachable

    if not uri.startswith(("http://", "https://", "databricks")):
        raise ValueError(f"--slurm needs an MLflow tracking server, got {uri!r}: start one (`mlflow server "
                         "--backend-store-uri ... --host 0.0.0.0`) and pass --tracking-uri http://HOST:PORT or "
                         "set MLFLOW_TRACKING_URI")
    if not server_reachable(uri):
        raise ValueError(f"the MLflow server {uri} does not answer (GET /health)")


def pending_trials(cfg: StudyConfig, tracking_uri: str | None = None) -> tuple[str, list[int], str]:
    """(parent run id, indices of the trials not yet finished or diverged, tracking URI) for a job array.

    The study's parent run is created here, once: array tasks that start together would each create one.
    """
    uri = resolve_tracking_uri(tracking_uri)
    check_shared_tracking(uri)
    client = client_for(uri)
    parent = ensure_study_run(client, cfg)
    done = {t.key for t in latest_per_key(load_trials(client, cfg.study.name, cfg.study.experiment))
            if t.status in DONE}
    return parent, [i for i, trial in enumerate(cfg.trials()) if trial.key not in done], uri


def run_sweep(cfg: StudyConfig, launcher: str = "inprocess", parallel: int = 1, gpus_per_trial: int = 1,
              tracking_uri: str | None = None, progress: bool = True, trial_index: int | None = None) -> SweepSummary:
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if parallel < 1 or gpus_per_trial < 1:
        raise ValueError("--parallel and --gpus-per-trial must be at least 1")
    if launcher == "inprocess" and parallel > 1:
        raise ValueError("--parallel needs --launcher deepspeed or torchrun (in-process trials run one by one)")
    selected = select_trials(cfg, trial_index)
    uri = resolve_tracking_uri(tracking_uri)
    client = client_for(uri)
    parent = ensure_study_run(client, cfg)
    existing = latest_per_key(load_trials(client, cfg.study.name, cfg.study.experiment))
    done = {t.key: t.status for t in existing if t.status in DONE}
    abandoned = [t for t in existing if t.key not in done]
    if trial_index is not None:  # other array tasks may be running the other trials right now
        abandoned = [t for t in abandoned if t.key == selected[0].key]
    _mark_abandoned(client, abandoned)
    summary = SweepSummary(cfg.study.name, parent, uri)
    todo = []
    for trial in selected:
        if trial.key in done:
            summary.skipped.append(trial.key)
            summary.statuses[trial.key] = done[trial.key]
        else:
            todo.append(trial)
    if summary.skipped:
        print(f"study {cfg.study.name}: {len(summary.skipped)} trial(s) already done, {len(todo)} to run",
              flush=True)
    bar = tqdm(total=len(todo), desc=f"study {cfg.study.name}", disable=not progress, dynamic_ncols=True)
    if launcher == "inprocess":
        from mutransfer.train.trainer import train

        for trial in todo:
            bar.set_postfix_str(trial.key)
            try:
                result = train(trial_config(cfg, trial, parent, uri))
                status = result.status
            except Exception as err:  # one broken trial must not end the study
                print(f"trial {trial.key} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                status = "failed"
            summary.ran.append(trial.key)
            summary.statuses[trial.key] = status
            bar.update(1)
    else:
        _run_launched(cfg, todo, parent, uri, launcher, parallel, gpus_per_trial, summary, bar)
    bar.close()
    return summary


def _run_launched(cfg: StudyConfig, todo: list[TrialSpec], parent: str, uri: str, launcher: str, parallel: int,
                  gpus_per_trial: int, summary: SweepSummary, bar) -> None:
    """Up to `parallel` launches at once, each on its own block of GPUs."""
    from mutransfer.netutil import free_port
    from mutransfer.train.trainer import EXIT_DIVERGED

    free_slots = [list(range(i * gpus_per_trial, (i + 1) * gpus_per_trial)) for i in range(parallel)]
    running: dict[subprocess.Popen, tuple[TrialSpec, list[int]]] = {}
    queue = list(todo)
    while queue or running:
        while queue and free_slots:
            trial, gpus = queue.pop(0), free_slots.pop(0)
            folder = cfg.output_dir / trial.key
            folder.mkdir(parents=True, exist_ok=True)
            config_path = folder / "trial.yaml"
            config_path.write_text(yaml.safe_dump(trial_config(cfg, trial, parent, uri).to_dict(), sort_keys=False))
            cmd, env = launch_command(launcher, config_path, gpus, free_port())
            log = open(folder / "launch.log", "w")
            running[subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)] = (trial, gpus)
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            trial, gpus = running.pop(proc)
            free_slots.append(gpus)
            status = {0: "finished", EXIT_DIVERGED: "diverged"}.get(proc.returncode, "failed")
            if status == "failed":
                print(f"trial {trial.key} failed (exit {proc.returncode}); see "
                      f"{cfg.output_dir / trial.key / 'launch.log'}", file=sys.stderr, flush=True)
            summary.ran.append(trial.key)
            summary.statuses[trial.key] = status
            bar.update(1)
