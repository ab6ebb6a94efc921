"""Running statistics and trend rules over the loss and the gradient norm.

The rules work on host floats (one value per step) and cost O(1) per step, except for windowed
rules that look at their whole window only every ``check_every`` steps.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any


def _finite(x: float) -> bool:
    return math.isfinite(x)


@dataclass
class EMA:
    """Exponential moving average; ``value`` is None until the first update."""

    alpha: float
    value: float | None = None

    def update(self, x: float) -> float:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
        return self.value


def linear_trend(ys: list[float]) -> tuple[float, float]:
    """Least-squares slope per step and Pearson correlation of ``ys`` against their index.

    Returns (0, 0) for fewer than three points or a constant series.
    """
    n = len(ys)
    if n < 3:
        return 0.0, 0.0
    mean_t = (n - 1) / 2
    mean_y = sum(ys) / n
    stt = sum((t - mean_t) ** 2 for t in range(n))
    syy = sum((y - mean_y) ** 2 for y in ys)
    sty = sum((t - mean_t) * (y - mean_y) for t, y in enumerate(ys))
    if syy <= 0.0:
        return 0.0, 0.0
    return sty / stt, sty / math.sqrt(stt * syy)


@dataclass
class SpikeRule:
    """A value far above its running level (grad.explosion).

    The level is an EMA of log10(value), with an EMA of its squared deviation as the noise. A
    spike is a value at least ``factor`` times the level AND ``z`` noise deviations above it,
    after ``warmup`` observations: a noisy run (mini-batch gradient norms late in training swing
    by several x) needs a larger jump than a quiet one. Spikes are not folded into the level, so
    a sustained explosion keeps being reported (and counted) instead of becoming the new normal.
    """

    factor: float = 10.0
    z: float = 4.0
    warmup: int = 20
    alpha: float = 0.05
    level: EMA = field(default_factory=lambda: EMA(0.05))
    noise: EMA = field(default_factory=lambda: EMA(0.05))
    seen: int = 0

    def __post_init__(self) -> None:
        self.level.alpha = self.noise.alpha = self.alpha

    def update(self, value: float) -> float | None:
        """Feed one value; returns value / running level when it is a spike, else None."""
        if not _finite(value) or value <= 0.0:
            return None
        log_value = math.log10(value)
        self.seen += 1
        if self.seen > self.warmup and self.level.value is not None:
            excess = log_value - self.level.value
            sigma = math.sqrt(self.noise.value or 0.0)
            if excess > math.log10(self.factor) and excess > self.z * sigma:
                return 10**excess
        # Winsorised at the factor: a runaway value moves the level and the noise no more than a
        # factor-sized jump would, so an explosion cannot teach the rule that it is normal.
        cap = math.log10(self.factor)
        if self.level.value is not None:
            log_value = min(log_value, self.level.value + cap)
            self.noise.update((log_value - self.level.value) ** 2)
        self.level.update(log_value)
        return None


@dataclass
class CollapseRule:
    """The gradient norm collapsed by orders of magnitude while the loss is still high.

    Compares the smoothed log10 gradient norm with its peak after warm-up; the loss counts as still
    high while its smoothed value is above ``loss_fraction`` of its smoothed initial value.
    """

    orders: float = 3.0
    loss_fraction: float = 0.5
    warmup: int = 20
    norm: EMA = field(default_factory=lambda: EMA(0.1))
    loss: EMA = field(default_factory=lambda: EMA(0.1))
    peak: float | None = None
    initial_loss: float | None = None
    seen: int = 0

    def update(self, grad_norm: float, loss: float | None) -> float | None:
        """Feed one step; returns the drop in orders of magnitude when collapsed, else None."""
        if not _finite(grad_norm):
            return None
        level = self.norm.update(math.log10(max(grad_norm, 1e-45)))
        loss_level = None
        if loss is not None and _finite(loss):
            loss_level = self.loss.update(loss)
        self.seen += 1
        if self.seen == self.warmup:
            self.initial_loss = loss_level
        if self.seen < self.warmup:
            return None
        self.peak = level if self.peak is None else max(self.peak, level)
        drop = self.peak - level
        loss_high = (
            loss_level is None
            or self.initial_loss is None
            or loss_level > self.loss_fraction * self.initial_loss
        )
        return drop if drop >= self.orders and loss_high else None


@dataclass
class DivergenceRule:
    """The loss blows up or rises steadily (loss.divergence).

    Blow-up: the loss exceeds ``blowup`` times its initial value (no warm-up needed, so a run that
    is unstable from its first steps is caught). Steady rise: over the last ``window`` steps the
    loss rose by more than ``rise`` (relative) with a correlation above ``min_correlation``,
    checked every ``check_every`` steps.
    """

    blowup: float = 10.0
    window: int = 50
    rise: float = 0.5
    min_correlation: float = 0.7
    check_every: int = 10
    initial: float | None = None
    history: deque = field(default_factory=deque)
    seen: int = 0

    def __post_init__(self) -> None:
        self.history = deque(self.history, maxlen=self.window)

    def update(self, loss: float) -> str | None:
        """Feed one loss; returns a reason ("blow-up ..." / "steady rise ...") or None."""
        if not _finite(loss):
            return None
        self.seen += 1
        if self.initial is None:
            self.initial = loss
        self.history.append(loss)
        if self.initial > 0 and loss > self.blowup * self.initial:
            return f"blew up to {loss:.4g}, {loss / self.initial:.1f}x its initial value {self.initial:.4g}"
        if len(self.history) == self.window and self.seen % self.check_every == 0:
            ys = list(self.history)
            slope, corr = linear_trend(ys)
            scale = max(abs(sum(ys) / len(ys)), 1e-12)
            relative_rise = slope * (len(ys) - 1) / scale
            if relative_rise > self.rise and corr > self.min_correlation:
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


def rule_state(rule: Any) -> dict[str, Any]:
    """A plain-data snapshot of a rule (for checkpoints)."""
    state: dict[str, Any] = {}
    for name, value in vars(rule).items():
        if isinstance(value, EMA):
            state[name] = {"ema": value.value}
        elif isinstance(value, deque):
            state[name] = {"deque": list(value)}
        else:
            state[name] = value
    return state


def load_rule_state(rule: Any, state: dict[str, Any]) -> None:
    """Restore a snapshot made by :func:`rule_state`."""
    for name, value in state.items():
        current = getattr(rule, name, None)
        if isinstance(current, EMA):
            current.value = value["ema"]
        elif isinstance(current, deque):
            current.clear()
            current.extend(value["deque"])
        else:
            setattr(rule, name, value)
