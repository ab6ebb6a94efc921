"""Gradient decay along depth: layer rms, the decay, when it is judged, and the finding."""

from __future__ import annotations

import math

import pytest
import torch

from healthmon.numerics.depth_decay import (
    LOSS_START_STEPS,
    DepthProfile,
    LossLevel,
    depth_decay_orders,
    depth_profile_judged,
    layer_rms,
    vanishing_finding,
)


def test_layer_rms_and_depth_decay_brute_force():
    grads = [
        torch.full((4, 4), 1e-6),
        torch.full((4,), 1e-6),
        torch.full((2, 8), 1e-2),
        torch.full((3,), 1.0),
    ]
    norms = [float(g.norm()) for g in grads]
    rms = layer_rms(norms, [g.numel() for g in grads], [0, 0, 1, 3], 4)
    assert rms[0] == pytest.approx(1e-6) and rms[1] == pytest.approx(1e-2) and rms[3] == pytest.approx(1.0)
    assert math.isnan(rms[2])
    # exactly the float64 sums of squares over the layer's entries
    assert rms[0] == math.sqrt((norms[0] ** 2 + norms[1] ** 2) / 20)
    assert depth_decay_orders(rms) == pytest.approx(6.0)
    assert depth_decay_orders([1.0]) is None
    assert depth_decay_orders([0.0, 1.0]) == math.inf
    assert depth_decay_orders([1.0, 0.0]) is None


def test_depth_profile_is_judged_while_the_loss_is_above_half_its_start():
    assert depth_profile_judged(2.3, 2.3)  # the first checked step: a stack that cannot learn
    assert depth_profile_judged(1.5, 2.3)
    assert not depth_profile_judged(0.03, 0.69)  # BERT at near-perfect separation
    assert not depth_profile_judged(1.15, 2.3) and depth_profile_judged(1.16, 2.3)
    assert depth_profile_judged(0.01, None)  # no start known yet
    assert depth_profile_judged(-5.0, -1.0)  # a loss that is not positive: no scale to judge by


def test_loss_level_start_is_the_mean_of_the_first_losses():
    level = LossLevel()
    assert level.judged()  # nothing known
    for loss in [4.0, math.nan, 2.0, None, math.inf]:
        level.update(loss)
    assert (level.start, level.count, level.level.value) == (3.0, 2, 4.0 + 0.1 * (2.0 - 4.0))
    for _ in range(60):
        level.update(0.1)
    assert level.count == LOSS_START_STEPS
    assert level.start == pytest.approx((4.0 + 2.0 + 0.1 * (LOSS_START_STEPS - 2)) / LOSS_START_STEPS)
    assert not level.judged()  # the smoothed loss fell below half its start


def test_vanishing_finding_exact_message_and_limits():
    profile = DepthProfile.measure([1e-4, 0.0, 1.0, 0.1], [1, 1, 1, 1], [0, 0, 2, 1], ["in", "mid", "out"])
    assert profile.layers == ["in", "mid", "out"] and profile.rms == [math.sqrt(1e-8 / 2), 0.1, 1.0]
    assert profile.decay == pytest.approx(math.log10(1.0 / math.sqrt(0.5e-8)))
    found = vanishing_finding(profile, 3.0, 3)
    assert found is not None and (found.code, found.where, found.value) == (
        "grad.vanishing",
        "in",
        profile.decay,
    )
    assert found.message == (
        "The gradient decays 4.2 orders of magnitude from the last layer (out, rms 1) back to the first "
        "(in, rms 7.1e-05) over 3 layers."
    )
    assert vanishing_finding(profile, 5.0, 3) is None  # not decayed enough
    assert vanishing_finding(profile, 3.0, 4) is None  # too shallow
    assert vanishing_finding(DepthProfile.of([math.nan, 1.0], ["a", "b"]), 0.1, 1) is None  # one layer
