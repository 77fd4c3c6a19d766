"""The workflow's command line: `mutransfer sweep`, `transfer`, `report`, `ui` and `demo`.

Each command parses its arguments and calls into the study package; what a user can fix is raised there as a
`UserError` (ConfigError, DataError, UsageError), which `mutransfer.cli` prints as one line with exit 2. Modules are imported inside the commands, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mutransfer.errors import UsageError
from mutransfer.launch.slurm import add_sbatch_arguments, sbatch_options

from .store import DEFAULT_METRIC

log = logging.getLogger(__name__)


def mlflow_imports(args: argparse.Namespace) -> None:
    """What every command here imports once it runs: MLflow's client for the store of --tracking-uri."""
    from mutransfer.train.tracking import import_mlflow

    import_mlflow(args.tracking_uri)


def register(subparsers: argparse._SubParsersAction) -> None:
    register_sweep(subparsers)
    register_transfer(subparsers)
    register_report(subparsers)
    register_ui(subparsers)
    register_demo(subparsers)


def register_sweep(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser("sweep", help="run (or resume) every trial of a proxy study, recorded in MLflow")
    s.add_argument("--config", required=True, help="study YAML (see configs/demo_study.yaml)")
    s.add_argument("--launcher", choices=("inprocess", "deepspeed", "torchrun"), default="inprocess")
    s.add_argument("--parallel", type=int, default=None,
                   help="launches at once (deepspeed / torchrun; default 1); with --slurm, array tasks at once")
    s.add_argument("--gpus-per-trial", type=int, default=1)
    s.add_argument("--tracking-uri", default=None)
    s.add_argument("--stack", type=int, default=None,
                   help="train K trials of one shape at a time as one stacked model, in process or one stack per "
                        "launch slot (default: as many as fit in half the free memory of the device; with --slurm "
                        "or --stack-index, every trial of a shape; 1: one trial at a time, one per launch)")
    s.add_argument("--trial-index", type=int, default=None,
                   help="run only trial I of the study (0-based; one task of a --stack 1 SLURM job array)")
    s.add_argument("--stack-index", type=int, default=None,
                   help="run only stack I of the study's array plan (0-based; one task of a SLURM job array; "
                        "pass the array's --stack K too)")
    s.add_argument("--slurm", action="store_true",
                   help="write an sbatch job array, one stack per task (one trial with --stack 1; needs an MLflow "
                        "server), instead of running")
    s.add_argument("--script", default=None, help="where --slurm writes (default: <study output_dir>/sweep.sbatch)")
    add_sbatch_arguments(s)
    s.add_argument("overrides", nargs="*", help="dotted overrides of the study, e.g. study.steps=50")
    s.set_defaults(func=sweep_command, lasting_imports=mlflow_imports)



def register_transfer(subparsers: argparse._SubParsersAction) -> None:
    t = subparsers.add_parser("transfer", help="write (and print or launch) the target run with the study's best settings")
    t.add_argument("--study", required=True)
    t.add_argument("--target", required=True, help="target run config YAML")
    t.add_argument("--out", default=None, help="where to write the target config (default: <target output_dir>/target.yaml)")
    t.add_argument("--metric", default="final/eval_loss")
    t.add_argument("--tracking-uri", default=None)
    t.add_argument("--experiment", default=None)
    t.add_argument("--num-gpus", type=int, default=8, help="GPUs in the printed deepspeed command")
    t.add_argument("--ranks", type=int, default=None,
                   help="data-parallel ranks the target trains on (default --num-gpus, or 1 with --launch --launcher "
                        "inprocess; for several nodes, nodes x GPUs): its global batch is data.batch_size x "
                        "optim.accumulation x ranks")
    t.add_argument("--assume", action="append", default=[], metavar="AXIS=RULE",
                   help="a documented rule for an axis the study did not vary: length=measured|flat|SLOPE, "
                        "batch=measured|sqrt|flat|SLOPE (slopes in log2 lr per doubling; default: measured, "
                        "with its error; docs/results.md)")
    t.add_argument("--keep-beta2-half-life", action="store_true",
                   help="move Adam's beta2 so that its half-life in samples stays the largest proxy's")
    t.add_argument("--from", dest="rule", choices=("trend", "largest"), default="trend",
                   help="trend: extrapolate the fitted optimum's trend to the target's shape (default); "
                        "largest: the best grid point of the largest proxy")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--print", dest="launch", action="store_false", help="only print the command (default)")
    mode.add_argument("--launch", dest="launch", action="store_true", help="train the target now")
    t.add_argument("--launcher", choices=("inprocess", "deepspeed"), default="deepspeed")
    t.add_argument("overrides", nargs="*", help="dotted overrides of the target config")
    t.set_defaults(func=transfer_command, launch=False, lasting_imports=mlflow_imports)



def register_report(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="plot a study's curves and optima, and judge whether the optimum transfers",
        description="Write lr/momentum curves, per-shape heat maps, optima.csv/.md and trials.csv for a "
                    "study, and log them to the study's parent run under report/.")
    parser.add_argument("--study", required=True, help="study name (tag mutransfer.study)")
    parser.add_argument("--out", required=True, help="directory for the plots and tables")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help=f"metric to compare (default {DEFAULT_METRIC})")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    parser.add_argument("--experiment", default=None, help="only look in this MLflow experiment")
    parser.add_argument("--no-log", action="store_true", help="do not log the files to the study's parent run")
    parser.set_defaults(func=report_command, lasting_imports=mlflow_imports)


def register_ui(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ui", help="serve the MLflow UI over the local store, on 127.0.0.1, until Ctrl-C",
        description="Start `mlflow server` on 127.0.0.1 over the local sqlite/file store, print the URLs of the "
                    "study's runs table and of a comparison of its proxies, and stop the server on Ctrl-C or SIGTERM.")
    parser.add_argument("--study", default=None, help="print the URLs of this study's runs and of its proxies' comparison")
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    parser.add_argument("--tracking-uri", default=None,
                        help="local store URI (default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    parser.add_argument("--experiment", default=None, help="the study's MLflow experiment")
    parser.set_defaults(func=ui_command, lasting_imports=mlflow_imports)


def register_demo(subparsers: argparse._SubParsersAction) -> None:
    d = subparsers.add_parser("demo", help="the whole workflow on CPU: synthetic shards, an sp vs "
                              "depth_mup+fle0.5 width study, transfer to a wider and deeper target, report plots")
    d.add_argument("--out", default="demo", help="folder for shards, trials, target and report")
    d.add_argument("--config", default=None, help="study YAML (default: the packaged demo study)")
    d.add_argument("--tracking-uri", default=None)
    d.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="the study's seeds instead of the config's (a study of its own, named by them)")
    d.set_defaults(func=demo_command, lasting_imports=mlflow_imports)


def sweep_command(args: argparse.Namespace) -> int:
    from .config import load_study
    from .sweep import run_sweep

    cfg = load_study(args.config, args.overrides)
    if args.slurm:
        return _write_sweep_array(args, cfg)
    if args.trial_index is not None and (args.parallel or 1) > 1:
        raise UsageError("--trial-index runs one trial: drop --parallel")
    summary = run_sweep(cfg, args.launcher, args.parallel or 1, args.gpus_per_trial, args.tracking_uri,
                        trial_index=args.trial_index, stack=args.stack, stack_index=args.stack_index)
    counts = {s: list(summary.statuses.values()).count(s) for s in sorted(set(summary.statuses.values()))}
    print(f"study {summary.study}: ran {len(summary.ran)}, skipped {len(summary.skipped)} already done; "
          + ", ".join(f"{v} {k}" for k, v in counts.items())
          + (f"; {len(summary.elsewhere)} left to another sweep" if summary.elsewhere else "")
          + f"; MLflow {summary.tracking_uri} "
          f"(parent run {summary.parent_run_id})")
    if summary.failed and summary.interrupted is None:
        log.warning(f"mutransfer sweep: {len(summary.failed)} trial(s) failed (exit 1): {', '.join(summary.failed[:5])}"
                    + (" ..." if len(summary.failed) > 5 else "") + "; run the sweep again to retry them")
    return summary.exit_code


def _write_sweep_array(args: argparse.Namespace, cfg) -> int:
    """`sweep --slurm`: the parent run now, then a job array over the stacks (or, with --stack 1, the trials)
    not yet done."""
    from mutransfer.launch.slurm import sweep_script, write_script

    from .sweep_array import pending_array

    if args.trial_index is not None or args.stack_index is not None:
        raise UsageError("--slurm writes the whole array; --trial-index / --stack-index is what each task runs")
    if args.parallel is not None and args.parallel < 1:
        raise UsageError(f"--parallel must be at least 1, got {args.parallel}")
    if args.stack is not None and args.stack < 1:
        raise UsageError(f"--stack must be at least 1, got {args.stack}")
    if args.launcher != "inprocess" or args.gpus_per_trial != 1:
        raise UsageError("--slurm runs each trial or stack in-process on one GPU of its own array task; drop "
                         "--launcher and --gpus-per-trial (for multi-GPU proxies, use --launcher deepspeed on a node)")
    plan = pending_array(cfg, args.tracking_uri, args.stack)
    total = len(plan.units)
    what = "stacks" if args.stack != 1 else "trials"
    if not plan.pending:
        print(f"study {cfg.study.name}: all {total} {what} are done; nothing to submit")
        return 0
    script = Path(args.script) if args.script else cfg.output_dir.absolute() / "sweep.sbatch"
    text = sweep_script(Path(cfg.source), list(args.overrides), plan.pending, cfg.output_dir.absolute(), plan.uri,
                        sbatch_options(args, f"sweep-{cfg.study.name}"), max_running=args.parallel,
                        stack=args.stack)
    write_script(script, text, cfg.output_dir.absolute() / "slurm")
    done = f" (the other {total - len(plan.pending)} are done)" if len(plan.pending) < total else ""
    print(f"study {cfg.study.name}: wrote {script}: a job array of {len(plan.pending)} of {total} {what}{done}"
          + ("" if args.stack == 1 else f" ({sum(len(plan.units[i]) for i in plan.pending)} trials)")
          + f"; MLflow {plan.uri} (parent run {plan.parent})")
    print(f"submit with: sbatch {script}")
    return 0


def transfer_command(args: argparse.Namespace) -> int:
    from mutransfer.train.tracking import resolve_tracking_uri

    from .store import client_for
    from .study_analysis import StudyAnalysis
    from .transfer import check_target_exists, describe, launch_target, plan_transfer

    check_target_exists(args.target)
    if args.ranks is not None and args.ranks < 1:
        raise UsageError(f"--ranks must be at least 1, got {args.ranks}")
    ranks = args.ranks or (1 if args.launch and args.launcher == "inprocess" else None)  # in-process: one rank
    uri = resolve_tracking_uri(args.tracking_uri)
    study = StudyAnalysis.load(client_for(uri), args.study, args.metric, args.experiment)
    plan = plan_transfer(study, args.target, args.out, uri, args.num_gpus, args.overrides, args.rule, ranks,
                         args.assume, args.keep_beta2_half_life)
    print(describe(plan))
    return launch_target(plan, args.launcher) if args.launch else 0


def demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out, args.config, args.tracking_uri, args.seeds)


def report_command(args: argparse.Namespace) -> int:
    from mutransfer.train.tracking import resolve_tracking_uri

    from . import analysis
    from .report import ARTIFACT_PATH, write_report
    from .store import client_for
    from .study_analysis import StudyAnalysis
    from .ui import local_store_path

    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        _, store = local_store_path(uri)
    except ValueError:  # a server or a database elsewhere: MLflow reports what is wrong with it
        store = None
    if store is not None and not store.exists():  # opening a missing sqlite file would create an empty store
        raise UsageError(f"no MLflow store at {store} ({uri})")
    client = client_for(uri)
    study = StudyAnalysis.load(client, args.study, args.metric, args.experiment)
    written = write_report(client, study, args.out, log_to_parent=not args.no_log)
    print(f"report of study {args.study!r}: {len(written.files)} files in {Path(args.out).resolve()}")
    for file in written.files:
        print(f"  {file}")
    from .holdout import sentence

    for variant, trend in study.trends.items():
        print("  " + analysis.summary_sentence(trend))
        for axis, verdict in trend.verdicts.items():
            print("    " + analysis.axis_sentence(verdict, trend.sizes[axis]))
        print("    " + sentence(study.heldout.get(variant, [])))
    if written.artifact_uri:
        print(f"logged to run {study.parent.info.run_id} under {ARTIFACT_PATH}/ ({written.artifact_uri})")
    return 0


def ui_command(args: argparse.Namespace) -> int:
    from mutransfer.train.tracking import resolve_tracking_uri

    from .store import client_for, find_study_run
    from .ui import local_store_path, serve

    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        _, path = local_store_path(uri)
    except ValueError as err:
        raise UsageError(f"cannot serve {uri}: {err}") from None
    if not path.exists():  # checked first: opening a missing sqlite file would create an empty store
        raise UsageError(f"no MLflow store at {path} ({uri})")
    client = client_for(uri)
    if args.study and find_study_run(client, args.study, args.experiment) is None:
        raise UsageError(f"no study named {args.study!r} in the MLflow store at {uri}"
                         + (f", experiment {args.experiment!r}" if args.experiment else ""))
    return serve(uri, client, args.port, args.study, args.experiment)
