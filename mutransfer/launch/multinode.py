"""`mutransfer launch`: one training run on several nodes, through DeepSpeed's own multi-node launcher.

Three ways, none of them a process manager of ours:

- DeepSpeed's runner with a hostfile (`--launcher pdsh`, the default, or openmpi / mvapich / mpich / impi /
  slurm): one command on the first node starts every node over ssh.
- `--no-ssh`: DeepSpeed's per-node mode. The same command runs on every node with its own `--node_rank`;
  we print one line per node (or run the line of `--node-rank I` here).
- `--slurm`: an sbatch script (see `mutransfer.launch.slurm`), one task per node, requeued on preemption.

Every node must see the same paths: the config, the venv, `run.output_dir` (checkpoints are written there by
every rank and resumed from there) and the shards (shared storage, or `pipe:` / fsspec URLs). So the command
carries the config and the venv's `deepspeed` as absolute paths and pins `run.output_dir` and `tracking.uri`
as resolved here, in this directory and environment: the command means the same in any node's shell (a
`--no-ssh` line is typed into each node's own shell; DeepSpeed's pdsh runner forwards only some variables).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mutransfer.errors import UsageError
from mutransfer.train.config import RunConfig, load_config
from mutransfer.train.tracking import resolve_tracking_uri

# DeepSpeed's multi-node backends (deepspeed.launcher.constants; not imported: deepspeed is slow to import)
DEEPSPEED_LAUNCHERS = ("pdsh", "openmpi", "mvapich", "mpich", "impi", "slurm")
DEFAULT_MASTER_PORT = 29500  # torch.distributed's default, as DeepSpeed's runner uses
_HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int  # GPUs (processes) on that node


@dataclass
class TrainLaunch:
    """What every node runs: `python -m mutransfer.train --config CONFIG OVERRIDES...`."""

    config: Path  # absolute
    overrides: list[str]  # the user's, then the pinned output_dir and tracking URI
    output_dir: Path  # absolute
    tracking_uri: str
    run_config: RunConfig

    def train_args(self) -> list[str]:
        return ["--module", "mutransfer.train", "--config", str(self.config), *self.overrides]


def read_hostfile(path: str | os.PathLike) -> list[Host]:
    """Hosts of an MPI-style hostfile (`worker-0 slots=8` per line; `#` comments), as DeepSpeed reads it."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--hostfile: no such file: {path}")
    hosts: list[Host] = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOSTFILE_LINE.match(line)
        if not match:
            raise UsageError(f"--hostfile {path}, line {number}: {raw.strip()!r} is not 'HOST slots=N'")
        host = Host(match.group(1), int(match.group(2)))
        if host.slots < 1:
            raise UsageError(f"--hostfile {path}, line {number}: {host.name} needs slots >= 1")
        if any(h.name == host.name for h in hosts):
            raise UsageError(f"--hostfile {path}, line {number}: {host.name} is listed twice")
        hosts.append(host)
    if not hosts:
        raise UsageError(f"--hostfile {path} lists no hosts")
    return hosts


def select_hosts(hosts: list[Host], num_nodes: int | None, gpus_per_node: int | None) -> list[Host]:
    """The first `num_nodes` hosts (DeepSpeed's --num_nodes), each with `gpus_per_node` processes."""
    if num_nodes is not None:
        if num_nodes < 1:
            raise UsageError(f"--num-nodes must be at least 1, got {num_nodes}")
        if num_nodes > len(hosts):
            raise UsageError(f"--num-nodes {num_nodes}: the hostfile lists only {len(hosts)} host(s)")
        hosts = hosts[:num_nodes]
    if gpus_per_node is not None:
        if gpus_per_node < 1:
            raise UsageError(f"--gpus-per-node must be at least 1, got {gpus_per_node}")
        short = [h for h in hosts if h.slots < gpus_per_node]
        if short:
            raise UsageError(f"--gpus-per-node {gpus_per_node}: {short[0].name} has only {short[0].slots} slot(s)")
        hosts = [Host(h.name, gpus_per_node) for h in hosts]
    return hosts


def prepare_train_launch(config: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                         extra_pins: tuple[str, ...] = ()) -> TrainLaunch:
    """Validate the run config (ConfigError names a bad key) and pin what every node must agree on."""
    cfg = load_config(config, list(overrides))
    output_dir = Path(cfg.run.output_dir).absolute()
    uri = resolve_tracking_uri(cfg.tracking.uri)
    pins = [f"run.output_dir={output_dir}", f"tracking.uri={uri}", *extra_pins]
    pinned_keys = {pin.split("=", 1)[0] for pin in pins}
    kept = [o for o in overrides if o.split("=", 1)[0].strip() not in pinned_keys]  # their values are in the pins
    return TrainLaunch(Path(config).absolute(), [*kept, *pins], output_dir, uri, cfg)


def deepspeed_executable() -> str:
    """The venv's `deepspeed`, by absolute path: remote shells have neither our PATH nor an activated venv."""
    return str(Path(sys.executable).parent / "deepspeed")


def multinode_command(launch: TrainLaunch, hostfile: str | os.PathLike, num_nodes: int | None = None,
                      gpus_per_node: int | None = None, master_addr: str | None = None,
                      master_port: int = DEFAULT_MASTER_PORT, launcher: str = "pdsh") -> list[str]:
    """DeepSpeed's runner over a hostfile: run once, on the first node; it starts the others."""
    if launcher not in DEEPSPEED_LAUNCHERS:
        raise UsageError(f"--launcher must be one of {', '.join(DEEPSPEED_LAUNCHERS)}, got {launcher!r}")
    command = [deepspeed_executable(), "--hostfile", str(Path(hostfile).absolute()), "--launcher", launcher]
    if num_nodes is not None:
        command += ["--num_nodes", str(num_nodes)]
    if gpus_per_node is not None:
        command += ["--num_gpus", str(gpus_per_node)]
    if master_addr:  # without it DeepSpeed asks the first host over ssh (`hostname -I`)
        command += ["--master_addr", master_addr]
    return [*command, "--master_port", str(master_port), *launch.train_args()]


def node_commands(launch: TrainLaunch, hostfile: str | os.PathLike, hosts: list[Host],
                  gpus_per_node: int | None = None, master_addr: str | None = None,
                  master_port: int = DEFAULT_MASTER_PORT) -> list[list[str]]:
    """DeepSpeed's `--no_ssh` mode: the command of each node, in node-rank order (node i runs entry i).

    The hostfile still defines the world (node order = rank order, slots = processes per node); DeepSpeed
    only reads it, so its names need not resolve. The master is node 0; its address must be reachable from
    every node (by default the first host's name).
    """
    address = master_addr or hosts[0].name
    commands = []
    for rank in range(len(hosts)):
        command = [deepspeed_executable(), "--hostfile", str(Path(hostfile).absolute()), "--no_ssh",
                   "--node_rank", str(rank), "--num_nodes", str(len(hosts))]
        if gpus_per_node is not None:
            command += ["--num_gpus", str(gpus_per_node)]
        command += ["--master_addr", address, "--master_port", str(master_port), *launch.train_args()]
        commands.append(command)
    return commands


def shell_line(command: list[str], cwd: str | os.PathLike | None = None) -> str:
    """One line to paste into a node's shell, starting in the launch directory (relative data paths)."""
    line = shlex.join(command)
    return f"cd {shlex.quote(str(Path(cwd or Path.cwd()).absolute()))} && {line}"


def shared_paths_note(launch: TrainLaunch) -> str:
    """What every node must see at the same path; printed with the commands."""
    cfg = launch.run_config
    paths = [f"config {launch.config}", f"run.output_dir {launch.output_dir}",
             f"venv {Path(sys.executable).parent.parent}"]
    for key in ("shards_dir", "train_shards", "eval_shards"):
        value = getattr(cfg.data, key)
        if value:
            paths.append(f"data.{key} {value}")
    if launch.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in launch.tracking_uri:
        paths.append(f"tracking.uri {launch.tracking_uri} (only rank 0 writes it; an MLflow server is simpler)")
    return "# every node must see the same: " + "; ".join(paths)


def run_command(command: list[str]) -> int:
    """Run in the foreground with this terminal; the exit code is DeepSpeed's."""
    return subprocess.run(command).returncode
