"""healthmon.numerics.first_step: a measured step's ratios, judgement and worded finding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from healthmon.numerics.first_step import (
    HINT_EXPLODED,
    HINT_LEARNING_RATE,
    HINT_RECURRENT,
    MeasuredStep,
    first_step_finding,
    first_step_hint,
    in_first_steps,
    is_recurrent,
    judge_measured_step,
    measure_step,
    update_ratios,
)
from healthmon.numerics.trends import SpikeRule
from healthmon.numerics.update_size import OversizedStep


def _oversized(layer: str, *, rewritten: bool, exploded: bool) -> OversizedStep:
    return OversizedStep(layer, 50.0, 2e6 if exploded else 3.0, 1e4, 2.0, 100.0, rewritten, exploded)


def test_first_steps_are_the_spike_rules_warm_up_and_not_skipped() -> None:
    spike = SpikeRule(warmup=2)
    assert in_first_steps(spike, False) and not in_first_steps(spike, True)
    spike.update(1.0)
    spike.update(1.0)
    assert not in_first_steps(spike, False)


def test_measure_step_maps_parameters_to_layers_and_combines_their_gradient_norms() -> None:
    a, b, c = nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    layer_of = {id(a): 1, id(b): 1}  # c is unknown: layer 0
    m = measure_step(7, [a, b, c], layer_of, [3.0, 4.0, 2.0], 1.5, log_ratios=True, judge=True)
    assert (m.step, m.log_ratios, m.judge, m.loss) == (7, True, True, 1.5)
    assert m.layer_index == [1, 1, 0] and m.numels == [6, 3, 4] and m.present == [0, 1]
    assert m.grad_norms == pytest.approx({1: 5.0, 0: 2.0})
    assert measure_step(7, [a], layer_of, [3.0], None, log_ratios=True, judge=False).grad_norms == {}


def test_update_ratios_are_those_of_a_real_sgd_step() -> None:
    """Exact reference: ||w_after - w_before|| / ||w_before|| of each layer after SGD."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    model(torch.randn(8, 3)).pow(2).mean().backward()
    torch.optim.SGD(params, lr=0.5).step()
    layer_index = [0, 0, 1, 1]
    updates, weights = [0.0, 0.0], [0.0, 0.0]
    for i, p, w in zip(layer_index, params, before, strict=True):  # per-tensor squares, summed per layer
        updates[i] += float((p.detach() - w).pow(2).sum())
        weights[i] += float(w.pow(2).sum())
    updates, weights = [math.sqrt(u) for u in updates], [math.sqrt(w) for w in weights]
    m = MeasuredStep(3, True, False, layer_index, [p.numel() for p in params], {}, None)
    ratios = update_ratios(m, ["0", "2"], updates, weights)
    for name, layer in (("0", model[0]), ("2", model[2])):
        start = 0 if name == "0" else 2
        after = torch.cat([p.detach().reshape(-1) for p in layer.parameters()])
        old = torch.cat([w.reshape(-1) for w in before[start : start + 2]])
        exact = torch.linalg.vector_norm(after - old) / torch.linalg.vector_norm(old)
        assert ratios[name] == pytest.approx(exact.item(), rel=1e-6)
    zero = MeasuredStep(3, True, False, [0], [1], {}, None)
    assert update_ratios(zero, ["z"], [1.0], [0.0])["z"] == 1.0 / torch.finfo(torch.float32).tiny


def test_judge_measured_step_sums_the_sizes_of_a_layers_tensors() -> None:
    # layer 1 = two tensors of 5000 entries: weights of norm 1e-3 are floored at 1e-2 * sqrt(10000) = 1
    m = MeasuredStep(0, False, True, [1, 1, 0], [5000, 5000, 4], {1: 1.0, 0: 1.0}, 1.0)
    found = judge_measured_step(
        m, ["a", "b"], [0.0, 9.0], [1.0, 1e-3], ratio_limit=10.0, sensitivity_limit=1e5
    )
    assert found == []  # 9 < 10 x the floored norm (1), though 9000x the raw norm
    found = judge_measured_step(
        m, ["a", "b"], [0.0, 11.0], [1.0, 1e-3], ratio_limit=10.0, sensitivity_limit=1e5
    )
    assert [f.layer for f in found] == ["b"] and found[0].rewritten and not found[0].exploded
    m = MeasuredStep(0, False, True, [0], [4], {0: 1e6}, 2.0)
    found = judge_measured_step(m, ["a"], [0.0], [1.0], ratio_limit=10.0, sensitivity_limit=1e5)
    assert found[0].exploded and found[0].sensitivity == pytest.approx(5e5)


def test_scale_invariant_layers_are_judged_by_their_sensitivity_only() -> None:
    # "b" feeds a normalisation: an update 11000x its weights only grows them, no rewrite
    m = MeasuredStep(0, False, True, [1, 0], [4, 4], {1: 1.0, 0: 1.0}, 1.0)
    found = judge_measured_step(
        m,
        ["a", "b"],
        [11.0, 11.0],
        [1.0, 1e-3],
        ratio_limit=10.0,
        sensitivity_limit=1e5,
        scale_invariant={"b"},
    )
    assert [f.layer for f in found] == ["a"]
    # an exploded gradient is still one: ||g|| * ||w|| does not depend on the weights' scale
    m = MeasuredStep(0, False, True, [0], [4], {0: 1e9}, 2.0)
    found = judge_measured_step(
        m, ["b"], [11.0], [1e-3], ratio_limit=10.0, sensitivity_limit=1e5, scale_invariant={"b"}
    )
    assert found[0].exploded and not found[0].rewritten


def test_recurrent_layers_are_recognised() -> None:
    assert is_recurrent(nn.RNN(2, 2)) and is_recurrent(nn.LSTM(2, 2)) and is_recurrent(nn.GRUCell(2, 2))
    assert not is_recurrent(nn.Linear(2, 2)) and not is_recurrent(None)


def test_the_hint_names_the_likely_cause() -> None:
    exploded = _oversized("rnn", rewritten=True, exploded=True)
    plain = _oversized("fc", rewritten=True, exploded=False)
    assert first_step_hint(exploded, recurrent=True) == HINT_RECURRENT
    assert first_step_hint(plain, recurrent=True) == HINT_RECURRENT
    assert first_step_hint(exploded, recurrent=False) == HINT_EXPLODED
    assert first_step_hint(plain, recurrent=False) == HINT_LEARNING_RATE


def test_the_finding_words_the_worst_layer_and_counts_the_others() -> None:
    found = [_oversized(f"l{i}", rewritten=True, exploded=i == 0) for i in range(5)]
    f = first_step_finding(found, 0, ratio_limit=10.0, sensitivity_limit=1e5, recurrent=False)
    assert f.where == "l0" and f.hint == HINT_EXPLODED and f.value == 50.0
    assert f.message == (
        "Optimizer step 0, layer l0: the update was 50x the layer's weights (||update|| 100, ||weight|| 2); "
        "its gradient norm 1e+04 gives a loss sensitivity ||g||*||w||/|loss| of 2e+06: the gradient exploded "
        "(first-step limits, before any running level exists: update 10x the weights, sensitivity 100000). "
        "4 more layer(s) too: l1, l2, l3."
    )
    lr = first_step_finding(
        [_oversized("fc", rewritten=True, exploded=False)],
        3,
        ratio_limit=10.0,
        sensitivity_limit=1e5,
        recurrent=False,
    )
    assert lr.hint == HINT_LEARNING_RATE and lr.message.endswith(
        "its gradient norm 1e+04 is ordinary for its weights: the learning rate is too large for this layer "
        "(first-step limits, before any running level exists: update 10x the weights, sensitivity 100000)."
    )
    only_exploded = first_step_finding(
        [_oversized("rnn", rewritten=False, exploded=True)],
        1,
        ratio_limit=10.0,
        sensitivity_limit=1e5,
        recurrent=True,
    )
    assert only_exploded.value == 2e6 and only_exploded.hint == HINT_RECURRENT
    assert "the update was" not in only_exploded.message
