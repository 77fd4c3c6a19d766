"""The sweep's progress bar: trials done of the sweep's, and the time left weighed by what each trial costs.

Trials of one study differ in cost: in the demo a width-128 stack takes about 4x a width-32 one on 2 CPU cores
(130-134 s against 33-34 s on a 2017 EPYC), so a bar that counts trials (tqdm's own estimate) promises the end
far too early while the narrow shapes train. Here the time a shape's trials took (the time from the previous
record to a stack's, shared by the stack's trials, which end together) is fitted against each shape's
arithmetic, `trial_work`, as seconds per trial = a + b x work (a: what a trial costs whatever its size; both at
least 0); once two shapes of different work have trained, every trial not yet done is priced by that line.
Before then all trials cost the same (the trial count's estimate), and where dearer shapes are still to come
that is a floor, shown as "~2:46+ left" (the demo's first estimate: the sweep took 6:55 more).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from .trial import TrialSpec


def trial_work(trial: TrialSpec) -> float:
    """A trial's arithmetic up to a constant factor: the samples it trains on times what a transformer block
    computes per sample at its width (width^2) and depth. Only ratios between a study's shapes matter."""
    return float(trial.batch_size * trial.steps * trial.depth * trial.width**2)


class TrialCosts:
    """Seconds per trial as a line in `trial_work`, fitted to the trials recorded so far."""

    def __init__(self) -> None:
        self.seconds: dict[float, float] = {}  # work -> seconds its trials took in all
        self.counts: dict[float, int] = {}

    def add(self, work: float, seconds: float) -> None:
        self.seconds[work] = self.seconds.get(work, 0.0) + seconds
        self.counts[work] = self.counts.get(work, 0) + 1

    def per_trial(self) -> Callable[[float], float] | None:
        """Predicted seconds of a trial by its work; None before any trial was recorded."""
        if not self.counts:
            return None
        works = np.array(list(self.counts))
        means = np.array([self.seconds[w] / self.counts[w] for w in self.counts])
        weights = np.array([self.counts[w] for w in self.counts], dtype=float)
        mean = float(np.average(means, weights=weights))
        if len(works) < 2:
            return lambda _work: mean
        slope, intercept = np.polyfit(works, means, 1, w=np.sqrt(weights))
        if slope < 0:  # dearer shapes trained faster: no line to trust, every trial at the mean
            return lambda _work: mean
        if intercept < 0:  # no fixed cost: the line through zero that fits best
            slope, intercept = np.sum(weights * works * means) / np.sum(weights * works**2), 0.0
        return lambda work: float(intercept + slope * work)

    def is_floor_for(self, works: list[float]) -> bool:
        """Whether `per_trial` can only under-price `works`: one work level timed, and dearer ones among them."""
        return len(self.counts) == 1 and any(work > next(iter(self.counts)) for work in works)


class SweepProgress:
    """tqdm's bar over the sweep's trials, with `TrialCosts`' estimate of the time left and the trials now
    training in its text."""

    def __init__(self, trials: list[TrialSpec], desc: str, show: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.work_left = {trial.key: trial_work(trial) for trial in trials}
        self.costs = TrialCosts()
        self.clock = clock
        self.last = clock()
        self.running = ""
        self.bar = tqdm(total=len(trials), desc=desc, disable=not show, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} trials [{elapsed}{postfix}]")

    def started(self, what: str) -> None:
        """What trains now (shown after the time left)."""
        self.running = what
        self._show()

    def trained(self, stack: list[TrialSpec]) -> None:
        """The trials of a stack (or one trial) this sweep trained have ended: the time since the last record is
        shared by them. (Charged to a stack's first record alone, it priced every trial left at a whole stack's
        time until the others' records came: "~5:03:43 left" in a demo whose sweep ended 16 minutes later.)"""
        now = self.clock()
        share = (now - self.last) / len(stack)
        for trial in stack:
            self.costs.add(self.work_left.pop(trial.key, trial_work(trial)), share)
        self.last = now
        self._show(refresh=False)
        self.bar.update(len(stack))

    def passed(self, trial: TrialSpec) -> None:
        """A trial another sweep trained or holds: progress, with no time of its own."""
        self.work_left.pop(trial.key, None)
        self.bar.update(1)

    def seconds_left(self) -> float | None:
        per_trial = self.costs.per_trial()
        return None if per_trial is None else sum(per_trial(work) for work in self.work_left.values())

    def _show(self, refresh: bool = True) -> None:
        left = self.seconds_left()
        floor = "+" if self.costs.is_floor_for(list(self.work_left.values())) else ""
        text = "" if left is None else f"~{tqdm.format_interval(left)}{floor} left"
        self.bar.set_postfix_str(", ".join(part for part in (text, self.running) if part), refresh=refresh)

    def close(self) -> None:
        self.bar.close()
