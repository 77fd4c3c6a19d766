"""`mutransfer train` (same as `python -m mutransfer.train`) and `mutransfer export`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    t = subparsers.add_parser("train", help="train one run (single process; use `deepspeed --module "
                              "mutransfer.train` for several)")
    t.add_argument("--config", required=True)
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-3")
    t.set_defaults(func=train_command)

    e = subparsers.add_parser("export", help="write a run's consolidated fp32 weights as safetensors or timm")
    e.add_argument("run_dir", type=Path)
    e.add_argument("out", type=Path, help="a .safetensors file, or (--format timm) a folder")
    e.add_argument("--format", choices=("safetensors", "timm"), default="safetensors",
                   help="safetensors: our file, read by mutransfer.models.load_model; timm: model.safetensors + "
                        "config.json for timm.create_model('local-dir:OUT', pretrained=True), multipliers folded in")
    e.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: the newest complete one)")
    e.add_argument("--ema", action="store_true",
                   help="write the weight EMA (run.ema_decay) the checkpoint holds instead of the weights")
    e.set_defaults(func=export_command)


def train_command(args: argparse.Namespace) -> int:
    from .__main__ import main

    return main(["--config", args.config, *args.overrides])


def export_command(args: argparse.Namespace) -> int:
    from mutransfer.errors import UsageError

    from .export import export

    try:
        out = export(args.run_dir, args.out, args.checkpoint, args.format, ema=args.ema)
    except FileNotFoundError as err:  # a run folder or checkpoint that is not there
        raise UsageError(str(err)) from err
    print(f"wrote {out}")
    return 0
