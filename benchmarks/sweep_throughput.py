"""Trials per minute of the demo study: stacked sweeps (`mutransfer sweep`, automatic --stack) against one trial
at a time (`--stack 1`), in one process, interleaved round robin, plus the overhead per trial and the FLOP rate.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/sweep_throughput.py                 # demo depth-4 group
    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/sweep_throughput.py --depths 16 --rounds 2

The study is configs/demo_study.yaml cut to one variant (--variant) and --depths, with all of
its learning rates and seeds (18 trials per depth) at its 120 steps (--steps). Every round sweeps the same
trials twice, once per mode (the order alternates between rounds), each into a fresh MLflow store and
output folder, so that nothing is skipped. Reported, as medians over the rounds:

- trials per minute of each mode (wall time of `run_sweep`, MLflow and evaluation included) and their ratio;
- overhead per trial: a mode's seconds per trial minus the plain loop's (the same model and torch AdamW in
  a bare loop over batches already in memory, the same steps, and the same 2,000-image evaluation; timed
  once per round after a warm-up loop, median), also as a fraction of the plain loop;
- achieved GFLOP/s of each mode (training FLOPs from the model's shapes x images, evaluation at a third of
  that per image) against the measured float32 GEMM peak (median `torch.mm` of 2048 x 2048, 8192 x 8192 on a
  GPU), taken at the trials' `run.matmul_precision` (`--set run.matmul_precision=high`: TF32 on a GPU);
- that both modes found the same results: the largest relative difference of any trial's final eval loss.

Every shard is read once through the process's sample cache (data.cache_mb) before anything is timed, so
neither mode pays for the first read. The load average before and after is printed: other processes on the machine slow both modes alike, but not
their ratio only when they run throughout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from mutransfer.data import DataConfig, build_eval_loader
from mutransfer.process import keep_freed_memory
from mutransfer.study.config import load_study
from mutransfer.study.demo import EVAL_SAMPLES, ensure_shards
from mutransfer.study.store import client_for, latest_per_key, load_trials
from mutransfer.study.sweep import run_sweep
from mutransfer.train.distributed import shutdown_distributed
from mutransfer.train.hardware import set_matmul_precision
from mutransfer.typed_config import parse_override, with_values

STUDY = Path(__file__).resolve().parents[1] / "configs" / "demo_study.yaml"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gemm_peak(size: int = 2048, repeats: int = 5) -> float:
    """Median FLOP/s of an fp32 `torch.mm` of two size x size matrices (on the GPU when there is one: 8192)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = 8192 if device.type == "cuda" else size
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def study_for(args: argparse.Namespace, root: Path, shards: Path):
    overrides = [f"study.output_dir={root / 'trials'}", f"study.steps={args.steps}",
                 f"shapes.variants=[{args.variant}]",
                 f"shapes.depths=[{','.join(map(str, args.depths))}]"]
    overrides += [f"shapes.widths=[{','.join(map(str, args.widths))}]"] if args.widths else []
    overrides += [f"seeds=[{','.join(map(str, args.seeds))}]"] if args.seeds else []
    cfg = load_study(str(STUDY), overrides)
    settings = dict((".".join(keys), value) for keys, value in map(parse_override, args.set))
    cfg.base = with_values(cfg.base, {**settings, "data.shards_dir": str(shards)})
    return cfg


def warm_sample_cache(data: DataConfig) -> None:
    """Read every training and eval shard once through the process's sample cache (data.cache_mb), so that
    every timed sweep of either mode finds them in memory, as every sweep after a process's first does."""
    for split in (data.train_split, data.eval_split):
        for _ in build_eval_loader(replace(data, eval_split=split)):
            pass


def sweep_once(args: argparse.Namespace, shards: Path, stack: int | None, tag: str
               ) -> tuple[float, dict[str, float], list[int]]:
    """(wall seconds, final eval loss by trial key: NaN for a trial that did not finish, trials per stack) of
    one sweep into a fresh store."""
    root = Path(tempfile.mkdtemp(prefix=f"sweep_{tag}_", dir=args.work))
    cfg = study_for(args, root, shards)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    start = time.perf_counter()
    summary = run_sweep(cfg, tracking_uri=uri, progress=False, stack=stack)
    seconds = time.perf_counter() - start
    if summary.failed:
        raise SystemExit(f"{tag}: trials failed: {summary.failed}")
    trials = latest_per_key(load_trials(client_for(uri), cfg.study.name, cfg.study.experiment))
    losses = {t.key: t.metrics.get("final/eval_loss", float("nan")) if t.status == "finished" else float("nan")
              for t in trials}
    return seconds, losses, summary.stack_sizes


def study_shapes(args: argparse.Namespace, shards: Path) -> list[tuple[int, int]]:
    """(width, depth) of every proxy shape the benchmark sweeps."""
    shapes = study_for(args, Path(args.work), shards).shapes
    return [(width, depth) for width in shapes.widths for depth in shapes.depths]


def plain_loop_seconds(args: argparse.Namespace, shards: Path, width: int, depth: int) -> tuple[float, float]:
    """(seconds, FLOPs) of one trial of a shape as a bare torch loop: batches in memory, no engine, no MLflow;
    on the GPU when there is one (float32, as stacks train)."""
    from mutransfer.models import create_model
    from mutransfer.models.optim import build_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = with_values(study_for(args, Path(args.work), shards).base, {"model.depth": depth, "model.width": width})
    model = create_model(cfg.model.name, **cfg.model.create_kwargs(cfg.data.img_size, 10)).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    images = torch.randn(cfg.data.batch_size, 3, cfg.data.img_size, cfg.data.img_size, device=device)
    labels = torch.randint(0, 10, (cfg.data.batch_size,), device=device)
    eval_images = torch.randn(cfg.data.eval_batch_size, 3, cfg.data.img_size, cfg.data.img_size, device=device)
    synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for _ in range(EVAL_SAMPLES // cfg.data.eval_batch_size):
            model(eval_images)
    synchronize()
    seconds = time.perf_counter() - start
    per_image = model.flops_per_image(performed=True)
    return seconds, per_image * (args.steps * cfg.data.batch_size + EVAL_SAMPLES / 3)


def main() -> None:
    keep_freed_memory()  # as in the product's processes (mutransfer.process)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="depth_mup+fle0.5")
    parser.add_argument("--depths", type=int, nargs="+", default=[4])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="default: the demo study's")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the demo study's")
    parser.add_argument("--lone-seeds", type=int, nargs="+", default=None,
                        help="seeds of the --stack 1 sweep (default: --seeds): one trial at a time costs the same "
                             "per trial however many there are, so a few measure it where big stacks need many")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a value of the trials' run config, for both modes (run.matmul_precision=high)")
    parser.add_argument("--work", default=None, help="folder for shards, stores and trials (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="sweep_throughput_")
    shards = Path(args.work) / "shards"
    ensure_shards(shards)
    warm = argparse.Namespace(**{**vars(args), "steps": 1})  # imports, DeepSpeed's op build, MLflow's tables
    run_sweep(study_for(warm, Path(tempfile.mkdtemp(dir=args.work)), shards), progress=False, trial_index=0,
              tracking_uri=f"sqlite:///{Path(tempfile.mkdtemp(dir=args.work)) / 'warm.db'}")
    base = study_for(args, Path(args.work), shards).base
    warm_sample_cache(base.data)
    load_before = os.getloadavg()
    # the peak and the plain loop at the trials' precision (the sweeps set it at each trial's start)
    set_matmul_precision(base.run.matmul_precision)
    peak = gemm_peak()
    shapes = study_shapes(args, shards)
    plain_loop_seconds(args, shards, *shapes[0])  # the first loop in a process pays oneDNN's set-up (~20 s)
    plain_runs: list[list[tuple[float, float]]] = []
    lone = argparse.Namespace(**{**vars(args), "seeds": args.lone_seeds or args.seeds})
    times: dict[str, list[float]] = {"stack 1": [], "stacked": []}
    results: dict[str, dict[str, float]] = {}
    stack_sizes: dict[str, list[int]] = {}
    for round_index in range(args.rounds):
        modes = [("stack 1", 1, lone), ("stacked", None, args)]
        for name, stack, mode_args in modes if round_index % 2 == 0 else modes[::-1]:
            seconds, results[name], stack_sizes[name] = sweep_once(mode_args, shards, stack, name.replace(" ", ""))
            times[name].append(seconds)
            print(f"round {round_index}: {name}: {seconds:.1f} s, stacks of {stack_sizes[name]} trials", flush=True)
        plain_runs.append([plain_loop_seconds(args, shards, *shape) for shape in shapes])
    plain = [(statistics.median(run[i][0] for run in plain_runs), plain_runs[0][i][1]) for i in range(len(shapes))]
    report(args, times, results, stack_sizes, plain, peak, load_before)
    shutdown_distributed()  # the warm-up sweep joined a process group: leave it, or NCCL may stall the exit


def report(args, times, results, stack_sizes, plain, peak, load_before) -> None:
    counts = {name: len(trials) for name, trials in results.items()}
    trials = counts["stacked"]
    plain_s = sum(s for s, _ in plain) / len(plain)  # per trial, every shape has as many trials
    flops_per_trial = sum(f for _, f in plain) / len(plain)
    settings = f"; {', '.join(args.set)}" if args.set else ""
    print(f"\n{counts['stacked']} trials stacked, {counts['stack 1']} one at a time ({args.variant}, widths {args.widths or 'of the study'}, depths {args.depths}, "
          f"{args.steps} steps{settings}), "
          f"{args.rounds} rounds; torch threads {torch.get_num_threads()}; load average before "
          f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"float32 GEMM peak (torch.mm 2048^2, 8192^2 on a GPU, at the trials' run.matmul_precision): "
          f"{peak / 1e9:.0f} GFLOP/s; plain loop: {plain_s:.2f} s per trial, "
          f"{flops_per_trial / plain_s / 1e9:.1f} GFLOP/s ({flops_per_trial / plain_s / peak:.1%} of peak)")
    print("| mode | s per sweep (median) | trials/min | overhead per trial | overhead / plain loop | GFLOP/s | % of GEMM peak |")
    print("|---|---|---|---|---|---|---|")
    rates, modes = {}, {}
    for name, values in times.items():
        seconds = statistics.median(values)
        rates[name] = counts[name] * 60 / seconds
        overhead = seconds / counts[name] - plain_s
        flops = flops_per_trial * counts[name]
        modes[name] = dict(seconds=seconds, trials_per_min=rates[name], overhead_s=overhead,
                           overhead_share=overhead / plain_s, gflops=flops / seconds / 1e9, of_peak=flops / seconds / peak)
        print(f"| {name} | {seconds:.1f} | {rates[name]:.1f} | {overhead:.2f} s | {overhead / plain_s:.0%} | "
              f"{flops / seconds / 1e9:.1f} | {flops / seconds / peak:.1%} |")
    print(f"stacked / stack 1: {rates['stacked'] / rates['stack 1']:.2f}x trials per minute")
    lone, stacked = results["stack 1"], results["stacked"]
    finished = [k for k in lone if lone[k] == lone[k] and k in stacked]
    same_status = all(k in stacked and (stacked[k] == stacked[k]) == (lone[k] == lone[k]) for k in lone)
    gaps = {k: abs(stacked[k] / lone[k] - 1) for k in finished}
    worst = max(gaps, key=gaps.get, default=None)
    gap = gaps[worst] if worst else float("nan")
    print(f"same results: {len(finished)} of {counts['stack 1']} trials finished in both modes ({'same' if same_status else 'NOT the same'}"
          f" statuses), final eval loss differs by at most {gap:.1e} (relative; {worst})")
    print("each trial's relative gap (stacked against alone), largest first: "
          + ", ".join(f"{k}: {g:.1e}" for k, g in sorted(gaps.items(), key=lambda kv: -kv[1])))
    if args.json:
        where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        Path(args.json).write_text(json.dumps(dict(
            device=where, settings=args.set, stack_sizes=stack_sizes, trials=trials, lone_trials=counts["stack 1"], widths=args.widths, depths=args.depths, steps=args.steps, modes=modes,
            speedup=rates["stacked"] / rates["stack 1"], plain_s=plain_s, gemm_peak_gflops=peak / 1e9,
            finished=len(finished), same_status=same_status, max_rel_gap=gap, gaps=gaps), indent=1))


if __name__ == "__main__":
    main()
