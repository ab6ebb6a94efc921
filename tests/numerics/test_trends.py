"""Trend rules on synthetic series whose answer is known."""

from __future__ import annotations

import math
import random

from healthmon.numerics.trends import (
    CollapseRule,
    DivergenceRule,
    OpposingTrendRule,
    SpikeRule,
    linear_trend,
    load_rule_state,
    rule_state,
)


def test_linear_trend_exact() -> None:
    slope, corr = linear_trend([1.0 + 2.0 * t for t in range(10)])
    assert math.isclose(slope, 2.0) and math.isclose(corr, 1.0)
    assert linear_trend([3.0] * 5) == (0.0, 0.0)
    slope, corr = linear_trend([5.0 - t for t in range(6)])
    assert math.isclose(slope, -1.0) and math.isclose(corr, -1.0)


def _noisy(level: float, n: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [level * math.exp(rng.gauss(0, 0.3)) for _ in range(n)]


def test_spike_fires_far_above_the_running_level_only() -> None:
    rule = SpikeRule(factor=10.0, warmup=20)
    assert all(rule.update(x) is None for x in _noisy(1.0, 200))
    ratio = rule.update(50.0)
    assert ratio is not None and 20 < ratio < 100
    # a sustained explosion keeps firing: spikes are not folded into the level
    assert rule.update(60.0) is not None


def test_spike_ignores_warmup_and_nonfinite_values() -> None:
    rule = SpikeRule(factor=10.0, warmup=5)
    assert [rule.update(x) for x in [1.0, 100.0, 1.0, 1.0, 1.0]] == [None] * 5
    assert rule.update(float("nan")) is None and rule.update(float("inf")) is None


def test_collapse_needs_the_loss_to_be_still_high() -> None:
    rule = CollapseRule(orders=3.0, warmup=10)
    for _ in range(30):
        assert rule.update(1.0, 2.3) is None
    fired = [rule.update(1e-5, 2.3) for _ in range(100)]
    assert any(f is not None and f >= 3.0 for f in fired)

    converged = CollapseRule(orders=3.0, warmup=10)
    for _ in range(30):
        converged.update(1.0, 2.3)
    assert all(converged.update(1e-5, 1e-3) is None for _ in range(100))


def test_divergence_blowup_and_steady_rise_but_not_noise() -> None:
    rule = DivergenceRule(blowup=10.0)
    assert rule.update(2.3) is None
    assert "blew up" in (rule.update(30.0) or "")

    rising = DivergenceRule(window=50, rise=0.5, check_every=10)
    reasons = [rising.update(1.0 + 0.02 * t) for t in range(100)]
    assert any(r and "rose steadily" in r for r in reasons)

    noisy = DivergenceRule(window=50, rise=0.5, check_every=10)
    falling = [2.3 * math.exp(-t / 100) for t in range(300)]
    assert all(noisy.update(x * y) is None for x, y in zip(falling, _noisy(1.0, 300, seed=3), strict=True))


def test_opposing_trend_is_the_seed_figure() -> None:
    rule = OpposingTrendRule(window=100, check_every=20)
    hits = [rule.update(0.5 * math.exp(t / 60), 2.0 * math.exp(-t / 80)) for t in range(200)]
    assert any(h is not None for h in hits)
    both_fall = OpposingTrendRule(window=100, check_every=20)
    assert all(both_fall.update(math.exp(-t / 60), math.exp(-t / 80)) is None for t in range(200))


def test_rule_state_round_trip_continues_the_same_trend() -> None:
    a, b = DivergenceRule(window=20, check_every=5), DivergenceRule(window=20, check_every=5)
    for t in range(15):
        a.update(1.0 + 0.05 * t)
    load_rule_state(b, rule_state(a))
    outs_a = [a.update(1.0 + 0.05 * t) for t in range(15, 40)]
    outs_b = [b.update(1.0 + 0.05 * t) for t in range(15, 40)]
    assert outs_a == outs_b and any(outs_a)


def test_spike_threshold_adapts_to_the_noise_of_the_series() -> None:
    rng = random.Random(5)
    noisy = SpikeRule(factor=10.0, z=5.0, warmup=20)
    for _ in range(300):  # log10-normal noise of 0.4 decades: 12x jumps are part of normal life
        noisy.update(10 ** rng.gauss(0, 0.4))
    assert noisy.update(12.0) is None
    quiet = SpikeRule(factor=10.0, z=5.0, warmup=20)
    for _ in range(300):
        quiet.update(10 ** rng.gauss(0, 0.02))
    assert quiet.update(12.0) is not None
