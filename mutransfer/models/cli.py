"""`mutransfer coord-check` and `mutransfer models`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .coord_check import VARY
from .parametrization import NAMES, OPTIMIZERS


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "coord-check",
        help="coordinate check: activation size per layer across widths or depths (CSV + PNG)",
        description="Train each size a few steps on one fixed batch and record the mean |activation| of "
        "every layer. Flat curves mean the parametrization keeps coordinates stable as the model grows.",
    )
    p.add_argument("--model", default="vit", help="zoo name (default: vit)")
    p.add_argument("--parametrization", default="mup", help=", ".join(NAMES))
    p.add_argument("--vary", choices=VARY, default="width")
    p.add_argument("--values", type=_int_list, required=True, help="sizes, e.g. 64,128,256,512")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--lr", type=float, default=None, help="default: 1e-2 (adamw) or 0.5 (sgd)")
    p.add_argument("--width", type=int, default=128, help="width when varying depth")
    p.add_argument("--depth", type=int, default=4, help="depth when varying width")
    p.add_argument("--base-width", type=int, default=None)
    p.add_argument("--base-depth", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--first-layer-lr-exponent", type=float, default=None,
                   help="LR of qkv / fc1 times m_L ** this (default 0: a name alone means its plain knobs)")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8, help="ViT models only")
    p.add_argument("--head-dim", type=int, default=None, help="ViT models only (default 64; width / heads)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--drop-path-rate", type=float, default=0.0,
                   help="stochastic depth of the last block, ViT models only (trained in train mode, so on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-layers", action="store_true",
                   help="also record fc1 inside each block (the NFD paper: does the first layer still learn? docs/parametrizations.md)")
    p.add_argument("--out", type=Path, required=True, help="folder for coord_check_*.csv and .png")
    p.set_defaults(func=coord_check_command)

    m = subparsers.add_parser("models", help="list the model zoo")
    m.set_defaults(func=list_models_command)


def coord_check_command(args: argparse.Namespace) -> int:

    from .coord_check import last_block_growth, plot, run_coord_check, write_csv
    from .zoo import zoo_entry

    entry = zoo_entry(args.model)
    kwargs = dict(
        width=args.width, depth=args.depth, img_size=args.img_size, num_classes=10,
        base_width=args.base_width, base_depth=args.base_depth, alpha=args.alpha,
        first_layer_lr_exponent=args.first_layer_lr_exponent,
    )
    if "patch_size" in entry.arguments():
        kwargs.update(patch_size=args.patch_size, head_dim=args.head_dim)
    if args.drop_path_rate:
        kwargs.update(drop_path_rate=args.drop_path_rate)
    records = run_coord_check(
        model=args.model, parametrization=args.parametrization, vary=args.vary, values=args.values,
        steps=args.steps, optimizer=args.optimizer, lr=args.lr, batch_size=args.batch_size,
        seed=args.seed, first_layers=args.first_layers, **kwargs,
    )
    stem = f"coord_check_{args.model}_{args.parametrization}_{args.vary}"
    csv_path, png_path = args.out / f"{stem}.csv", args.out / f"{stem}.png"
    write_csv(records, csv_path)
    title = f"{args.model} {args.parametrization} ({args.optimizer}, lr {args.lr or 'default'}) over {args.vary}"
    plot(records, png_path, title, args.vary)
    last = args.steps - 1
    print(f"last block |activation| growth over {args.vary} {args.values[0]}->{args.values[-1]}: "
          f"step 0 x{last_block_growth(records, 0):.2f}, step {last} x{last_block_growth(records, last):.2f}; "
          f"change since step 0 at step {last}: x{last_block_growth(records, last, 'mean_abs_change'):.2f}")
    print(f"wrote {csv_path}\nwrote {png_path}")
    return 0


def list_models_command(args: argparse.Namespace) -> int:
    from .zoo import list_models, zoo_entry

    for name in list_models():
        entry = zoo_entry(name)
        defaults = ", ".join(f"{k}={v}" for k, v in entry.defaults.items())
        print(f"{name:20s} {entry.description}  [{defaults}]")
    return 0
