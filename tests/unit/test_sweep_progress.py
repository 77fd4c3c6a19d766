"""study/progress.py: the sweep's time left prices each trial not yet done by a line fitted to the seconds its
shape's trials took against their arithmetic, so that cheap shapes trained first do not promise an early end."""

from __future__ import annotations

import pytest

from mutransfer.study.progress import SweepProgress, TrialCosts, trial_work
from mutransfer.study.trial import TrialSpec


def trials(width: int, count: int, seed: int = 0) -> list[TrialSpec]:
    return [TrialSpec("mup", width, 4, 32, 120, 2.0**-i, 0.9, 0.0, seed) for i in range(count)]


def test_the_line_prices_a_shape_not_yet_trained() -> None:
    costs = TrialCosts()
    for work, count in ((1.0, 3), (4.0, 2)):
        for _ in range(count):
            costs.add(work, 40 + 17 * work)
    assert costs.per_trial()(16.0) == pytest.approx(40 + 17 * 16)


def test_one_shape_prices_every_trial_alike_and_none_prices_nothing() -> None:
    costs = TrialCosts()
    assert costs.per_trial() is None
    costs.add(1.0, 10.0)
    costs.add(1.0, 20.0)
    assert costs.per_trial()(100.0) == pytest.approx(15.0)


def test_lines_that_make_no_sense_fall_back() -> None:
    falling = TrialCosts()
    falling.add(1.0, 30.0)
    falling.add(2.0, 10.0)
    assert falling.per_trial()(8.0) == pytest.approx(20.0)  # the mean
    no_fixed_cost = TrialCosts()
    no_fixed_cost.add(1.0, 1.0)
    no_fixed_cost.add(2.0, 5.0)  # the fitted line would cross zero at a positive work
    per_trial = no_fixed_cost.per_trial()
    assert per_trial(0.0) == 0.0 and per_trial(2.0) == pytest.approx(2 * (1 + 2 * 5) / (1 + 4))


def test_the_bar_counts_trials_and_shows_the_priced_time_left() -> None:
    narrow, wide, widest = trials(32, 2), trials(64, 2), trials(128, 2)
    now = [0.0]
    progress = SweepProgress(narrow + wide + widest, "study s", show=True, clock=lambda: now[0])
    progress.started("first stack")
    for stack, at in ((narrow, 60.0), (wide, 165.0)):  # one stack each, its trials recorded together
        now[0] = at
        progress.trained(stack)
    per_trial = TrialCosts()
    for work, seconds in ((trial_work(narrow[0]), 30.0), (trial_work(wide[0]), 52.5)):
        per_trial.add(work, seconds)
    expected = 2 * per_trial.per_trial()(trial_work(widest[0]))
    assert progress.seconds_left() == pytest.approx(expected)
    assert expected > 4 * 30.0  # what the trial count would have said after the narrow stack
    progress.passed(widest[0])  # another sweep trained it
    assert progress.seconds_left() == pytest.approx(expected / 2)
    text = str(progress.bar)
    assert "5/6 trials" in text and "left, first stack" in text
    progress.close()


def test_with_one_shape_timed_the_time_left_is_marked_as_a_floor_until_a_dearer_one_is() -> None:
    narrow, wide = trials(32, 2), trials(64, 2)
    now = [0.0]
    progress = SweepProgress(narrow + wide, "study s", show=True, clock=lambda: now[0])
    now[0] = 60.0
    progress.trained(narrow[:1])
    assert "~03:00+ left" in str(progress.bar)  # 3 trials at 60 s, at least: the wide ones cost more
    now[0] = 90.0
    progress.trained(narrow[1:])  # still one work level: still a floor
    assert "+ left" in str(progress.bar)
    now[0] = 200.0
    progress.trained(wide[:1])
    assert " left" in str(progress.bar) and "+ left" not in str(progress.bar)
    progress.close()
    same = SweepProgress(trials(32, 2), "study s", show=True, clock=lambda: now[0])
    same.trained(trials(32, 2)[:1])
    assert "+ left" not in str(same.bar)  # nothing dearer to come: the mean is the estimate
    same.close()


def test_a_stacks_time_is_shared_by_its_trials() -> None:
    """32 trials that trained together for 64 s cost 2 s each: the 32 of the same shape left take 64 s (charged
    to the first record alone, the stack's time priced each trial left at 64 s: 34 minutes)."""
    first, second = trials(32, 32), trials(32, 32, seed=1)
    now = [0.0]
    progress = SweepProgress(first + second, "study s", show=False, clock=lambda: now[0])
    now[0] = 64.0
    progress.trained(first)
    assert progress.seconds_left() == pytest.approx(64.0)
    progress.close()
