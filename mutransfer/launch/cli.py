"""`mutransfer sweep`, `mutransfer transfer` and `mutransfer demo`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser("sweep", help="run (or resume) every trial of a proxy study, recorded in MLflow")
    s.add_argument("--config", required=True, help="study YAML (see configs/demo_study.yaml)")
    s.add_argument("--launcher", choices=("inprocess", "deepspeed", "torchrun"), default="inprocess")
    s.add_argument("--parallel", type=int, default=1, help="launches at once (deepspeed / torchrun)")
    s.add_argument("--gpus-per-trial", type=int, default=1)
    s.add_argument("--tracking-uri", default=None)
    s.add_argument("overrides", nargs="*", help="dotted overrides of the study, e.g. study.steps=50")
    s.set_defaults(func=sweep_command)

    t = subparsers.add_parser("transfer", help="write (and print or launch) the target run with the study's best settings")
    t.add_argument("--study", required=True)
    t.add_argument("--target", required=True, help="target run config YAML")
    t.add_argument("--out", default=None, help="where to write the target config (default: <target output_dir>/target.yaml)")
    t.add_argument("--metric", default="final/eval_loss")
    t.add_argument("--tracking-uri", default=None)
    t.add_argument("--experiment", default=None)
    t.add_argument("--num-gpus", type=int, default=8, help="GPUs in the printed deepspeed command")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--print", dest="launch", action="store_false", help="only print the command (default)")
    mode.add_argument("--launch", dest="launch", action="store_true", help="train the target now")
    t.add_argument("--launcher", choices=("inprocess", "deepspeed"), default="deepspeed")
    t.add_argument("overrides", nargs="*", help="dotted overrides of the target config")
    t.set_defaults(func=transfer_command, launch=False)

    d = subparsers.add_parser("demo", help="the whole workflow on CPU: synthetic shards, a mup vs depth_mup "
                              "study, transfer to a wider and deeper target, report plots")
    d.add_argument("--out", default="demo", help="folder for shards, trials, target and report")
    d.add_argument("--config", default=None, help="study YAML (default: the packaged demo study)")
    d.add_argument("--tracking-uri", default=None)
    d.set_defaults(func=demo_command)


def sweep_command(args: argparse.Namespace) -> int:
    from mutransfer.cli import UsageError
    from mutransfer.train.config import ConfigError

    from .study import load_study
    from .sweep import run_sweep

    try:
        cfg = load_study(args.config, args.overrides)
        summary = run_sweep(cfg, args.launcher, args.parallel, args.gpus_per_trial, args.tracking_uri)
    except (ConfigError, ValueError) as err:
        raise UsageError(str(err)) from err
    counts = {s: list(summary.statuses.values()).count(s) for s in sorted(set(summary.statuses.values()))}
    print(f"study {summary.study}: ran {len(summary.ran)}, skipped {len(summary.skipped)} already done; "
          + ", ".join(f"{v} {k}" for k, v in counts.items()) + f"; MLflow {summary.tracking_uri} "
          f"(parent run {summary.parent_run_id})")
    return 0


def transfer_command(args: argparse.Namespace) -> int:
    from mutransfer.cli import UsageError
    from mutransfer.train.config import ConfigError

    from .transfer import check_target_exists, describe, launch_target, plan_transfer

    try:
        check_target_exists(args.target)
        plan = plan_transfer(args.study, args.target, args.out, args.metric, args.tracking_uri, args.experiment,
                             args.num_gpus, args.overrides)
    except (ConfigError, ValueError) as err:
        raise UsageError(str(err)) from err
    print(describe(plan, args.metric))
    return launch_target(plan, args.launcher) if args.launch else 0


def demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out, args.config, args.tracking_uri)
