"""Data pipeline throughput, as ratios against baselines run in the same process.

1. The train pipeline per DataLoader worker at 224 px (shards -> tar parsing -> shuffle buffer -> PIL
   decode -> timm RandomResizedCrop + flip -> uint8 batches in shared memory; the main process then makes
   them float and normalises), against the floor: a plain loop of PIL decode + torchvision
   RandomResizedCrop + flip + to-tensor over the same JPEG bytes, already in memory. Goal: ratio >= 0.9.
   Measured both in wall-clock time and in CPU time of the processes that do the work; on a shared
   machine the CPU figure is the fair per-worker one, since it does not fall when another job takes the
   core away. The main process's share is printed too.
2. The scaling of wall-clock throughput from 1 to 2 workers (ideal 2.0; it needs 2 idle cores plus a
   little for the main process).
3. Synthetic shard writing at 64 px in one process (goal >= 1000 images per second per core).

    .venv/bin/python benchmarks/data_pipeline.py            # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import tarfile
import tempfile
import time
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms

from mutransfer.data import DataConfig, build_train_loader, read_info, write_synthetic_shards


@dataclass
class Rate:
    wall: float  # images per second of wall-clock time
    cpu: float  # images per second of CPU time of the working process(es)
    main_cpu: float = 0.0  # for the loader: main-process CPU seconds per image (receiving, normalising)

    def __str__(self) -> str:
        return f"{self.wall:6.1f} img/s wall, {self.cpu:6.1f} img per cpu-s"


def baseline(jpegs: list[bytes], size: int) -> Rate:
    """PIL decode + RandomResizedCrop + flip + to-tensor, in a plain loop."""
    transform = transforms.Compose([
        transforms.RandomResizedCrop(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
    ])
    wall, cpu = time.perf_counter(), time.process_time()
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as image:
            transform(image.convert("RGB"))
    return Rate(len(jpegs) / (time.perf_counter() - wall), len(jpegs) / (time.process_time() - cpu))


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # children that have exited and been joined
    return usage.ru_utime + usage.ru_stime


def pipeline(shards_dir: str, size: int, batch_size: int, batches: int, workers: int) -> Rate:
    """The train loader. Wall clock: steady state from the first batch to the last (the first pays for
    starting the workers and filling the shuffle buffer). CPU: all that the workers did, start-up
    included, over all the images they made."""
    cfg = DataConfig(shards_dir=shards_dir, img_size=size, batch_size=batch_size, num_workers=workers,
                     batches_per_epoch=batches, shuffle_buffer=256, interpolation="bicubic")
    cpu = children_cpu_seconds()
    iterator = iter(build_train_loader(cfg))
    next(iterator)
    wall, main_cpu = time.perf_counter(), time.process_time()
    timed = sum(images.shape[0] for images, _ in iterator)  # running it to the end joins the workers
    wall, main_cpu = time.perf_counter() - wall, time.process_time() - main_cpu
    made = -(-batches // workers) * workers * batch_size  # each worker makes its whole quota
    return Rate(timed / wall, made / (children_cpu_seconds() - cpu), main_cpu / timed)


def synthetic_write_rate(folder: str, samples: int) -> float:
    start = time.perf_counter()
    write_synthetic_shards(folder, "train", 100, samples, image_size=64, seed=0, samples_per_shard=1000)
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=640, help="images in the benchmark shards")
    parser.add_argument("--source-size", type=int, default=320, help="side of the written JPEGs")
    parser.add_argument("--size", type=int, default=224, help="training crop size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=33, help="batches per pipeline measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each kind; the best counts")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker

    with tempfile.TemporaryDirectory(prefix="mutransfer-bench-") as tmp:
        shards = os.path.join(tmp, "shards")
        write_synthetic_shards(shards, "train", 100, args.images, args.source_size, 0, 128, workers=2)
        jpegs = []
        for name in read_info(shards).split("train").filenames:
            with tarfile.open(os.path.join(shards, name)) as tar:
                jpegs += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
        print(f"{len(jpegs)} JPEGs of {args.source_size} px ({sum(map(len, jpegs)) / len(jpegs) / 1024:.1f} KiB "
              f"on average), cropped to {args.size} px, batches of {args.batch_size}; load average "
              f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

        runs: dict[str, list[Rate]] = {"plain loop": [], "1 worker": [], "2 workers": []}
        for _ in range(args.repeats):  # interleaved, so that a busy spell on the machine hits every kind
            runs["plain loop"].append(baseline(jpegs, args.size))
            runs["1 worker"].append(pipeline(shards, args.size, args.batch_size, args.batches, 1))
            runs["2 workers"].append(pipeline(shards, args.size, args.batch_size, args.batches, 2))
        wall = {kind: max(r.wall for r in rates) for kind, rates in runs.items()}
        cpu = {kind: max(r.cpu for r in rates) for kind, rates in runs.items()}
        for kind in runs:
            print(f"{kind:>10}: best {wall[kind]:6.1f} img/s wall, {cpu[kind]:6.1f} img per cpu-s "
                  f"(runs: {'; '.join(str(r) for r in runs[kind])})")
        print(f"pipeline per worker / plain loop: {cpu['1 worker'] / cpu['plain loop']:.2f} in CPU time, "
              f"{wall['1 worker'] / wall['plain loop']:.2f} in wall-clock time (goal >= 0.9)")
        main_ms = min(r.main_cpu for r in runs["1 worker"]) * 1000 * args.batch_size
        print(f"main process per batch of {args.batch_size} (receive, to float, normalise): {main_ms:.1f} ms CPU")
        print(f"scaling 1 -> 2 workers: {wall['2 workers'] / wall['1 worker']:.2f}x wall-clock throughput "
              f"(ideal 2.0); per worker in CPU time {cpu['2 workers'] / cpu['1 worker']:.2f}")

        writes = [synthetic_write_rate(os.path.join(tmp, f"synthetic{i}"), 4000) for i in range(args.repeats)]
        print(f"synthetic write at 64 px, 1 process: {max(writes):.0f} img/s (goal >= 1000; runs: "
              f"{', '.join(f'{w:.0f}' for w in writes)})")


if __name__ == "__main__":
    main()
