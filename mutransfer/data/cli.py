"""`mutransfer shards write|info`: turn an image collection into webdataset shards, or describe a shard set."""

from __future__ import annotations

import argparse

from mutransfer.data.writer import DEFAULT_QUALITY


def register(subparsers: argparse._SubParsersAction) -> None:
    shards = subparsers.add_parser(
        "shards",
        help="write and inspect webdataset shard sets",
        description="Write and inspect webdataset shard sets in timm's layout (jpg + cls + json, _info.json).",
    )
    actions = shards.add_subparsers(dest="shards_action", metavar="ACTION")
    shards.set_defaults(func=lambda args: _print_help(shards))

    write = actions.add_parser(
        "write",
        help="write an image collection as tar shards plus _info.json",
        description=(
            "Write images as tar shards {split}-000000.tar, ... and record them in OUT/_info.json. The same "
            "input gives the same bytes. A folder may receive a second split by a second command; anything "
            "else already in it needs --force."
        ),
    )
    write.add_argument("--source", required=True, help="imagefolder:DIR, hf:PATH (a saved dataset, parquet or imagefolder) or synthetic")
    write.add_argument("--out", required=True, help="folder for the shards and _info.json")
    write.add_argument("--split", required=True, help="split name, e.g. train or validation")
    write.add_argument("--samples-per-shard", type=int, required=True, metavar="N")
    write.add_argument("--resize-short", type=int, metavar="S", help="shrink images whose short side exceeds S to S")
    write.add_argument("--quality", type=int, default=DEFAULT_QUALITY, metavar="Q",
                       help=f"JPEG quality for images that are (re-)encoded (default {DEFAULT_QUALITY})")
    write.add_argument("--workers", type=int, default=1, metavar="K", help="processes writing shards in parallel")
    write.add_argument("--force", action="store_true", help="write into a non-empty folder, replacing this split")
    write.add_argument("--name", help="dataset name recorded in _info.json (default: the source's)")
    synthetic = write.add_argument_group("synthetic source")
    synthetic.add_argument("--classes", type=int, metavar="C", help="number of classes (default 10)")
    synthetic.add_argument("--samples", type=int, metavar="N", help="number of images (required)")
    synthetic.add_argument("--image-size", type=int, metavar="S", help="image side in pixels (default 64)")
    synthetic.add_argument("--seed", type=int, metavar="K", help="seed (default 0)")
    hf = write.add_argument_group("hf source")
    hf.add_argument("--hf-split", help="split of a DatasetDict to read (default: --split)")
    hf.add_argument("--image-column", help="image column (default: the first Image feature)")
    hf.add_argument("--label-column", help="label column (default: the first ClassLabel, or label/labels/cls/target)")
    write.set_defaults(func=run_write)

    info = actions.add_parser("info", help="summarise a shard set's _info.json")
    info.add_argument("location", help="shard folder, URL prefix or _info.json path")
    info.set_defaults(func=run_info)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def run_write(args: argparse.Namespace) -> int:
    from mutransfer.data.sources import SyntheticSource, open_source
    from mutransfer.data.synthetic import SyntheticSpec
    from mutransfer.data.writer import write_shards
    from mutransfer.errors import UsageError

    synthetic_flags = {"--classes": args.classes, "--samples": args.samples, "--image-size": args.image_size,
                       "--seed": args.seed}
    source = None
    try:
        if args.source == "synthetic":
            if args.samples is None:
                raise UsageError("--source synthetic needs --samples N")
            if args.resize_short is not None:
                raise UsageError("--resize-short does not apply to --source synthetic; use --image-size")
            spec = SyntheticSpec(
                classes=10 if args.classes is None else args.classes,
                image_size=64 if args.image_size is None else args.image_size,
                seed=0 if args.seed is None else args.seed,
                split=args.split,
            )
            source = SyntheticSource(spec, args.samples)
        else:
            given = [flag for flag, value in synthetic_flags.items() if value is not None]
            if given:
                raise UsageError(f"{', '.join(given)} only apply to --source synthetic")
            source = open_source(args.source, args.split, args.hf_split, args.image_column, args.label_column)
        summary = write_shards(
            source,
            args.out,
            args.split,
            args.samples_per_shard,
            resize_short=args.resize_short,
            quality=args.quality,
            workers=args.workers,
            force=args.force,
            dataset_name=args.name,
        )
    except (FileExistsError, FileNotFoundError) as err:  # the user's paths: one line, as for bad values
        raise UsageError(str(err)) from err
    finally:
        if source is not None and hasattr(source, "close"):
            source.close()
    print(summary.describe())
    ignored = getattr(source, "ignored", [])
    if ignored:
        print(f"ignored {len(ignored)} file(s) without an image extension, e.g. {ignored[0]}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from mutransfer.data.info import info_location, read_info, shard_pattern
    from mutransfer.errors import UsageError

    try:
        info = read_info(args.location)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from err
    print(f"{info_location(args.location)}: dataset {info.name!r}")
    for name, split in sorted(info.splits.items()):
        classes = f", {split.num_classes} classes" if split.num_classes is not None else ""
        lengths = split.shard_lengths
        spread = f" ({min(lengths)}..{max(lengths)} per shard)" if lengths else ""
        print(f"  {name}: {split.num_samples} samples in {len(split.filenames)} shards{spread}{classes}; "
              f"{shard_pattern(name, len(split.filenames))}")
    return 0
