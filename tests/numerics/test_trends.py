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


def _decaying(n: int, seed: int) -> tuple[list[float], list[float]]:
    """A healthy run: the gradient norm falls 100x from 2.5 at init, the loss from 2.3 to ~0.01."""
    rng = random.Random(seed)
    norms = [2.5 * 10 ** (-2 * t / n) * math.exp(rng.gauss(0, 0.3)) for t in range(n)]
    losses = [0.01 + 2.3 * math.exp(-t / 20) * math.exp(rng.gauss(0, 0.2)) for t in range(n)]
    return norms, losses


def test_a_single_spike_below_the_early_peak_while_the_loss_falls_is_quiet() -> None:
    # torch.compile recipe: one batch at 10x its running level (0.96 against the 2.5 of step 0);
    # the ResNet recipe: the 5-sample last batch of each epoch under BatchNorm
    norms, losses = _decaying(300, seed=1)
    rule = SpikeRule()
    fired = []
    for t, (g, loss) in enumerate(zip(norms, losses, strict=True)):
        spike = t in (173, 230)
        fired.append(rule.update(20 * g if spike else g, 5 * loss if spike else loss))
    assert all(f is None for f in fired)
    assert rule.streak == 0 and rule.peak is not None and 10**rule.peak > 2.0


def test_a_record_breaking_spike_is_reported_at_its_step() -> None:
    norms, losses = _decaying(300, seed=2)
    rule = SpikeRule()
    fired = [rule.update(g, loss) for g, loss in zip(norms[:150], losses[:150], strict=True)]
    assert all(f is None for f in fired)
    ratio = rule.update(300.0, losses[150])  # > 10x the 2.5-ish peak of the first steps
    assert ratio is not None and ratio > 100 and "above the largest norm" in rule.reason


def test_a_spike_with_a_loss_above_its_start_is_reported_at_its_step() -> None:
    norms, losses = _decaying(300, seed=3)
    rule = SpikeRule()
    for g, loss in zip(norms[:150], losses[:150], strict=True):
        assert rule.update(g, loss) is None
    # below the early peak, but the loss of the step is back above where the run started
    spike = 12 * 10 ** (rule.level.value or 0.0)
    assert rule.peak is not None and spike < 10**rule.peak
    assert rule.update(spike, 5.0) is not None and "loss jumped" in rule.reason


def test_a_persistent_10x_rise_is_reported_within_a_few_steps() -> None:
    norms, losses = _decaying(300, seed=4)
    rule = SpikeRule()
    for g, loss in zip(norms[:150], losses[:150], strict=True):
        assert rule.update(g, loss) is None
    level = 10 ** (rule.level.value or 0.0)
    fired = [rule.update(15 * level, losses[150]) for _ in range(10)]  # below the early peak
    first = next(i for i, f in enumerate(fired) if f is not None)
    assert first == rule.persistence - 1 and "consecutive steps" in rule.reason
    assert all(f is not None for f in fired[first:])  # and it keeps being counted


def test_spikes_of_a_bert_at_near_perfect_separation_are_quiet() -> None:
    # hf_bert_sequence_classification: norms ~0.2 at a loss of 0.03, single batches (and once
    # three in a row) at 50-80x with the loss blipping to 0.1-0.2 and back at the next step;
    # the peak so far is the 3.1 of the fast-learning phase, the run started at a loss of 0.69
    rule = SpikeRule()
    rng = random.Random(6)
    for t in range(80):
        rule.update((0.15 if t < 40 else 3.1 if t == 74 else 1.0) * math.exp(rng.gauss(0, 0.3)), 0.69)
    for t in range(80, 200):
        norm, loss = 0.2 * math.exp(rng.gauss(0, 0.2)), 0.03
        if t in (88, 121, 160, 183) or 102 <= t <= 104:
            norm, loss = 16.0, 0.2
        assert rule.update(norm, loss) is None, t


def test_collapse_fires_when_a_network_dies_mid_run() -> None:
    rule = CollapseRule(orders=3.0, warmup=10)
    for t in range(60):  # training works: the loss falls from 2.3 towards 0.6
        assert rule.update(1.0, 0.6 + 1.7 * math.exp(-t / 10)) is None
    # the units die: no gradient flows and the loss is back at chance level
    fired = [rule.update(1e-5, 2.3) for _ in range(100)]
    assert any(f is not None and f >= 3.0 for f in fired)


def test_collapse_is_quiet_when_the_loss_reached_its_floor() -> None:
    converged = CollapseRule(orders=3.0, warmup=10)
    for _ in range(30):
        converged.update(1.0, 2.3)
    assert all(converged.update(1e-5, 1e-3) is None for _ in range(100))  # the loss went to ~0

    # full-batch least squares with noisy targets: the floor (1.2) is above half the initial loss
    # (2.0) and the gradient vanishes because the optimum is reached
    at_optimum = CollapseRule(orders=3.0, warmup=10)
    fired = [at_optimum.update(0.8**t, 1.2 + 0.8 * 0.64**t) for t in range(200)]
    assert all(f is None for f in fired)
    assert at_optimum.peak is not None and at_optimum.norm.value is not None
    assert at_optimum.peak - at_optimum.norm.value >= 3.0  # the gradient did collapse

    # a loss that never moved while the gradient collapsed is at its floor too: the depth profile
    # (GradientUnderflowMonitor) is the detector for stacks that never learn
    flat = CollapseRule(orders=3.0, warmup=10)
    assert all(flat.update(1.0 if t < 30 else 1e-5, 2.3) is None for t in range(130))


def test_divergence_blowup_and_steady_rise_but_not_noise() -> None:
    rule = DivergenceRule(blowup=10.0)
    assert [rule.update(2.3) for _ in range(10)] == [None] * 10
    assert [rule.update(30.0) for _ in range(4)][:2] == [None, None]  # needs 3 of the last 5
    assert "blew up" in (rule.update(30.0) or "")

    rising = DivergenceRule(window=50, rise=0.5, check_every=10)
    reasons = [rising.update(1.0 + 0.02 * t) for t in range(100)]
    assert any(r and "rose steadily" in r for r in reasons)

    noisy = DivergenceRule(window=50, rise=0.5, check_every=10)
    falling = [2.3 * math.exp(-t / 100) for t in range(300)]
    assert all(noisy.update(x * y) is None for x, y in zip(falling, _noisy(1.0, 300, seed=3), strict=True))


def _first_alert(rule: DivergenceRule, series: list[float]) -> int | None:
    return next((t for t, x in enumerate(series) if rule.update(x) is not None), None)


def test_divergence_quiet_after_a_lucky_first_batch() -> None:
    # Lightning's BoringModel (bf16-mixed, accumulation 2, clipping 0.5): first loss 0.089, then
    # per-batch losses spread over 30x around a stationary level of about 1
    series = [0.089] + _noisy(1.0, 500, seed=7)
    assert max(series[1:]) / series[0] > 10
    assert _first_alert(DivergenceRule(), series) is None


def test_divergence_quiet_on_a_fine_tune_near_zero() -> None:
    # fine-tuning a converged model: the loss sits at 7e-5 and single batches are 100x worse
    rng = random.Random(11)
    series = [7e-5 * math.exp(rng.gauss(0, 1.2)) for _ in range(500)]
    series[0] = 7e-5
    # a fresh optimizer state nudges the model early on: the level doubles for a while
    series = [x * (2.0 if 15 <= t < 60 else 1.0) for t, x in enumerate(series)]
    assert max(series) / 7e-5 > 50
    assert _first_alert(DivergenceRule(), series) is None


def test_divergence_ignores_single_spikes() -> None:
    series = _noisy(1.0, 400, seed=2)
    series[100] = 1000.0
    series[200] = series[201] = 500.0  # two in a row: still not the level
    series[5] = 200.0  # a spike among the first losses does not shift the baseline
    assert _first_alert(DivergenceRule(), series) is None


def test_divergence_catches_a_learning_rate_100x_too_high_early() -> None:
    # the digits MLP with SGD lr=10 instead of 0.1: the loss grows about 20x per step until inf
    series = [2.3 * 20.0**t * math.exp(0.3 * math.sin(t)) for t in range(25)]
    first = _first_alert(DivergenceRule(), series)
    assert first is not None and first < 30  # 10% of a 300-step run

    # the blow-up starts after a few healthy steps and levels off (the logits saturate)
    plateau = _noisy(2.3, 30, seed=4) + _noisy(300.0, 270, seed=5)
    first = _first_alert(DivergenceRule(), plateau)
    assert first is not None and 30 < first < 40


def test_divergence_catches_a_blow_up_from_a_converged_start() -> None:
    # fine-tuning a converged model (loss 2e-5, gradient norm 3e-4) with a learning rate 100x too
    # high: the first update throws it out of its minimum, the loss jumps 50x and the gradient
    # norm 100x at step 1, and both stay there (the median of the first 10 rises with them)
    rng = random.Random(8)
    losses = [2e-5] + [1e-3 * math.exp(rng.gauss(0, 1.5)) for _ in range(249)]
    norms = [3e-4] + [0.05 * math.exp(rng.gauss(0, 1.5)) for _ in range(249)]
    rule = DivergenceRule()
    first = next(t for t, (x, g) in enumerate(zip(losses, norms, strict=True)) if rule.update(x, g))
    assert first < 10
    # without the gradient norm, one loss is no anchor (a lucky first batch) and it stays quiet
    assert _first_alert(DivergenceRule(), losses) is None


def test_divergence_quiet_after_a_lucky_first_batch_with_its_gradient_norm() -> None:
    # BoringModel: the first loss (0.37) is a third of the stationary ~1; the gradient norm goes
    # from 3.3 to about 6: the batch was lucky, the model did not move
    losses = [0.37] + _noisy(1.0, 299, seed=9)
    norms = [3.3] + _noisy(6.0, 299, seed=10)
    rule = DivergenceRule()
    assert all(rule.update(x, g) is None for x, g in zip(losses, norms, strict=True))


def test_divergence_catches_a_steady_rise_early() -> None:
    rng = random.Random(3)
    series = [(1.0 + 0.04 * t) * math.exp(rng.gauss(0, 0.1)) for t in range(500)]
    rule = DivergenceRule()
    first = _first_alert(rule, series)
    assert first is not None and first < 50  # 10% of the run
    assert rule.over == 0  # a rise, not a blow-up


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


def test_rule_state_carries_state_never_configuration() -> None:
    rules = [SpikeRule(), CollapseRule(), DivergenceRule(), OpposingTrendRule()]
    for rule in rules:
        assert set(rule_state(rule)) == set(type(rule).STATE)
    assert not {"factor", "z", "warmup", "alpha", "persistence", "loss_jump"} & set(rule_state(SpikeRule()))
    configuration = {"blowup", "window", "rise", "check_every", "baseline_steps"}
    assert not configuration & set(rule_state(DivergenceRule()))

    saved = SpikeRule(factor=10.0, warmup=5)
    for t in range(50):
        saved.update(1.0 + 0.01 * (-1) ** t)
    resumed = SpikeRule(factor=3.0, warmup=5)
    load_rule_state(resumed, rule_state(saved))
    assert resumed.factor == 3.0 and resumed.seen == 50 and resumed.level.value == saved.level.value
    assert saved.update(5.0) is None and resumed.update(5.0) is not None  # the new factor judges


def test_window_restored_into_another_size_keeps_the_newest_values_and_keeps_checking() -> None:
    saved = DivergenceRule(window=50, check_every=10)
    for t in range(45):
        saved.update(1.0 + 0.01 * ((-1) ** t))  # flat
    resumed = DivergenceRule(window=20, check_every=10)
    load_rule_state(resumed, rule_state(saved))
    assert resumed.window == 20 and resumed.history.maxlen == 20
    assert list(resumed.history) == list(saved.history)[-20:]
    assert resumed.baseline == saved.baseline and resumed.seen == 45
    # the steady-rise check runs on the new window (a restored size used to stop it for good)
    first = _first_alert(resumed, [1.0 + 0.05 * t for t in range(100)])
    assert first is not None and first < 40

    # an older checkpoint that stored configuration too: the configuration part is ignored
    legacy = {**rule_state(saved), "window": 50, "blowup": 2.0, "initial": 1.0}
    again = DivergenceRule(window=20)
    load_rule_state(again, legacy)
    assert again.window == 20 and again.blowup == 10.0 and len(again.history) == 20
