"""healthmon.schedules: the cadence type, log-spaced schedules and the time-budget clock."""

from __future__ import annotations

import pytest

from healthmon.schedules import (
    BudgetClock,
    LogSpacedSteps,
    LogThenEvery,
    SampledEvery,
    cadence,
    check_cadence,
    log_then_every,
)


def test_log_then_every_and_int_cadences() -> None:
    sched = log_then_every(100)
    assert isinstance(sched, LogThenEvery)
    assert [s for s in range(450) if sched(s)] == [0, 1, 4, 16, 64, 100, 200, 300, 400]
    every3 = cadence(3)
    assert [s for s in range(10) if every3(s)] == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="`every_n_steps`"):
        check_cadence(0)
    with pytest.raises(ValueError, match="`base`"):
        LogThenEvery(10, base=1)
    early = LogSpacedSteps(4, until=1000)
    assert [s for s in range(3000) if early(s)] == early.steps() == [0, 1, 4, 16, 64, 256]


def test_a_sampled_cadence_is_a_cadence_the_budget_can_stretch() -> None:
    every = SampledEvery(100)
    assert check_cadence(every) is every and cadence(every) is every  # a callable cadence
    assert [s for s in range(450) if every(s)] == [0, 100, 200, 300, 400]
    assert [s for s in range(900) if every(s, stretch=4)] == [0, 400, 800]
    assert every == SampledEvery(100) != SampledEvery(50) and len({every, SampledEvery(100)}) == 1
    assert str(every) == "100" and repr(every) == "SampledEvery(100)"  # str: a checkpoint key as 100's
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="`every`: expected an integer >= 1"):
            SampledEvery(bad)  # type: ignore[arg-type]


def test_an_estimate_before_calibration_is_priced_once_step_times_are_known() -> None:
    """The step-0 estimate of the default schedule: the next one is planned from its cost."""
    t = [0.0]
    clock = BudgetClock(0.1, calibration=2, now=lambda: t[0])
    clock.total_steps = 1000
    assert clock.due(0) is False
    clock.spent(0, 3.0)  # a 3 s estimate at step 0, before any step time is known
    assert clock.next_step is None and clock.spent_total == 0.0  # step 0 is outside the budget
    t[0] += 4.0  # 3 s estimate + 1 s step
    clock.due(1)
    t[0] += 1.0
    clock.due(2)  # calibrated: 1 s per step, 2 s trained; one more 3 s estimate at 10%
    assert clock.seconds_per_step == 1.0 and clock.next_step == 2 + 28  # (3 - 0.1 * 2) / 0.1


def test_budget_clock_keeps_the_estimates_after_step_0_within_the_budget() -> None:
    t = [0.0]
    clock = BudgetClock(0.1, calibration=2, now=lambda: t[0])
    clock.total_steps = 1000
    due = []
    for step in range(3):  # 1 s per step; nothing is due before calibration ends
        due.append(clock.due(step))
        t[0] += 1.0
    assert due == [False, False, False]
    # no estimate yet: a cold one (150 step-times) is earned at 10% of the 1 s steps
    assert clock.next_step == 2 + 1498  # (150 - 0.1 * 2) / 0.1
    clock.spent(1500, 5.0)  # 5 s spent: the next 5 s estimate once 10% of training time covers 10 s
    assert clock.spent_total == 5.0 and clock.next_step == 1500 + 98  # (5 + 5 - 0.2) / 0.1
    t[0] += 5.0  # the estimate's own time does not count as training time
    assert clock.due(3) is False and clock.seconds_per_step == 1.0
    t[0] += 10.0  # ten steps later, the steps between skipped: the gap is timed as a whole
    assert clock.due(13) is False and clock.timed_steps == 13 and clock.seconds_per_step == 1.0
    agreed = BudgetClock(0.1, calibration=1, agree=lambda steps: steps * 2, now=lambda: t[0])
    agreed.total_steps = 1000
    agreed.due(0)
    t[0] += 1.0
    agreed.due(1)
    assert agreed.next_step == 1 + 2 * 1499  # the DDP agreement decides


def test_a_planned_estimate_waits_when_the_steps_turned_out_faster_than_planned() -> None:
    """The plan is made from the first (slow) steps; at the planned step the budget is checked again."""
    t = [0.0]
    clock = BudgetClock(0.1, calibration=2, now=lambda: t[0])
    for step in range(3):  # 10 s a step during calibration
        clock.due(step)
        t[0] += 10.0
    clock.spent(3, 10.0)  # 10 s spent; one more of 10 s needs 200 s of training at 10%
    planned = clock.next_step
    assert planned == 3 + 18  # (10 + 10 - 0.1 * 20) / (0.1 * 10): planned at 10 s a step
    t[0] += 10.0  # the estimate's own time
    for step in range(4, planned):  # then 1 s a step: far less training time than planned
        clock.due(step)
        t[0] += 1.0
    assert clock.due(planned) is False and clock.next_step > planned  # waits: it does not fit yet
    assert clock.spent_total + 10.0 > 0.1 * clock.train_seconds


def test_an_estimate_that_seeks_lambda_min_is_priced_as_such_before_it_runs() -> None:
    """Each kind of estimate is priced from its own kind.

    A 6,000-step run of the benchmark MLP once spent 5.7% of its time on estimates under a 2%
    budget: the fourth later estimate, with lambda_min (110 products), was planned at the cost of
    the last top-only one (7 products).
    """
    t = [0.0]
    clock = BudgetClock(0.1, calibration=2, negative_products=100, now=lambda: t[0])
    for step in range(3):  # 1 s a step
        clock.due(step)
        t[0] += 1.0
    clock.spent(3, 1.0, products=10, next_negative=True)  # 0.1 s a product; lambda_min comes next
    assert clock.next_cost == 1.0 + 100 * 0.1  # the top's cost plus a full lambda_min solve
    assert clock.next_step == 3 + 118  # (1 spent + 11 coming - 0.1 * 2 s trained) / 0.1 s a step
    clock.spent(113, 6.0, products=60, negative=True, next_negative=False)
    assert clock.next_cost == 1.0  # the next one seeks lambda_max only: priced as the last such one
    clock.spent(200, 1.0, products=10, next_negative=True)
    assert clock.next_cost == 6.0  # a lambda_min estimate has run: its measured cost
    state = clock.state()
    restored = BudgetClock(0.1)
    restored.load(state)
    assert restored.next_cost == 6.0 and restored.next_negative
