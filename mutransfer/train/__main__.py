"""`python -m mutransfer.train --config C [section.key=value ...]`

Runs as a plain process, under torchrun, or under DeepSpeed's launcher:
    deepspeed --num_gpus 2 --module mutransfer.train --config configs/vit_s16_imagenet_zero1.yaml
Exit codes: 0 finished or preempted (checkpoint saved), 1 failed (a checkpoint that could not be written: one
line), 2 bad config or unusable data, 3 diverged.
"""

from __future__ import annotations

import argparse
import logging

from mutransfer.errors import ConfigError, DataError, UserError
from mutransfer.logs import configure_logging
from mutransfer.tags import RunStatus

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mutransfer.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-3")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    from .config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except UserError as err:
        log.error(f"mutransfer.train: {_kind(err)}: {err}")
        return 2
    from .resume import CheckpointWriteError
    from .trainer import EXIT_DIVERGED, shutdown_distributed, train

    try:
        result = train(cfg)
    except UserError as err:
        leave_after_error()
        log.error(f"mutransfer.train: {_kind(err)}: {err}")
        return 2
    except CheckpointWriteError as err:  # the disk, a quota or a file size limit: the OS's words, no traceback
        leave_after_error()
        log.error(f"mutransfer.train: {err}")
        return 1
    except BaseException:
        leave_after_error()
        raise
    shutdown_distributed()
    return EXIT_DIVERGED if result.status == RunStatus.DIVERGED else 0


def _kind(err: UserError) -> str:
    return "data error" if isinstance(err, DataError) else "config error" if isinstance(err, ConfigError) else "error"


def leave_after_error() -> None:
    """Leave the process group without waiting for the other ranks (one may be dead): a gloo group still
    standing at interpreter exit can keep the process spinning (or abort) while it is torn down."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    import importlib

    from mutransfer.process import run_entry_point

    run_entry_point(main, lambda: importlib.import_module("mutransfer.train.trainer"))
