"""Training: optimizer groups (and, built on them, the DeepSpeed engine, schedule, checkpoints, tracking)."""
