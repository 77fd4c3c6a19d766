"""`mutransfer sweep`, `mutransfer transfer`, `mutransfer launch` and `mutransfer demo`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser("sweep", help="run (or resume) every trial of a proxy study, recorded in MLflow")
    s.add_argument("--config", required=True, help="study YAML (see configs/demo_study.yaml)")
    s.add_argument("--launcher", choices=("inprocess", "deepspeed", "torchrun"), default="inprocess")
    s.add_argument("--parallel", type=int, default=None,
                   help="launches at once (deepspeed / torchrun; default 1); with --slurm, array tasks at once")
    s.add_argument("--gpus-per-trial", type=int, default=1)
    s.add_argument("--tracking-uri", default=None)
    s.add_argument("--trial-index", type=int, default=None,
                   help="run only trial I of the study (0-based; one task of a SLURM job array)")
    s.add_argument("--slurm", action="store_true",
                   help="write an sbatch job array, one trial per task (needs an MLflow server), instead of running")
    s.add_argument("--script", default=None, help="where --slurm writes (default: <study output_dir>/sweep.sbatch)")
    _add_slurm_options(s)
    s.add_argument("overrides", nargs="*", help="dotted overrides of the study, e.g. study.steps=50")
    s.set_defaults(func=sweep_command)

    n = subparsers.add_parser("launch", help="train on several nodes: DeepSpeed's multi-node launcher over a "
                              "hostfile, per-node --no_ssh commands, or an sbatch script (--slurm)")
    n.add_argument("--config", required=True, help="run config YAML")
    n.add_argument("--hostfile", default=None, help="MPI-style hostfile, one 'HOST slots=N' line per node")
    n.add_argument("--num-nodes", type=int, default=None, help="use the first N hosts (default: all)")
    n.add_argument("--gpus-per-node", type=int, default=None, help="processes per node (default: the slots)")
    n.add_argument("--master-addr", default=None,
                   help="address of node 0 (default: DeepSpeed asks it over ssh; with --no-ssh its hostfile name)")
    n.add_argument("--master-port", type=int, default=None, help="default 29500 (--slurm: one per job id)")
    n.add_argument("--launcher", default="pdsh", help="DeepSpeed's multi-node backend: pdsh (ssh), openmpi, "
                   "mvapich, mpich, impi, slurm")
    n.add_argument("--no-ssh", action="store_true",
                   help="DeepSpeed's per-node mode: one command per node, each with its --node_rank")
    n.add_argument("--node-rank", type=int, default=None, help="with --no-ssh: the node this machine is")
    n.add_argument("--print", dest="print_only", action="store_true", help="only print the command(s)")
    n.add_argument("--slurm", action="store_true", help="write an sbatch script (needs --num-nodes and "
                   "--gpus-per-node, or a hostfile to take them from)")
    n.add_argument("--script", default=None, help="where --slurm writes (default: <run.output_dir>/train.sbatch)")
    _add_slurm_options(n)
    n.add_argument("overrides", nargs="*", help="dotted overrides of the run config")
    n.set_defaults(func=launch_command)

    t = subparsers.add_parser("transfer", help="write (and print or launch) the target run with the study's best settings")
    t.add_argument("--study", required=True)
    t.add_argument("--target", required=True, help="target run config YAML")
    t.add_argument("--out", default=None, help="where to write the target config (default: <target output_dir>/target.yaml)")
    t.add_argument("--metric", default="final/eval_loss")
    t.add_argument("--tracking-uri", default=None)
    t.add_argument("--experiment", default=None)
    t.add_argument("--num-gpus", type=int, default=8, help="GPUs in the printed deepspeed command")
    t.add_argument("--from", dest="rule", choices=("trend", "largest"), default="trend",
                   help="trend: extrapolate the fitted optimum's trend to the target's shape (default); "
                        "largest: the best grid point of the largest proxy")
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


def _add_slurm_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sbatch settings (with --slurm)")
    group.add_argument("--job-name", default=None)
    group.add_argument("--partition", default=None)
    group.add_argument("--account", default=None)
    group.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    group.add_argument("--cpus-per-task", type=int, default=None)
    group.add_argument("--signal-seconds", type=int, default=120,
                       help="SIGTERM this long before the time limit, to checkpoint and requeue")
    group.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                       help="a further sbatch option, e.g. --sbatch=--qos=high (repeatable)")


def _slurm_options(args: argparse.Namespace, default_name: str):
    from .slurm import SlurmOptions

    return SlurmOptions(job_name=args.job_name or default_name, partition=args.partition, account=args.account,
                        time=args.time, cpus_per_task=args.cpus_per_task, signal_seconds=args.signal_seconds,
                        extra=list(args.sbatch))


def sweep_command(args: argparse.Namespace) -> int:
    from mutransfer.cli import UsageError
    from mutransfer.train.config import ConfigError

    from .study import load_study
    from .sweep import run_sweep

    try:
        cfg = load_study(args.config, args.overrides)
        if args.slurm:
            return _write_sweep_array(args, cfg)
        if args.trial_index is not None and (args.parallel or 1) > 1:
            raise ValueError("--trial-index runs one trial: drop --parallel")
        summary = run_sweep(cfg, args.launcher, args.parallel or 1, args.gpus_per_trial, args.tracking_uri,
                            trial_index=args.trial_index)
    except (ConfigError, ValueError) as err:
        raise UsageError(str(err)) from err
    counts = {s: list(summary.statuses.values()).count(s) for s in sorted(set(summary.statuses.values()))}
    print(f"study {summary.study}: ran {len(summary.ran)}, skipped {len(summary.skipped)} already done; "
          + ", ".join(f"{v} {k}" for k, v in counts.items()) + f"; MLflow {summary.tracking_uri} "
          f"(parent run {summary.parent_run_id})")
    if summary.failed and summary.interrupted is None:
        import sys

        print(f"mutransfer sweep: {len(summary.failed)} trial(s) failed (exit 1): {', '.join(summary.failed[:5])}"
              + (" ..." if len(summary.failed) > 5 else "") + "; run the sweep again to retry them", file=sys.stderr)
    return summary.exit_code


def _write_sweep_array(args: argparse.Namespace, cfg) -> int:
    """`sweep --slurm`: the parent run now, then a job array over the trials not yet done."""
    from pathlib import Path

    from .slurm import sweep_script, write_script
    from .sweep import pending_trials

    if args.trial_index is not None:
        raise ValueError("--slurm writes the whole array; --trial-index is what each task runs")
    if args.parallel is not None and args.parallel < 1:
        raise ValueError(f"--parallel must be at least 1, got {args.parallel}")
    if args.launcher != "inprocess" or args.gpus_per_trial != 1:
        raise ValueError("--slurm runs each trial in-process on one GPU of its own array task; drop --launcher "
                         "and --gpus-per-trial (for multi-GPU proxies, use --launcher deepspeed on a node)")
    parent, indices, uri = pending_trials(cfg, args.tracking_uri)
    total = len(cfg.trials())
    if not indices:
        print(f"study {cfg.study.name}: all {total} trials are done; nothing to submit")
        return 0
    script = Path(args.script) if args.script else cfg.output_dir.absolute() / "sweep.sbatch"
    text = sweep_script(Path(cfg.source), list(args.overrides), indices, cfg.output_dir.absolute(), uri,
                        _slurm_options(args, f"sweep-{cfg.study.name}"), max_running=args.parallel)
    write_script(script, text, cfg.output_dir.absolute() / "slurm")
    done = f" (the other {total - len(indices)} are done)" if len(indices) < total else ""
    print(f"study {cfg.study.name}: wrote {script}: a job array of {len(indices)} of {total} trials{done}; "
          f"MLflow {uri} (parent run {parent})")
    print(f"submit with: sbatch {script}")
    return 0


def launch_command(args: argparse.Namespace) -> int:
    from mutransfer.cli import UsageError
    from mutransfer.train.config import ConfigError

    try:
        return _launch(args)
    except (ConfigError, ValueError) as err:
        raise UsageError(str(err)) from err


def _launch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import multinode

    if args.launcher not in multinode.DEEPSPEED_LAUNCHERS:
        raise ValueError(f"--launcher must be one of {', '.join(multinode.DEEPSPEED_LAUNCHERS)}, got {args.launcher!r}")
    if args.node_rank is not None and not args.no_ssh:
        raise ValueError("--node-rank goes with --no-ssh")
    hosts = None
    if args.hostfile:
        hosts = multinode.select_hosts(multinode.read_hostfile(args.hostfile), args.num_nodes, args.gpus_per_node)
    elif not args.slurm:
        raise ValueError("--hostfile is required (or --slurm, where the allocation names the nodes)")
    if args.slurm:
        from .slurm import RESUME_PIN, train_script, write_script

        launch = multinode.prepare_train_launch(args.config, args.overrides, extra_pins=(RESUME_PIN,))
        num_nodes = args.num_nodes or (len(hosts) if hosts else None)
        gpus = args.gpus_per_node or (hosts[0].slots if hosts else None)
        if not num_nodes or not gpus:
            raise ValueError("--slurm needs --num-nodes and --gpus-per-node (or a --hostfile to count them)")
        script = Path(args.script) if args.script else launch.output_dir / "train.sbatch"
        text = train_script(launch, num_nodes, gpus, _slurm_options(args, f"train-{launch.output_dir.name}"),
                            args.master_port)
        write_script(script, text, launch.output_dir)
        print(f"wrote {script}: {num_nodes} node(s) x {gpus} GPU(s), requeued on preemption, resumes from "
              f"{launch.output_dir}/checkpoints")
        print(f"submit with: sbatch {script}")
        return 0
    launch = multinode.prepare_train_launch(args.config, args.overrides)
    port = args.master_port or multinode.DEFAULT_MASTER_PORT
    if args.no_ssh:
        commands = multinode.node_commands(launch, args.hostfile, hosts, args.gpus_per_node, args.master_addr, port)
        if args.node_rank is not None and not 0 <= args.node_rank < len(commands):
            raise ValueError(f"--node-rank {args.node_rank}: there are {len(commands)} nodes, 0-{len(commands) - 1}")
        if not args.print_only:
            if args.node_rank is None:
                raise ValueError("--no-ssh runs one node's command per machine: add --node-rank I (or --print)")
            return multinode.run_command(commands[args.node_rank])
        print(multinode.shared_paths_note(launch))
        for rank, command in enumerate(commands):
            if args.node_rank is None or rank == args.node_rank:
                print(f"# node {rank} ({hosts[rank].name}):")
                print(multinode.shell_line(command))
        return 0
    command = multinode.multinode_command(launch, args.hostfile, args.num_nodes, args.gpus_per_node,
                                          args.master_addr, port, args.launcher)
    if args.print_only:
        print(multinode.shared_paths_note(launch))
        print(multinode.shell_line(command))
        return 0
    return multinode.run_command(command)


def transfer_command(args: argparse.Namespace) -> int:
    from mutransfer.cli import UsageError
    from mutransfer.train.config import ConfigError

    from .transfer import check_target_exists, describe, launch_target, plan_transfer

    try:
        check_target_exists(args.target)
        plan = plan_transfer(args.study, args.target, args.out, args.metric, args.tracking_uri, args.experiment,
                             args.num_gpus, args.overrides, args.rule)
    except (ConfigError, ValueError) as err:
        raise UsageError(str(err)) from err
    print(describe(plan, args.metric))
    return launch_target(plan, args.launcher) if args.launch else 0


def demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out, args.config, args.tracking_uri)
