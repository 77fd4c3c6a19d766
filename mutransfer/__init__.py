"""mutransfer: train ViTs whose hyperparameters transfer from small proxies to large targets (muP, Depth-muP,
CompleteP).

Start at `mutransfer.cli` (the `mutransfer` command) or `docs/architecture.md`, which lists every module
with its one job. The parts, lowest first: `models` and `data`, then `train`, `launch`, `study`.
"""
