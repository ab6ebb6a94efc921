"""Running statistics and trend rules over the loss and the gradient norm.

The rules work on host floats (one value per step) and cost O(1) per step, except for windowed
rules that look at their whole window only every ``check_every`` steps.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar


def _finite(x: float) -> bool:
    return math.isfinite(x)


@dataclass
class EMA:
    """Exponential moving average; ``value`` is None until the first update."""

    alpha: float
    value: float | None = None

    def update(self, x: float) -> float:
        """Fold ``x`` into the average and return the new value."""
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
        return self.value


def linear_trend(ys: list[float]) -> tuple[float, float]:
    """Least-squares slope per step and Pearson correlation of ``ys`` against their index.

    Returns (0, 0) for fewer than three points or a constant series.
    """
    n = len(ys)
    if n < 3:
        return 0.0, 0.0
    mean_y = sum(ys) / n
    deviations = [y - mean_y for y in ys]
    stt = n * (n * n - 1) / 12  # the sum of (t - mean_t)^2 over t = 0..n-1
    syy = sum(map(operator.mul, deviations, deviations))
    # sum of (t - mean_t)(y - mean_y): mean_t times the deviations' sum (rounding only) is taken off
    sty = sum(map(operator.mul, range(n), deviations)) - (n - 1) / 2 * sum(deviations)
    if syy <= 0.0:
        return 0.0, 0.0
    return sty / stt, sty / math.sqrt(stt * syy)


@dataclass
class SpikeRule:
    """A gradient explosion: a norm far above its running level that the run does not shrug off.

    A *spike* is a value at least ``factor`` times the running level (an EMA of log10(value), with
    an EMA of its squared deviation as the noise) AND ``z`` noise deviations above it, after
    ``warmup`` observations: a noisy run (mini-batch gradient norms late in training swing by
    several x) needs a larger jump than a quiet one. Spikes are not folded into the level.

    Mini-batch gradient norms spike on their own in healthy runs: the small last batch of an epoch
    under BatchNorm, one hard batch at near-perfect separation. The loss blips with them, the
    next step is back to normal and nothing was lost. A spike is reported as an explosion
    (``grad.explosion``) only when one of these holds:

    * *record*: it is ``factor`` x above the largest norm the run has seen, its first steps
      included (gradient norms at initialisation are a run's natural, usually largest, scale);
    * *loss*: the loss of the same step is above the run's starting level (the mean of its first
      ``warmup`` losses) and ``loss_jump`` x its running level (an EMA over non-spike steps):
      the progress of the run is lost;
    * *persistent*: ``persistence`` consecutive steps are spikes (the norm rose by ``factor`` and
      stays there).

    Once a streak of spikes is confirmed, each further spike of the streak is reported too (a
    sustained explosion keeps being counted). All of it is O(1) per step on host floats.
    """

    factor: float = 10.0
    z: float = 4.0
    warmup: int = 20
    alpha: float = 0.05
    persistence: int = 5
    loss_jump: float = 2.0
    level: EMA = field(default_factory=lambda: EMA(0.05))
    noise: EMA = field(default_factory=lambda: EMA(0.05))
    seen: int = 0
    peak: float | None = None  # largest log10(value) seen
    streak: int = 0  # consecutive spikes, up to the last value
    confirmed: bool = False  # the current streak was reported as an explosion
    loss_level: EMA = field(default_factory=lambda: EMA(0.05))
    start_loss: float | None = None  # mean of the first ``warmup`` losses
    losses_seen: int = 0
    reason: str = field(default="", repr=False)  # why the last reported spike is an explosion

    STATE: ClassVar[tuple[str, ...]] = (
        "level",
        "noise",
        "seen",
        "peak",
        "streak",
        "confirmed",
        "loss_level",
        "start_loss",
        "losses_seen",
    )

    def __post_init__(self) -> None:
        self.level.alpha = self.noise.alpha = self.loss_level.alpha = self.alpha

    def update(self, value: float, loss: float | None = None) -> float | None:
        """Feed one norm (and the step's loss); returns value / running level for an explosion, else None.

        ``reason`` then says which evidence confirmed it.
        """
        if not _finite(value) or value <= 0.0:
            return None
        log_value = math.log10(value)
        loss = loss if loss is not None and _finite(loss) else None
        self.seen += 1
        cap = math.log10(self.factor)
        ratio = None
        if self.seen > self.warmup and self.level.value is not None:
            excess = log_value - self.level.value
            sigma = math.sqrt(self.noise.value or 0.0)
            if excess > cap and excess > self.z * sigma:
                ratio = 10**excess
        explosion = None
        if ratio is not None:
            self.streak += 1
            reason = self._evidence(log_value, loss)
            if reason is not None:
                self.confirmed, self.reason = True, reason
            if self.confirmed:
                explosion = ratio
        else:
            self.streak, self.confirmed = 0, False
            # Winsorised at the factor: a value that is not a spike (too small against the noise)
            # moves the level and the noise no more than a factor-sized jump would.
            if self.level.value is not None:
                log_value_w = min(log_value, self.level.value + cap)
                self.noise.update((log_value_w - self.level.value) ** 2)
                self.level.update(log_value_w)
            else:
                self.level.update(log_value)
            if loss is not None:
                self.loss_level.update(loss)
        if loss is not None and self.losses_seen < self.warmup:
            self.losses_seen += 1
            start = self.start_loss or 0.0
            self.start_loss = start + (loss - start) / self.losses_seen
        self.peak = log_value if self.peak is None else max(self.peak, log_value)
        return explosion

    def _evidence(self, log_value: float, loss: float | None) -> str | None:
        """Why this spike is an explosion (None: an isolated spike the run shrugs off so far)."""
        if self.peak is not None and log_value - self.peak > math.log10(self.factor):
            above, peak = 10 ** (log_value - self.peak), 10**self.peak
            return f"{above:.3g}x above the largest norm seen so far ({peak:.3g})"
        start, level = self.start_loss, self.loss_level.value
        if (
            loss is not None
            and start is not None
            and level is not None
            and start > 0.0
            and loss > start
            and loss > self.loss_jump * level
        ):
            return f"the loss jumped with it to {loss:.4g}, above its start ({start:.4g})"
        if self.streak >= self.persistence:
            return f"{self.streak} consecutive steps above {self.factor:g}x the running level"
        return None


@dataclass
class CollapseRule:
    """The gradient norm collapsed by orders of magnitude while the loss is still high.

    Compares the smoothed log10 gradient norm with its peak after warm-up. The loss (smoothed)
    counts as still high when it is above ``loss_fraction`` of its smoothed value at the end of
    warm-up AND it is not at its floor: it has climbed back from its best (lowest smoothed) value
    by more than ``rebound`` of the progress made from warm-up to that best (and by more than 1%
    of the best). A run that converged, even to a floor above half its initial loss (full-batch
    least squares with noisy targets), has a vanishing gradient because it reached a minimum; a
    network that died or saturated mid-run has a vanishing gradient and a loss that lost its
    progress.
    """

    orders: float = 3.0
    loss_fraction: float = 0.5
    rebound: float = 0.5
    warmup: int = 20
    norm: EMA = field(default_factory=lambda: EMA(0.1))
    loss: EMA = field(default_factory=lambda: EMA(0.1))
    peak: float | None = None
    initial_loss: float | None = None
    best_loss: float | None = None
    seen: int = 0

    STATE: ClassVar[tuple[str, ...]] = ("norm", "loss", "peak", "initial_loss", "best_loss", "seen")

    def update(self, grad_norm: float, loss: float | None) -> float | None:
        """Feed one step; returns the drop in orders of magnitude when collapsed, else None."""
        if not _finite(grad_norm):
            return None
        level = self.norm.update(math.log10(max(grad_norm, 1e-45)))
        loss_level = None
        if loss is not None and _finite(loss):
            loss_level = self.loss.update(loss)
            self.best_loss = loss_level if self.best_loss is None else min(self.best_loss, loss_level)
        self.seen += 1
        if self.seen == self.warmup:
            self.initial_loss = loss_level
        if self.seen < self.warmup:
            return None
        self.peak = level if self.peak is None else max(self.peak, level)
        drop = self.peak - level
        return drop if drop >= self.orders and self._loss_still_high(loss_level) else None

    def _loss_still_high(self, loss_level: float | None) -> bool:
        if loss_level is None or self.initial_loss is None or self.best_loss is None:
            return True  # no loss to judge by: the collapse alone decides
        if loss_level <= self.loss_fraction * self.initial_loss:
            return False
        progress = max(self.initial_loss - self.best_loss, 0.0)
        regained = loss_level - self.best_loss
        return regained > max(self.rebound * progress, 0.01 * abs(self.best_loss))


@dataclass
class DivergenceRule:
    """The loss blows up or rises steadily (loss.divergence).

    Both criteria need persistence, so per-batch noise and single spikes never raise them.

    Blow-up: the level (median of the last ``recent`` losses: a spike, or two, cannot move it)
    exceeds ``blowup`` x the baseline (median of the first ``baseline_steps`` losses: a lucky or
    unlucky first batch does not anchor it) and the early noise envelope (the second-largest of
    those first losses: near a loss of 0, as when fine-tuning a converged model, per-batch ratios
    span orders of magnitude), on ``persistence`` consecutive steps. Judged from the
    ``baseline_steps``-th loss on: a learning rate 100x too high is caught a few steps later.

    Blow-up from the start: a loss that blows up within its first ``baseline_steps`` values and
    then levels off carries that baseline up with it (fine-tuning a converged model with a
    learning rate 100x too high: the first update throws it out of its minimum, the loss jumps
    50x at step 1 and stays there). So the level is also compared with the very first loss, on
    ``persistence`` consecutive steps from the ``recent``-th loss on, when the gradient norm (the
    median of its last ``recent`` values, passed as ``norm``) rose with it by ``blowup`` x its
    first value: the update moved the model, not the batch. One loss alone would be no anchor (a
    lucky first batch: BoringModel's first loss is a third of its stationary level), but a lucky
    batch leaves the model, and the scale of its gradient, where they were.

    Steady rise: over the last ``window`` steps (fewer, down to ``min_window``, early in the run)
    the loss rose by more than ``rise`` (relative to its mean) with a correlation above
    ``min_correlation``, and by more than the early spread (second-largest minus second-smallest
    of the first ``baseline_steps`` losses), on ``rise_checks`` consecutive checks made every
    ``check_every`` steps.
    """

    blowup: float = 10.0
    window: int = 50
    rise: float = 0.5
    min_correlation: float = 0.7
    check_every: int = 10
    min_window: int = 20
    baseline_steps: int = 10
    recent: int = 5
    persistence: int = 3
    rise_checks: int = 2
    early: list[float] = field(default_factory=list)
    history: deque = field(default_factory=deque)
    norms: deque = field(default_factory=deque)
    first_norm: float | None = None
    seen: int = 0
    over: int = 0
    rising: int = 0
    # the baseline and the early envelope, computed once the first losses are all in (every step
    # reads them: the divergence rule sees every step's loss)
    _fixed: tuple[float, float] | None = field(default=None, init=False, repr=False, compare=False)
    # the last ``recent`` losses, whose median is the level (kept apart: read at every loss)
    _recent: deque = field(default_factory=deque, init=False, repr=False, compare=False)

    STATE: ClassVar[tuple[str, ...]] = ("early", "history", "norms", "first_norm", "seen", "over", "rising")

    def __post_init__(self) -> None:
        self.history = deque(self.history, maxlen=max(self.window, self.recent))
        self.norms = deque(self.norms, maxlen=self.recent)
        self.after_load()

    def after_load(self) -> None:
        """Derive again what comes from the losses (after :func:`load_rule_state` restored them)."""
        self._fixed = None
        self._recent = deque(list(self.history)[-self.recent :], maxlen=self.recent)

    @property
    def baseline(self) -> float | None:
        """The median of the first ``baseline_steps`` losses (None until they are seen)."""
        fixed = self._baseline_envelope()
        return None if fixed is None else fixed[0]

    def _baseline_envelope(self) -> tuple[float, float] | None:
        """The baseline and the second-largest of the first losses (None until they are seen)."""
        if len(self.early) < self.baseline_steps:
            return None
        if self._fixed is None:
            first = self.early[: self.baseline_steps]
            self._fixed = (_median(first), sorted(first)[-min(2, self.baseline_steps)])
        return self._fixed

    def update(self, loss: float, norm: float | None = None) -> str | None:
        """Feed one loss (and the step's gradient norm); returns a reason or None.

        The reason reads "blew up ..." or "rose steadily ...".
        """
        if not math.isfinite(loss):
            return None
        self.seen += 1
        if len(self.early) < self.baseline_steps:
            self.early.append(loss)
        self.history.append(loss)
        self._recent.append(loss)
        if norm is not None and _finite(norm) and norm > 0.0:
            self.norms.append(norm)
            if self.first_norm is None and self.seen == 1:
                self.first_norm = norm
        reason = self._blowup()
        if self.seen % self.check_every == 0 and len(self.history) >= min(self.min_window, self.window):
            rise = self._steady_rise()
            self.rising = self.rising + 1 if rise is not None else 0
            if rise is not None and self.rising >= self.rise_checks:
                reason = reason or rise
        return reason

    def _blowup(self) -> str | None:
        if len(self._recent) < self.recent:
            self.over = 0
            return None
        level = _median(self._recent)
        fixed = self._fixed
        if fixed is not None and level <= min(
            max(self.blowup * fixed[0], fixed[1]), self.blowup * self.early[0]
        ):
            self.over = 0  # the common case: no blow-up against the baseline, nor against the start
            return None
        reason = self._above_baseline(level) or self._above_start(level)
        self.over = self.over + 1 if reason is not None else 0
        return reason if self.over >= self.persistence else None

    def _above_baseline(self, level: float) -> str | None:
        fixed = self._baseline_envelope()
        if fixed is None or fixed[0] <= 0:
            return None
        baseline, envelope = fixed
        if level <= max(self.blowup * baseline, envelope):
            return None
        return (
            f"blew up: the median of its last {self.recent} values is {level:.4g}, "
            f"{level / baseline:.1f}x the median of its first {self.baseline_steps} ({baseline:.4g})"
        )

    def _above_start(self, level: float) -> str | None:
        first, first_norm = self.early[0], self.first_norm
        if first <= 0 or first_norm is None or len(self.norms) < self.recent:
            return None
        norm_level = _median(list(self.norms))
        if level <= self.blowup * first or norm_level <= self.blowup * first_norm:
            return None
        return (
            f"blew up from its start: the median of its last {self.recent} values is {level:.4g}, "
            f"{level / first:.1f}x its first value ({first:.4g}), and the gradient norm rose with it "
            f"({norm_level / first_norm:.1f}x its first value)"
        )

    def _steady_rise(self) -> str | None:
        ys = list(self.history)[-self.window :]
        slope, corr = linear_trend(ys)
        scale = max(abs(sum(ys) / len(ys)), 1e-12)
        relative_rise = slope * (len(ys) - 1) / scale
        early = sorted(self.early[: self.baseline_steps])
        spread = early[-2] - early[1] if len(early) >= 4 else 0.0
        if relative_rise > self.rise and corr > self.min_correlation and slope * (len(ys) - 1) > spread:
            return (
                f"rose steadily by {100 * relative_rise:.0f}% over the last {len(ys)} steps "
                f"(correlation {corr:.2f})"
            )
        return None


@dataclass
class OpposingTrendRule:
    """Gradient norm rising while the loss falls (grad.norm_rising, an info).

    In the seed's figure the gradient norm grows during successful training: the optimizer is not
    approaching a critical point. Checked every ``check_every`` steps over a window.
    """

    window: int = 200
    min_correlation: float = 0.5
    min_growth: float = 2.0
    check_every: int = 50
    norms: deque = field(default_factory=deque)
    losses: deque = field(default_factory=deque)
    seen: int = 0

    STATE: ClassVar[tuple[str, ...]] = ("norms", "losses", "seen")

    def __post_init__(self) -> None:
        self.norms = deque(self.norms, maxlen=self.window)
        self.losses = deque(self.losses, maxlen=self.window)

    def update(self, grad_norm: float, loss: float) -> tuple[float, float] | None:
        """Feed one step; returns (norm correlation, loss correlation) when the trends oppose."""
        if not (_finite(grad_norm) and _finite(loss)) or grad_norm <= 0:
            return None
        self.seen += 1
        self.norms.append(math.log10(grad_norm))
        self.losses.append(loss)
        if len(self.norms) < self.window or self.seen % self.check_every:
            return None
        _, norm_corr = linear_trend(list(self.norms))
        _, loss_corr = linear_trend(list(self.losses))
        q = self.window // 4
        growth = 10 ** (sum(list(self.norms)[-q:]) / q - sum(list(self.norms)[:q]) / q)
        if (
            norm_corr > self.min_correlation
            and loss_corr < -self.min_correlation
            and growth >= self.min_growth
        ):
            return norm_corr, loss_corr
        return None


def _median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def rule_state(rule: Any) -> dict[str, Any]:
    """A plain-data snapshot of a rule's state (for checkpoints).

    Only the fields a rule lists in ``STATE`` (running statistics, windows' contents, counters):
    thresholds and window sizes are configuration, which the constructor of the resumed run sets.
    """
    state: dict[str, Any] = {}
    for name in type(rule).STATE:
        value = getattr(rule, name)
        if isinstance(value, EMA):
            state[name] = {"ema": value.value}
        elif isinstance(value, deque):
            state[name] = {"deque": list(value)}
        elif isinstance(value, list):
            state[name] = list(value)
        else:
            state[name] = value
    return state


def load_rule_state(rule: Any, state: dict[str, Any]) -> None:
    """Restore a snapshot made by :func:`rule_state` into a rule built with the current configuration.

    Keys that are not state (configuration saved by older versions) are ignored; a window restored
    into a different size keeps the newest values that fit.
    """
    for name in type(rule).STATE:
        if name not in state:
            continue
        value, current = state[name], getattr(rule, name)
        if isinstance(current, EMA):
            current.value = value["ema"] if isinstance(value, dict) else value
        elif isinstance(current, deque):
            current.clear()
            current.extend(value["deque"] if isinstance(value, dict) else value)
        elif isinstance(current, list):
            current[:] = value
        else:
            setattr(rule, name, value)
    after_load = getattr(rule, "after_load", None)
    if callable(after_load):
        after_load()  # values derived from the restored ones are computed again
