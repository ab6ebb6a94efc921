"""Schedules: when a monitor runs, as a function ``step -> bool`` of the optimizer step.

* :data:`Cadence` - what every monitor's ``every_n_steps`` accepts: an int period or a callable.
* :class:`SampledEvery` - the sampled checks' default: a period the overhead budget may stretch.
* :class:`LogThenEvery` - log-spaced steps early in the run, then a fixed period.
* :class:`BudgetClock` - the next step at which an expensive estimate fits a share of training time.
* :class:`CheckBudget` - which steps get the per-step gradient checks, within a share of step time.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

Cadence = int | Callable[[int], bool]

#: The share of step time the per-step gradient checks may take by default (see :class:`CheckBudget`).
DEFAULT_OVERHEAD_BUDGET = 0.01


def _positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}`: expected an integer >= {minimum}, got {value!r}.")
    return value


def cadence(value: Any, name: str = "every_n_steps") -> Callable[[int], bool]:
    """A schedule ``step -> bool`` from an int period or a callable (Cockpit-style schedules).

    >>> every_3 = cadence(3)
    >>> [s for s in range(10) if every_3(s)]
    [0, 3, 6, 9]
    """
    if callable(value):
        return value
    every = _positive_int(value, name)
    return lambda step: step % every == 0


class SampledEvery:
    """Every ``every`` optimizer steps, times the stretch the overhead budget asks for.

    The default cadence of the checks that sample a step (the underflow counts, the logits
    checks). On a model whose step is so short that these samples, with the log steps, cost more
    than the bundle's ``overhead_budget`` even with the gradient checks at their sparsest, the
    :class:`CheckBudget` sets a ``stretch`` (a power of two, up to 8) at which they fit;
    everywhere else the stretch is 1. An int ``every_n_steps`` is kept exactly. ``str()`` is the
    period (a checkpoint's callback key stays that of an int cadence).

    >>> every = SampledEvery(100)
    >>> [s for s in range(0, 500, 50) if every(s)], [s for s in range(0, 500, 50) if every(s, stretch=2)]
    ([0, 100, 200, 300, 400], [0, 200, 400])
    """

    __slots__ = ("every",)

    def __init__(self, every: int) -> None:
        self.every = _positive_int(every, "every")

    def __call__(self, step: int, stretch: int = 1) -> bool:
        """Whether ``step`` is sampled when the budget stretches the period by ``stretch``."""
        return step % (self.every * stretch) == 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SampledEvery) and other.every == self.every

    def __hash__(self) -> int:
        return hash((SampledEvery, self.every))

    def __str__(self) -> str:
        return str(self.every)

    def __repr__(self) -> str:
        return f"SampledEvery({self.every})"


#: The default cadence of the sampled checks (the underflow counts, the logits checks).
SAMPLED_EVERY_100 = SampledEvery(100)


def check_cadence(value: Any, name: str = "every_n_steps") -> Cadence:
    """Validate a cadence argument and return it unchanged."""
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}`: expected an integer >= 1 or a callable step -> bool, got {value!r}.")
    return value


class LogThenEvery:
    """Schedule: steps 0, 1, base, base^2, ... below ``every``, then every multiple of ``every``.

    Early estimates catch a run that is unstable from its first steps; later ones are sparse and
    warm-started (the top eigenvector moves slowly), which keeps the amortised cost low.
    """

    def __init__(self, every: int, base: int = 4) -> None:
        self.every = _positive_int(every, "every")
        self.base = _positive_int(base, "base", minimum=2)
        self.__name__ = f"log_then_every({every}, base={base})"

    def __call__(self, step: int) -> bool:
        """Whether ``step`` is on the schedule."""
        if step % self.every == 0:
            return True
        if step >= self.every:
            return False
        power = 1
        while power < step:
            power *= self.base
        return power == step

    def __repr__(self) -> str:
        return self.__name__


def log_then_every(every: int = 2000, *, base: int = 4) -> Callable[[int], bool]:
    """The default cadence of :class:`HessianEigenMonitor`: log-spaced early, then every ``every``.

    ``log_then_every(2000)`` runs at steps 0, 1, 4, 16, 64, 256, 1024, 2000, 4000, ...

    >>> due = log_then_every(2000)
    >>> [s for s in range(4001) if due(s)]
    [0, 1, 4, 16, 64, 256, 1024, 2000, 4000]
    """
    return LogThenEvery(every, base)


class BudgetClock:
    """When the next Hessian estimate is due so that estimates take at most ``budget`` of training time.

    Training time is measured between batch starts, minus the estimates' own time. The budget is
    cumulative: :attr:`spent_total`, the seconds of every estimate after step 0 (the step-0
    estimate is promised whatever it costs), stays within ``budget`` x the training time so far,
    the next estimate coming once the training time covers what was spent plus one more estimate
    of the last one's cost. The decision is made in steps, at known points (after
    ``calibration`` timed steps, and right after each estimate):
    ``next = step + ceil((spent_total + cost - budget * train_seconds) / (budget * seconds_per_step))``,
    at least one step; when that step comes, the budget is checked again with the step time
    measured by then (the first steps of a run are slow) and the estimate waits if it would not
    fit yet. ``agree`` maps a proposed interval to the one every DDP rank uses (the largest), so all
    ranks estimate at the same step. Before any estimate, ``cost`` is that of a cold estimate,
    about ``COLD_COST_STEPS`` training steps. An estimate that also seeks ``lambda_min`` (every
    few, see :func:`~healthmon.numerics.estimate_plan.plan_estimate`) costs many times one that
    does not (a cold solve of up to ``negative_products`` products where the warm top needs a
    few): the next estimate's kind is known when the last one ends (``spent(next_negative=...)``),
    and its cost is predicted from the last estimate of the same kind, or, before the first
    with ``lambda_min``, from the last one's seconds per product times ``negative_products`` more.

    >>> clock = BudgetClock(0.1, calibration=2)
    >>> clock.train_seconds, clock.timed_steps = 2.0, 2    # 1 s a step
    >>> clock.spent(2, 0.5)                                 # an estimate of 0.5 s at step 2
    >>> clock.next_step        # (0.5 spent + 0.5 next - 0.1 * 2 s earned) / 0.1 s a step
    10
    >>> clock.spent(3, 0.5); clock.next_step                # (1.0 + 0.5 - 0.2) / 0.1
    16
    """

    COLD_COST_STEPS = 150  # a first (cold) estimate costs about this many training steps

    def __init__(
        self,
        budget: float,
        *,
        calibration: int = 10,
        negative_products: int = 100,
        agree: Callable[[int], int] = lambda steps: steps,
        now: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.budget = budget
        self.calibration = calibration
        self.negative_products = negative_products
        self.agree = agree
        self.now = now
        self.next_negative = False  # the next estimate also seeks lambda_min
        self.last_negative_cost: float | None = None  # seconds of the latest such estimate
        self.seconds_per_product: float | None = None  # of the latest estimate
        self.next_step: int | None = None
        self.total_steps = math.inf  # the run's planned optimizer steps (Lightning's estimate)
        self.train_seconds = 0.0
        self.timed_steps = 0
        self.spent_total = 0.0  # seconds of the estimates after step 0
        self._last: float | None = None
        self._last_step = 0
        self._estimating = 0.0
        self.last_cost: float | None = None  # seconds of the latest estimate (early ones too)

    def due(self, step: int) -> bool:
        """Call at the start of an optimizer step; True when an estimate is due.

        Steps in between may be skipped (nothing is due before :attr:`next_step`): the training
        time of the gap is timed as a whole.
        """
        now = self.now()
        if self._last is not None:  # the steps since the last call (some may have been skipped)
            self.train_seconds += max(now - self._last - self._estimating, 0.0)
            self.timed_steps += max(step - self._last_step, 1)
        self._last, self._last_step, self._estimating = now, step, 0.0
        if self.timed_steps < self.calibration:
            return False
        cost = self.next_cost
        if self.next_step is None:
            self.next_step = step + self._interval(cost)
        if step < self.next_step:
            return False
        # planned with the step time known then: check again with today's (the first steps are slow)
        owed = self.agree(max(self._owed_steps(cost), 0))
        if owed > 0:
            self.next_step = step + owed
            return False
        return True

    def spent(
        self,
        step: int,
        seconds: float,
        *,
        products: int = 0,
        negative: bool = False,
        next_negative: bool = False,
    ) -> None:
        """An estimate at ``step`` took ``seconds`` (all of it, set-up included): schedule the next one.

        ``products``: its Hessian-vector products; ``negative``: it sought ``lambda_min`` too;
        ``next_negative``: the next estimate will.
        """
        self._estimating += seconds
        if negative:
            self.last_negative_cost = seconds
        else:
            self.last_cost = seconds
        if products > 0:
            self.seconds_per_product = seconds / products
        self.next_negative = next_negative
        if step > 0:
            self.spent_total += seconds
        if self.timed_steps >= self.calibration:  # else: planned once the step time is known
            self.next_step = step + self._interval(self.next_cost)

    @property
    def next_cost(self) -> float:
        """The predicted seconds of the next estimate (see the class docstring)."""
        cold = self.COLD_COST_STEPS * self.seconds_per_step
        top = self.last_cost if self.last_cost is not None else cold
        if not self.next_negative:
            return top
        if self.last_negative_cost is not None:
            return self.last_negative_cost
        per_product = self.seconds_per_product if self.seconds_per_product is not None else top / 10
        return top + self.negative_products * per_product

    def early_affordable(self, early_budget: float) -> bool:
        """Whether one more early estimate fits ``early_budget`` of the planned run's training time.

        Cumulative: the estimates after step 0 plus one more of the last one's cost. Always
        true when the run's length is unknown or no estimate ran yet.
        """
        planned = self.seconds_per_step * self.total_steps
        if self.last_cost is None or not math.isfinite(planned):
            return True
        return self.spent_total + self.last_cost <= early_budget * planned

    @property
    def seconds_per_step(self) -> float:
        """Mean training seconds per timed step (the estimates' own time excluded)."""
        return self.train_seconds / max(self.timed_steps, 1)

    def _owed_steps(self, cost: float) -> int:
        """Training steps still to run before one more estimate of ``cost`` fits the budget (<= 0: none)."""
        owed = self.spent_total + cost - self.budget * self.train_seconds
        return math.ceil(owed / (self.budget * max(self.seconds_per_step, 1e-9)))

    def _interval(self, cost: float) -> int:
        return self.agree(max(1, self._owed_steps(cost)))

    def state(self) -> dict[str, Any]:
        """The clock's state, for a checkpoint."""
        return {
            "next_step": self.next_step,
            "train_seconds": self.train_seconds,
            "timed_steps": self.timed_steps,
            "last_cost": self.last_cost,
            "spent_total": self.spent_total,
            "next_negative": self.next_negative,
            "last_negative_cost": self.last_negative_cost,
            "seconds_per_product": self.seconds_per_product,
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state`."""
        self.next_step = state.get("next_step")
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.timed_steps = int(state.get("timed_steps", 0))
        self.last_cost = state.get("last_cost")
        self.spent_total = float(state.get("spent_total", 0.0))
        self.next_negative = bool(state.get("next_negative", False))
        self.last_negative_cost = state.get("last_negative_cost")
        self.seconds_per_product = state.get("seconds_per_product")


class LogSpacedSteps:
    """Steps 0, 1, base, base^2, ... below ``until`` (0, 1, 4, 16): the early estimates of a run.

    A learning rate far above the stability limit shows at step 0, before the first update; the
    first update (a warm-up's first nonzero learning rate) shows at step 1; the first steps of
    sharpening on a log scale. Later steps are left to another schedule.

    >>> due = LogSpacedSteps(base=4, until=20)
    >>> [s for s in range(200) if due(s)], due
    ([0, 1, 4, 16], log_spaced(base=4, until=20))
    """

    def __init__(self, base: int = 4, until: int = 1000) -> None:
        self.base = _positive_int(base, "base", minimum=2)
        self.until = _positive_int(until, "until", minimum=0)

    def steps(self) -> list[int]:
        """The steps of the schedule, in order.

        >>> LogSpacedSteps(base=4, until=100).steps()
        [0, 1, 4, 16, 64]
        """
        found, power = [0, 1], self.base
        while power < self.until:
            found.append(power)
            power *= self.base
        return [s for s in found if s < self.until]

    def __call__(self, step: int) -> bool:
        """Whether ``step`` is one of the log-spaced steps below ``until``."""
        if step >= self.until:
            return False
        if step <= 1:
            return True
        power = self.base
        while power < step:
            power *= self.base
        return power == step

    def __repr__(self) -> str:
        return f"log_spaced(base={self.base}, until={self.until})"


class LogCadence:
    """When to write scalars: every ``every`` steps, and whenever that many have passed unlogged.

    Checks that run on their own cadence (or an optimizer that steps on odd global steps) would
    otherwise never land on a multiple of ``every``; the first step asked always logs.

    >>> log = LogCadence()
    >>> [step for step in (0, 3, 7, 10, 13, 25) if log.due(step, every=10)]
    [0, 10, 25]
    """

    def __init__(self) -> None:
        self.last: int | None = None

    def due(self, step: int, every: int) -> bool:
        """Whether ``step`` writes scalars (and remember it when it does)."""
        if self.would_log(step, every):
            self.last = step
            return True
        return False

    def would_log(self, step: int, every: int) -> bool:
        """Whether :meth:`due` would say yes at ``step`` (nothing is remembered)."""
        return self.last is None or step % every == 0 or step - self.last >= every


class CheckBudget:
    """Which optimizer steps get the full gradient checks, and how far samples space out, within ``budget``.

    Why: the checks (one fused norm over every gradient, the trend rules, the logged scalars) cost
    a fixed time, about 0.1 ms a step on a CPU. On a large model that is nothing; on a model whose
    step takes 2 ms it is 5%. The first ``calibration`` optimizer steps are all checked (the trend
    rules' warm-ups and the first steps' sizes see every step) while the time between optimizer
    steps and a check's own cost are measured. Then, and again every ``calibration`` steps, the
    stride is planned: the smallest power of two (at most ``max_stride``) at which the checks
    cost at most ``budget`` of the median step. The checks the stride does not decide (log
    steps, a monitor's own cadence, work deferred to the next step: ``spent(..., forced=True)``)
    are paid first: the stride's checks get what they leave of the budget, and when they leave
    nothing the stride is ``max_stride``. If even then the checks cost more than the budget,
    once a sampled step (:meth:`sample`) has been measured, ``stretch`` becomes the smallest power
    of two (up to ``max_stretch``) at which they fit, a sample costing what the recent ones cost,
    once every ``every x stretch`` steps: the :class:`SampledEvery` cadences space out by it. The
    stretch never shrinks in a fit (no oscillation). The stride is the longest gap between
    checked steps: a step is checked ``stride`` steps after the last checked one, whatever checked
    that one (a log step and a monitor's cadence count, so the stride adds checks only where they
    leave a gap); other steps are not (the loss still is, see
    :class:`~healthmon.engine.step_stats.StepStatistics`). ``budget=None``, or :meth:`every_step`:
    every step is checked and nothing is stretched.

    >>> clock = iter(range(0, 10**6, 10))          # a step every 10 time units, checks cost 1
    >>> checks = CheckBudget(0.02, calibration=4, now=lambda: next(clock) * 1.0)
    >>> for step in range(8):
    ...     _ = checks.step_started()
    ...     if checks.checks(step):
    ...         checks.spent(1.0)
    ...     _ = checks.plan(step)
    >>> checks.stride, [s for s in range(8, 24) if checks.checks(s)]
    (8, [8, 16])
    >>> [s for s in range(8, 24) if checks.checks(s, last=13)]  # step 13 was checked (a log step)
    [21, 22, 23]
    """

    def __init__(
        self,
        budget: float | None,
        *,
        calibration: int = 20,
        max_stride: int = 64,
        max_stretch: int = 8,
        now: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.budget = budget
        self.calibration = _positive_int(calibration, "calibration")
        self.max_stride = _positive_int(max_stride, "max_stride")
        self.max_stretch = _positive_int(max_stretch, "max_stretch")
        self.now = now
        self.stride = 1
        self.stretch = 1
        self.enabled = budget is not None
        self._intervals: deque[float] = deque(maxlen=64)  # seconds between optimizer steps, checks excluded
        self._costs: deque[float] = deque(maxlen=16)  # seconds of recent checks
        self._last: float | None = None
        self._spent = 0.0  # check seconds since the last step started
        self._planned_at = -1
        self._steps = 0  # optimizer steps started
        self._forced = 0.0  # seconds of the forced checks that are not samples (log steps)
        self._samples: deque[float] = deque(maxlen=8)  # seconds of recent sampled steps
        self._sample_every = 1  # their cadence's period at stretch 1

    def reset(self) -> None:
        """Start over (a new fit): calibrate again."""
        self.stride, self.stretch = 1, 1
        self.enabled = self.budget is not None
        self._intervals.clear()
        self._costs.clear()
        self._last, self._spent, self._planned_at = None, 0.0, -1
        self._steps, self._forced = 0, 0.0
        self._samples.clear()

    def every_step(self) -> None:
        """Check every step from now on (distributed runs, a ``GradScaler``: see the driver)."""
        self.enabled = False
        self.stride, self.stretch = 1, 1

    def checks(self, step: int, last: int | None = None) -> bool:
        """Whether ``step`` gets the full checks: ``stride`` steps after ``last``, the last checked one.

        Without ``last``, the multiples of the stride. Every step of the calibration is checked.
        """
        if self.stride == 1 or step < self.calibration:
            return True
        return step % self.stride == 0 if last is None else step - last >= self.stride

    def next_check(self, step: int, last: int | None = None) -> int:
        """The first step from ``step`` on that :meth:`checks` (``last``: the last checked one)."""
        if self.stride == 1 or step < self.calibration:
            return step
        if last is None:
            return -(-step // self.stride) * self.stride
        return max(step, last + self.stride)

    def step_started(self) -> float:
        """Call once per optimizer step, before its checks: times the step that just ended.

        Returns the time now (the start of this step's checks).
        """
        now = self.now()
        if not self.enabled:
            return now
        if self._last is not None:
            self._intervals.append(max(now - self._last - self._spent, 0.0))
        self._last, self._spent = now, 0.0
        self._steps += 1
        return now

    def spent(self, seconds: float, *, forced: bool = False, sampled: bool = False) -> None:
        """A check took ``seconds``.

        ``forced``: the stride did not ask for it; ``sampled``: work of the last :meth:`sample`
        (the sampled step itself, or its values judged at the next synchronisation).
        """
        self._spent += seconds
        if not forced:
            self._costs.append(seconds)
        elif self._steps <= self.calibration:
            return  # calibration: every step is checked anyway
        elif sampled and self._samples:
            self._samples[-1] += seconds
        else:
            self._forced += seconds

    def sample(self, every: int) -> None:
        """A :class:`SampledEvery` cadence of period ``every`` samples this step (its cost follows)."""
        if self._steps > self.calibration:
            self._samples.append(0.0)
            self._sample_every = every

    def plan(self, step: int) -> bool:
        """Re-plan the stride at the end of calibration and every ``calibration`` steps after.

        Returns whether the stride or the stretch changed (the next checked step moves).
        """
        if not self.enabled or step + 1 < self.calibration or step - self._planned_at < self.calibration:
            return False
        self._planned_at = step
        if not self._intervals or not self._costs:
            return False
        allowed = self.budget * statistics.median(self._intervals)  # type: ignore[operator]
        room = allowed - self.seconds_forced_per_step  # what the forced checks leave
        cost = statistics.fmean(self._costs)
        stride = 1
        while stride < self.max_stride and cost / stride > room:
            stride *= 2
        changed, self.stride = stride != self.stride, stride
        if cost / stride > room and self._samples and self.stretch < self.max_stretch:
            stretch = self.stretch
            self._space_out_samples(allowed - cost / stride)
            changed = changed or self.stretch != stretch
        return changed

    def _space_out_samples(self, room: float) -> None:
        """The smallest stretch at which the forced checks fit ``room`` seconds a step (or the largest)."""
        stretch = self.stretch
        while stretch < self.max_stretch and self._forced_at(stretch) > room:
            stretch *= 2
        self.stretch = stretch

    def _forced_at(self, stretch: int) -> float:
        """The forced checks' seconds per optimizer step since calibration, samples at ``stretch``."""
        other = self._forced / max(self._steps - self.calibration, 1)
        if not self._samples:
            return other
        return other + statistics.fmean(self._samples) / (self._sample_every * stretch)

    def summary(self) -> dict[str, Any]:
        """What the report says of the checks: the budget, the stride and what was measured."""
        return {
            "overhead_budget": self.budget,
            "every_n_steps": self.stride,
            "seconds_per_check": self.seconds_per_check,
            "seconds_per_step": self.seconds_per_step,
            "forced_seconds_per_step": self.seconds_forced_per_step,
            "sampled_stretch": self.stretch,
        }

    @property
    def seconds_forced_per_step(self) -> float:
        """The forced checks' seconds per optimizer step since calibration, at the current stretch."""
        return self._forced_at(self.stretch)

    @property
    def seconds_per_check(self) -> float | None:
        """The mean cost of the recent checks (None before the first)."""
        return statistics.fmean(self._costs) if self._costs else None

    @property
    def seconds_per_step(self) -> float | None:
        """The median time between optimizer steps, checks excluded (None before two steps)."""
        return statistics.median(self._intervals) if self._intervals else None
