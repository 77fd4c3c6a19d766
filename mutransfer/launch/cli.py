"""`mutransfer launch`: the command line of multi-node training (DeepSpeed's launcher, --no-ssh, SLURM)."""

from __future__ import annotations

import argparse

from .slurm import add_sbatch_arguments, sbatch_options


def register(subparsers: argparse._SubParsersAction) -> None:
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
    add_sbatch_arguments(n)
    n.add_argument("overrides", nargs="*", help="dotted overrides of the run config")
    n.set_defaults(func=launch_command)



def launch_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mutransfer.errors import UsageError

    from . import multinode

    if args.launcher not in multinode.DEEPSPEED_LAUNCHERS:
        raise UsageError(f"--launcher must be one of {', '.join(multinode.DEEPSPEED_LAUNCHERS)}, got {args.launcher!r}")
    if args.node_rank is not None and not args.no_ssh:
        raise UsageError("--node-rank goes with --no-ssh")
    hosts = None
    if args.hostfile:
        hosts = multinode.select_hosts(multinode.read_hostfile(args.hostfile), args.num_nodes, args.gpus_per_node)
    elif not args.slurm:
        raise UsageError("--hostfile is required (or --slurm, where the allocation names the nodes)")
    if args.slurm:
        from .slurm import RESUME_PIN, train_script, write_script

        launch = multinode.prepare_train_launch(args.config, args.overrides, extra_pins=(RESUME_PIN,))
        num_nodes = args.num_nodes or (len(hosts) if hosts else None)
        gpus = args.gpus_per_node or (hosts[0].slots if hosts else None)
        if not num_nodes or not gpus:
            raise UsageError("--slurm needs --num-nodes and --gpus-per-node (or a --hostfile to count them)")
        script = Path(args.script) if args.script else launch.output_dir / "train.sbatch"
        text = train_script(launch, num_nodes, gpus, sbatch_options(args, f"train-{launch.output_dir.name}"),
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
            raise UsageError(f"--node-rank {args.node_rank}: there are {len(commands)} nodes, 0-{len(commands) - 1}")
        if not args.print_only:
            if args.node_rank is None:
                raise UsageError("--no-ssh runs one node's command per machine: add --node-rank I (or --print)")
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
