"""The one `mutransfer` command. Each part of the package registers its own subcommands.

A part contributes a module with `register(subparsers)` that adds its parsers and sets `func` (called with
the parsed args; its return value is the exit code). Modules are imported lazily so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, description) of every part that adds subcommands; later parts append here.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "mutransfer.models.cli",
    "mutransfer.data.cli",
    "mutransfer.train.cli",
    "mutransfer.launch.cli",
    "mutransfer.launch.report",
    "mutransfer.launch.ui",
)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mutransfer",
        description="Train ViTs whose hyperparameters transfer from small proxies to large targets.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # a part not built yet must not break the others
            if err.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"mutransfer {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
