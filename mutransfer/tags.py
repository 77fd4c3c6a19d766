"""The names under which mutransfer records runs in MLflow, and the statuses a run or a study can end in.

Every run the trainer records carries the `mutransfer.*` tags below: its identity (`identity_tags`: the
structured `mutransfer.trial` tag, which `study.store` reads back, and a copy of each of its fields for
filtering in MLflow's UI), the model, parametrization, optimizer and length in samples; a sweep adds the study
and trial key, `transfer` the rule. A leaf module: it imports nothing of ours, so that the trainer (which
writes the identity) and the study (which reads it) share one definition.
"""

from __future__ import annotations

import json
from enum import StrEnum

STUDY = "mutransfer.study"
"""The study a run belongs to (on the study's parent run, its trials and its target)."""
ROLE = "mutransfer.role"
"""What the run is to its study: a `RunRole`."""
TRIAL_KEY = "mutransfer.trial_key"
"""A trial's key (shape and grid point), unique within its study."""
STATUS = "mutransfer.status"
"""The run's `RunStatus`, finer than MLflow's own run status."""
MODEL = "mutransfer.model"
PARAMETRIZATION = "mutransfer.parametrization"
"""The parametrization's name alone (depth_mup), for filtering runs in MLflow's UI."""
VARIANT = "mutransfer.variant"
"""The variant: the parametrization with its knobs, spelled as a label (depth_mup+fle0.5); what a study groups
proxies by."""
WIDTH = "mutransfer.width"
DEPTH = "mutransfer.depth"
OPTIMIZER = "mutransfer.optimizer"
LR = "mutransfer.lr"
MOMENTUM = "mutransfer.momentum"
"""SGD momentum or Adam beta1, whichever the optimizer uses."""
WEIGHT_DECAY = "mutransfer.weight_decay"
SEED = "mutransfer.seed"
BATCH_SIZE = "mutransfer.batch_size"
"""Global batch: samples per optimizer step (per-rank batch x accumulation x data-parallel ranks)."""
STEPS = "mutransfer.steps"
"""Training length in optimizer steps (the whole schedule's, epochs turned into steps)."""
SAMPLES = "mutransfer.samples"
"""Training length in samples: steps x global batch."""
TRANSFER_RULE = "mutransfer.transfer_rule"
"""How `mutransfer transfer` chose the target's lr (trend or largest)."""
TRIAL = "mutransfer.trial"
"""A run's identity as one JSON object of every field in `TRIAL_FIELDS` (those of `study.trial.TrialSpec`):
the one tag `study.store` reads back, strictly. The tags of single fields are copies of it."""
TRIAL_FIELDS = {"variant": VARIANT, "width": WIDTH, "depth": DEPTH, "batch_size": BATCH_SIZE, "steps": STEPS,
                "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "seed": SEED}
"""Each field of a run's identity, and the tag that copies it for MLflow's UI."""
EXPERIMENT_KIND = "mlflow.experimentKind"
"""MLflow's experiment tag that tells its UI an experiment is model training, not GenAI."""


class RunRole(StrEnum):
    RUN = "run"
    """A training run of its own."""
    STUDY = "study"
    """A study's parent run."""
    PROXY = "proxy"
    """A trial of a study."""
    TARGET = "target"
    """The run a study's settings were transferred to."""


class RunStatus(StrEnum):
    RUNNING = "running"
    FINISHED = "finished"
    DIVERGED = "diverged"
    """The loss went above run.divergence_loss or non-finite: an answer for a sweep, not a failure."""
    FAILED = "failed"
    PREEMPTED = "preempted"
    """A training run stopped by SIGTERM / SIGINT after saving a checkpoint."""
    INTERRUPTED = "interrupted"
    """A trial or study stopped by a signal; the same sweep command continues it."""
    INCOMPLETE = "incomplete"
    """A study whose sweep ended with failed trials."""

    @property
    def mlflow(self) -> str:
        """MLflow's own run status for this one."""
        return {"running": "RUNNING", "finished": "FINISHED", "preempted": "KILLED", "interrupted": "KILLED"}.get(
            self.value, "FAILED")


DONE = frozenset({RunStatus.FINISHED, RunStatus.DIVERGED})
"""Trials a sweep does not run again."""


def identity_tags(identity: dict[str, str | int | float]) -> dict[str, str]:
    """A run's identity (every field of `TRIAL_FIELDS`, typed) as its `TRIAL` tag, written once, plus the copy
    of each field under its own tag. ValueError when a field is missing or unknown."""
    if set(identity) != set(TRIAL_FIELDS):
        raise ValueError(f"a run's identity has the fields {sorted(TRIAL_FIELDS)}, got {sorted(identity)}")
    copies = {TRIAL_FIELDS[name]: repr(value) if isinstance(value, float) else str(value)
              for name, value in identity.items()}
    return {TRIAL: json.dumps(identity, sort_keys=True), **copies}
