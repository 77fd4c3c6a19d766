"""The one `mutransfer` command. Each part of the package registers its own subcommands.

A part contributes a module with `register(subparsers)` that adds its parsers and sets `func` (called with
the parsed args; its return value is the exit code). Only the module of the command being run is imported,
so `mutransfer --help` is instant and `mutransfer ui` does not hold torch in memory while it waits.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import sys
from typing import NoReturn

from mutransfer.errors import UserError
from mutransfer.logs import configure_logging
from mutransfer.process import run_entry_point

log = logging.getLogger(__name__)

# command -> (module that registers it, one-line help shown by `mutransfer --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("mutransfer.models.cli", "list the model zoo"),
    "coord-check": ("mutransfer.models.cli", "coordinate check: activation size per layer across widths or depths"),
    "shards": ("mutransfer.data.cli", "write and inspect webdataset shard sets"),
    "train": ("mutransfer.train.cli", "train one run (one process; `deepspeed --module mutransfer.train` for many)"),
    "export": ("mutransfer.train.cli", "write a run's consolidated fp32 weights as safetensors or timm"),
    "sweep": ("mutransfer.study.cli", "run (or resume) every trial of a proxy study, recorded in MLflow"),
    "transfer": ("mutransfer.study.cli", "carry a study's best lr and momentum to the target run"),
    "report": ("mutransfer.study.cli", "plots and the optimum table of a study"),
    "ui": ("mutransfer.study.cli", "the MLflow UI on 127.0.0.1 over our store, opened at a study"),
    "launch": ("mutransfer.launch.cli", "multi-node deepspeed command or SLURM script for a run"),
    "demo": ("mutransfer.study.cli", "the whole proxy-to-target workflow on CPU"),
}




def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, that command's module adds its real arguments."""
    parser = argparse.ArgumentParser(
        prog="mutransfer",
        description="Train ViTs whose hyperparameters transfer from small proxies to large targets.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command in COMMANDS:
        module_name = COMMANDS[command][0]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # a part not built yet must not break the others
            if err.name != module_name:
                raise
        else:
            module.register(subparsers)
    for name, (_, help_text) in COMMANDS.items():
        if name not in subparsers.choices:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def _command_of(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    configure_logging()
    parser = build_parser(_command_of(argv))
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        if args.command:
            parser.error(f"the command {args.command!r} is not available in this installation")
        parser.print_help()
        return 0
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except UserError as err:  # what the user can fix: one line; anything else is a bug and keeps its traceback
        log.error(f"mutransfer {args.command}: error: {err}")
        return 2


def command_imports(argv: list[str]) -> None:
    """The command's module, and what the command will import later given its arguments (its parser's
    `lasting_imports` default, a function of the parsed arguments: MLflow's client, say)."""
    parser = build_parser(_command_of(argv))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # `main` parses them again and reports what is wrong
            args, _ = parser.parse_known_args(argv)
    except SystemExit:
        return
    imports = getattr(args, "lasting_imports", None)
    if imports is not None:
        imports(args)


def run() -> NoReturn:
    """The `mutransfer` console script: `main` as a process's entry point (`mutransfer.process`), with the
    command's module and what it will import as its lasting imports."""
    argv = sys.argv[1:]
    run_entry_point(lambda: main(argv), lambda: command_imports(argv))


if __name__ == "__main__":
    run()
