"""How an in-process sweep trains its trials in stacks (`mutransfer sweep --stack K`, `train.stacked`).

Trials stack when every field of their TrialSpec but the ones a stack member may differ in (`MEMBER_FIELDS`:
lr, momentum, weight decay, seed) is equal: the grouping reads the dataclass's fields, so a shape field
added to TrialSpec groups correctly without a change here. Each group is cut into stacks of at most K trials
(automatic: as many as fit in memory, `train.stack_memory`); a stack of one trial, and every trial of a
study whose configs cannot stack (`stacked.stack_problem`) when K is automatic, trains alone as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import fields

from mutransfer.errors import UsageError
from mutransfer.tags import RunStatus
from mutransfer.train.config import RunConfig

from .trial import TrialSpec

log = logging.getLogger(__name__)

MEMBER_FIELDS = frozenset({"lr", "momentum", "weight_decay", "seed"})


def shape_key(trial: TrialSpec) -> tuple:
    """The values of every TrialSpec field but `MEMBER_FIELDS`: trials with equal keys may share a stack."""
    return tuple(getattr(trial, f.name) for f in fields(trial) if f.name not in MEMBER_FIELDS)


def plan_stacks(trials: list[TrialSpec], size_for: Callable[[TrialSpec, int], int]) -> list[list[TrialSpec]]:
    """The trials cut into stacks: grouped by `shape_key` (groups in order of their first trial), each group
    into runs of `size_for(first trial, group size)` trials."""
    groups: dict[tuple, list[TrialSpec]] = {}
    for trial in trials:
        groups.setdefault(shape_key(trial), []).append(trial)
    stacks = []
    for group in groups.values():
        size = max(1, size_for(group[0], len(group)))
        stacks.extend(group[i:i + size] for i in range(0, len(group), size))
    return stacks


def stack_sizer(stack: int | None, config_of: Callable[[TrialSpec], RunConfig],
                auto: Callable[[RunConfig, int], int] | None = None) -> Callable[[TrialSpec, int], int]:
    """`size_for` of `plan_stacks`: `stack` trials per stack, or (None) `auto(config, trials of the shape)`,
    by default as many as fit in memory (`auto_stack_size`). A study whose configs cannot stack runs one
    trial at a time when the size is automatic, and is refused when it is not."""
    from mutransfer.train.stack_memory import auto_stack_size
    from mutransfer.train.stacked import stack_problem

    auto = auto or auto_stack_size

    def size_for(trial: TrialSpec, count: int) -> int:
        if stack == 1 or count == 1:
            return 1
        try:
            cfg = config_of(trial)
        except Exception:  # a trial that cannot even configure trains alone, and fails there as before
            return 1
        problem = stack_problem(cfg)
        if problem is not None:
            if stack is not None:
                raise UsageError(f"--stack {stack}: the trials of this study cannot train in a stack: {problem}; "
                                 "use --stack 1")
            return 1
        return stack if stack is not None else auto(cfg, count)

    return size_for


def array_stacks(trials: list[TrialSpec], stack: int | None, config_of: Callable[[TrialSpec], RunConfig]
                 ) -> list[list[TrialSpec]]:
    """The stacks of a job array (`sweep --slurm`, `--stack-index I`), planned from the whole study so that
    every task plans the same: `stack` trials of one shape per stack, or (None) every trial of a shape in
    one stack. Nothing here reads the machine's memory (tasks run on nodes with different free memory); an
    automatic stack that does not fit the task's device trains there in parts that do (the task plans its own
    stack again by memory, `stack_sizer`)."""
    return plan_stacks(trials, stack_sizer(stack, config_of, auto=lambda _cfg, count: count))


def train_trials(configs: Callable[[], list[RunConfig]], keys: list[str]) -> list[str]:
    """Train the trials of `keys`, whose run configs `configs()` builds, one alone (`trainer.train`) or several
    as one stack; each trial's sweep status (a trial whose config cannot be built, or that raised, fails:
    one broken trial, or stack, must not end the study)."""
    try:
        cfgs = configs()
        if len(cfgs) == 1:
            from mutransfer.train.trainer import train

            results = [train(cfgs[0])]
        else:
            from mutransfer.train.stacked_run import train_stack

            results = train_stack(cfgs)
    except Exception as err:
        what = f"trial {keys[0]}" if len(keys) == 1 else f"stack of {len(keys)} trials ({keys[0]}, ...)"
        log.error(f"{what} failed: {type(err).__name__}: {err}")
        return [RunStatus.FAILED] * len(keys)
    return [RunStatus.INTERRUPTED if r.status == RunStatus.PREEMPTED else r.status for r in results]
