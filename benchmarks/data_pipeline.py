"""Data pipeline throughput on ImageNet-sized JPEGs, as ratios against baselines run in the same process.

The images are made here, never downloaded: 500 x 375 JPEGs of about 110 KB (quality 90; smooth colour
fields under pixel noise, which JPEG cannot squeeze, as it cannot a photo's texture).

1. The train pipeline per DataLoader worker at 224 px (shards -> tar parsing -> shuffle buffer -> PIL
   decode -> timm RandomResizedCrop + flip -> uint8 batches in shared memory; the main process then makes
   them float and normalises), against the floor: a plain loop of PIL decode + torchvision
   RandomResizedCrop + flip + to-tensor over the same JPEG bytes, already in memory. Goal: ratio >= 0.9.
   Measured both in wall-clock time and in CPU time of the processes that do the work; on a shared
   machine the CPU figure (images per CPU-second = images/s per core) is the fair one, since it does not
   fall when another job takes the core away. The main process's share is printed too.
2. The scaling of wall-clock throughput from 1 to 2 workers (ideal 2.0; it needs 2 idle cores plus a
   little for the main process).
3. data.decode=gpu: what is left for a worker (read, shuffle, JPEG header, crop parameters), per core, and
   the training process's decode + crop + normalise per batch on --device (nvJPEG on a GPU; on the CPU,
   torchvision's CPU decoder, which shows the cost the GPU takes over).
4. Synthetic shard writing at 64 px in one process (goal >= 1000 images per second per core).

    .venv/bin/python benchmarks/data_pipeline.py                  # about two minutes on 2 cores
    .venv/bin/python benchmarks/data_pipeline.py --device cuda    # a GPU node: decode=gpu on the GPU
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

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from mutransfer.data import (
    DataConfig,
    ImageFolderSource,
    build_train_loader,
    read_info,
    write_shards,
    write_synthetic_shards,
)


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


def photo_like(rng: np.random.Generator, height: int = 375, width: int = 500) -> np.ndarray:
    """An RGB image that JPEG (quality 90) stores in about 110 KB at 500 x 375, like an ImageNet photo."""
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(40, 200, 3) + x[..., None] * rng.uniform(-0.2, 0.2, 3) + y[..., None] * rng.uniform(-0.2, 0.2, 3)
    blobs = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
    coarse = np.asarray(Image.fromarray(blobs).resize((width, height), Image.BICUBIC), dtype=np.float32)
    return np.clip(0.5 * base + 0.5 * coarse + rng.normal(0, 23, (height, width, 3)), 0, 255).astype(np.uint8)


def imagenet_like_shards(folder: str, images: int) -> str:
    """Shards of `images` ImageNet-sized JPEGs in 10 classes (the JPEG bytes go into the shards as made)."""
    rng = np.random.default_rng(0)
    for i in range(images):
        class_dir = os.path.join(folder, "images", f"class{i % 10}")
        os.makedirs(class_dir, exist_ok=True)
        Image.fromarray(photo_like(rng)).save(os.path.join(class_dir, f"{i}.jpg"), quality=90)
    shards = os.path.join(folder, "shards")
    write_shards(ImageFolderSource(os.path.join(folder, "images")), shards, "train", samples_per_shard=128,
                 progress=False)
    return shards


def pipeline(shards_dir: str, size: int, batch_size: int, batches: int, workers: int, decode: str = "cpu",
             device: str = "cpu") -> Rate:
    """The train loader. Wall clock: steady state from the first batch to the last (the first pays for
    starting the workers and filling the shuffle buffer). CPU: all that the workers did, start-up
    included, over all the images they made."""
    cfg = DataConfig(shards_dir=shards_dir, img_size=size, batch_size=batch_size, num_workers=workers,
                     batches_per_epoch=batches, shuffle_buffer=256, interpolation="bicubic", decode=decode)
    cpu = children_cpu_seconds()
    iterator = iter(build_train_loader(cfg, device=device))
    next(iterator)
    wall, main_cpu = time.perf_counter(), time.process_time()
    timed = sum(images.shape[0] for images, _ in iterator)  # running it to the end joins the workers
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, main_cpu = time.perf_counter() - wall, time.process_time() - main_cpu
    made = -(-batches // workers) * workers * batch_size  # each worker makes its whole quota
    return Rate(timed / wall, made / (children_cpu_seconds() - cpu), main_cpu / timed)


def synthetic_write_rate(folder: str, samples: int) -> float:
    start = time.perf_counter()
    write_synthetic_shards(folder, "train", 100, samples, image_size=64, seed=0, samples_per_shard=1000)
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=320, help="ImageNet-sized JPEGs in the benchmark shards")
    parser.add_argument("--size", type=int, default=224, help="training crop size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10, help="batches per pipeline measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each kind; the best counts")
    parser.add_argument("--device", default="cpu", help="where decode=gpu decodes (cuda on a GPU node)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker

    with tempfile.TemporaryDirectory(prefix="mutransfer-bench-") as tmp:
        shards = imagenet_like_shards(tmp, args.images)
        jpegs = []
        for name in read_info(shards).split("train").filenames:
            with tarfile.open(os.path.join(shards, name)) as tar:
                jpegs += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
        print(f"{len(jpegs)} JPEGs of 500 x 375 ({sum(map(len, jpegs)) / len(jpegs) / 1000:.0f} KB on average), "
              f"cropped to {args.size} px, batches of {args.batch_size}; load average "
              f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
        measure(args, shards, jpegs)
        writes = [synthetic_write_rate(os.path.join(tmp, f"synthetic{i}"), 4000) for i in range(args.repeats)]
        print(f"synthetic write at 64 px, 1 process: {max(writes):.0f} img/s (goal >= 1000; runs: "
              f"{', '.join(f'{w:.0f}' for w in writes)})")


def measure(args: argparse.Namespace, shards: str, jpegs: list[bytes]) -> None:
    kinds = {"plain loop": lambda: baseline(jpegs, args.size),
             "1 worker": lambda: pipeline(shards, args.size, args.batch_size, args.batches, 1),
             "2 workers": lambda: pipeline(shards, args.size, args.batch_size, args.batches, 2),
             "decode=gpu, 1 worker": lambda: pipeline(shards, args.size, args.batch_size, args.batches, 1, "gpu",
                                                      args.device)}
    runs: dict[str, list[Rate]] = {kind: [] for kind in kinds}
    for _ in range(args.repeats):  # interleaved, so that a busy spell on the machine hits every kind
        for kind, once in kinds.items():
            runs[kind].append(once())
    wall = {kind: max(r.wall for r in rates) for kind, rates in runs.items()}
    cpu = {kind: max(r.cpu for r in rates) for kind, rates in runs.items()}
    for kind in runs:
        print(f"{kind:>20}: best {wall[kind]:6.1f} img/s wall, {cpu[kind]:6.1f} img per cpu-s "
              f"(runs: {'; '.join(str(r) for r in runs[kind])})")
    print(f"CPU pipeline: {cpu['1 worker']:.0f} images/s per core (a ViT-B/16 step on an H100 takes thousands "
          f"of images/s per GPU)")
    print(f"pipeline per worker / plain loop: {cpu['1 worker'] / cpu['plain loop']:.2f} in CPU time, "
          f"{wall['1 worker'] / wall['plain loop']:.2f} in wall-clock time (goal >= 0.9)")
    main_ms = min(r.main_cpu for r in runs["1 worker"]) * 1000 * args.batch_size
    print(f"main process per batch of {args.batch_size} (receive, to float, normalise): {main_ms:.1f} ms CPU")
    print(f"scaling 1 -> 2 workers: {wall['2 workers'] / wall['1 worker']:.2f}x wall-clock throughput "
          f"(ideal 2.0); per worker in CPU time {cpu['2 workers'] / cpu['1 worker']:.2f}")
    gpu_main_ms = min(r.main_cpu for r in runs["decode=gpu, 1 worker"]) * 1000 * args.batch_size
    print(f"decode=gpu: a worker makes {cpu['decode=gpu, 1 worker']:.0f} images per cpu-s "
          f"({cpu['decode=gpu, 1 worker'] / cpu['1 worker']:.1f}x the CPU path); the training process spends "
          f"{gpu_main_ms:.1f} ms CPU per batch of {args.batch_size} decoding on {args.device}")


if __name__ == "__main__":
    main()
