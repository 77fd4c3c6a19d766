"""Run as two ranks (`train_helpers.run_ranks`): build the model as the trainer does at ZeRO-3 and write each
parameter's full-tensor statistics (rank 0) to the JSON file named on the command line."""

from __future__ import annotations

import json
import sys

import deepspeed

from mutransfer.process import exit_process
from mutransfer.train.config import load_config
from mutransfer.train.distributed import init_distributed, shutdown_distributed
from mutransfer.train.engine import build_model, deepspeed_config


def main() -> None:
    config_path, out_path = sys.argv[-2], sys.argv[-1]
    cfg = load_config(config_path, ["deepspeed.zero_stage=3"])
    rank, _, world_size = init_distributed()
    model = build_model(cfg, deepspeed_config(cfg, world_size), num_classes=10)
    stats = {}
    for name, param in model.named_parameters():
        assert param.numel() == 0 or world_size == 1, f"{name} was not partitioned"
        with deepspeed.zero.GatheredParameters([param]):
            full = param.detach().double()
            stats[name] = [list(full.shape), full.sum().item(), full.abs().sum().item(), (full**2).sum().item()]
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(stats, fh)
    shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)
