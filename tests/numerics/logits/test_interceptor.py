"""LogitsInterceptor: each unstable pattern written the way users write it, and its legal twins.

Each case is a small function with exactly one line marked ``# <-``: the line every finding of the
case must name. Cases run with and without autograd; the legitimate look-alikes must produce no
finding at all.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from healthmon.numerics.logits import (
    LogitsInterceptor,
    graph_kind,
)
from healthmon.numerics.source_lines import SourceLineFinder

N, C = 16, 5


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g) * 2
    y = torch.randint(0, C, (N,), generator=g)
    t = torch.rand(N, C, generator=g)
    return x, y, t


# ---- cases that must fire -------------------------------------------------------------------
def ce_functional_softmax(x, y, t):
    return F.cross_entropy(F.softmax(x, dim=-1), y)  # <-


def ce_module_softmax(x, y, t):
    probs = nn.Softmax(dim=1)(x)
    return nn.CrossEntropyLoss()(probs, y)  # <-


def ce_method_softmax(x, y, t):
    return F.cross_entropy(x.softmax(-1), y)  # <-


def ce_sequential_softmax_last(x, y, t):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(C, 8), nn.ReLU(), nn.Linear(8, C), nn.Softmax(dim=-1))
    return F.cross_entropy(model(x), y)  # <-


def bce_with_logits_sigmoid(x, y, t):
    return nn.BCEWithLogitsLoss()(torch.sigmoid(x), t)  # <-


def bce_with_logits_module_sigmoid(x, y, t):
    p = nn.Sigmoid()(x)
    return F.binary_cross_entropy_with_logits(p, t)  # <-


def nll_on_softmax(x, y, t):
    return F.nll_loss(torch.softmax(x, 1), y)  # <-


def kl_div_on_probabilities(x, y, t):
    return F.kl_div(F.softmax(x, -1), F.softmax(t, -1), reduction="batchmean")  # <-


def ce_on_exp_log_softmax(x, y, t):
    probs = F.log_softmax(x, -1).exp()
    return F.cross_entropy(probs, y)  # <-


def log_of_softmax(x, y, t):
    logp = torch.log(F.softmax(x, dim=-1))  # <-
    return F.nll_loss(logp, y)


def log_of_softmax_methods(x, y, t):
    return F.nll_loss(x.softmax(-1).log(), y)  # <-


def log_of_softmax_eps(x, y, t):
    p = nn.Softmax(dim=-1)(x)
    return F.nll_loss(torch.log(p + 1e-8), y)  # <-


def log_of_softmax_clamped(x, y, t):
    p = F.softmax(x, dim=-1)
    return -torch.log(p.clamp(min=1e-7)).gather(1, y[:, None]).mean()  # <-


def double_softmax(x, y, t):
    probs = nn.Softmax(dim=-1)(x)
    return nn.NLLLoss()(nn.LogSoftmax(dim=-1)(probs), y)  # <-


def naive_logsumexp(x, y, t):
    return torch.log(torch.exp(x).sum(dim=-1))  # <-


def naive_logsumexp_methods(x, y, t):
    return x.exp().sum(1, keepdim=True).log()  # <-


def naive_logsumexp_torch_sum(x, y, t):
    return torch.log(torch.sum(torch.exp(x), dim=1))  # <-


def naive_softmax(x, y, t):
    return x.exp() / x.exp().sum(-1, keepdim=True)  # <-


def naive_softmax_torch(x, y, t):
    e = torch.exp(x)
    return torch.div(e, torch.sum(e, dim=1, keepdim=True))  # <-


def naive_softmax_inplace(x, y, t):
    e = torch.exp(x)
    s = e.sum(-1, keepdim=True)
    e = e.clone()
    e /= s  # <-
    return e


def naive_softmax_into_ce(x, y, t):
    return F.cross_entropy(torch.exp(x) / torch.exp(x).sum(-1, keepdim=True), y)  # <-


def bce_on_sigmoid(x, y, t):
    return nn.BCELoss()(torch.sigmoid(x), t)  # <-


def nll_on_raw_scores(x, y, t):
    return F.nll_loss(x, y)  # <-


def nll_module_on_linear_output(x, y, t):
    torch.manual_seed(0)
    head = nn.Linear(C, C)
    return nn.NLLLoss()(head(x), y)  # <-


def nll_method_chain_on_raw_scores(x, y, t):
    scores = x.float().reshape(N, C)
    return F.nll_loss(scores, y, reduction="sum")  # <-


def kl_div_on_raw_scores(x, y, t):
    return F.kl_div(x, F.softmax(t, -1), reduction="batchmean")  # <-


def kl_div_module_on_raw_scores_log_target(x, y, t):
    return nn.KLDivLoss(reduction="batchmean", log_target=True)(x / 2.0, F.log_softmax(t, -1))  # <-


def nll_on_relu_scores(x, y, t):
    return F.nll_loss(F.relu(x), y)  # <-


def ce_on_relu(x, y, t):
    return F.cross_entropy(F.relu(x), y)  # <-


def ce_module_on_relu_module(x, y, t):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(C, 8), nn.ReLU(), nn.Linear(8, C), nn.ReLU())
    return nn.CrossEntropyLoss()(model(x), y)  # <-


def ce_on_relu_method(x, y, t):
    return F.cross_entropy(x.relu(), y)  # <-


def ce_on_clamp_min_zero(x, y, t):
    return F.cross_entropy(torch.clamp(x, min=0), y)  # <-


def ce_on_clamp_min_method_scaled(x, y, t):
    return F.cross_entropy(x.clamp_min(0.0) / 0.5, y)  # <-


def ce_on_relu6(x, y, t):
    return F.cross_entropy(nn.ReLU6()(x), y)  # <-


def log_softmax_of_relu(x, y, t):
    logp = F.log_softmax(F.relu(x), dim=1)  # <-
    return F.nll_loss(logp, y)


def bce_with_logits_on_relu(x, y, t):
    return nn.BCEWithLogitsLoss()(torch.relu(x), t)  # <-


FIRING: list[tuple[Callable, set[str]]] = [
    (ce_functional_softmax, {"logits.probabilities"}),
    (ce_module_softmax, {"logits.probabilities"}),
    (ce_method_softmax, {"logits.probabilities"}),
    (ce_sequential_softmax_last, {"logits.probabilities"}),
    (bce_with_logits_sigmoid, {"logits.probabilities"}),
    (bce_with_logits_module_sigmoid, {"logits.probabilities"}),
    (nll_on_softmax, {"logits.probabilities"}),
    (kl_div_on_probabilities, {"logits.probabilities"}),
    (ce_on_exp_log_softmax, {"logits.probabilities"}),
    (log_of_softmax, {"logits.naive_log_softmax"}),
    (log_of_softmax_methods, {"logits.naive_log_softmax"}),
    (log_of_softmax_eps, {"logits.naive_log_softmax"}),
    (log_of_softmax_clamped, {"logits.naive_log_softmax"}),
    (double_softmax, {"logits.naive_log_softmax"}),
    (naive_logsumexp, {"logits.naive_logsumexp"}),
    (naive_logsumexp_methods, {"logits.naive_logsumexp"}),
    (naive_logsumexp_torch_sum, {"logits.naive_logsumexp"}),
    (naive_softmax, {"logits.naive_softmax"}),
    (naive_softmax_torch, {"logits.naive_softmax"}),
    (naive_softmax_inplace, {"logits.naive_softmax"}),
    (naive_softmax_into_ce, {"logits.naive_softmax", "logits.probabilities"}),
    (bce_on_sigmoid, {"logits.sigmoid_bce"}),
    (nll_on_raw_scores, {"logits.unnormalized_log_probs"}),
    (nll_module_on_linear_output, {"logits.unnormalized_log_probs"}),
    (nll_method_chain_on_raw_scores, {"logits.unnormalized_log_probs"}),
    (kl_div_on_raw_scores, {"logits.unnormalized_log_probs"}),
    (kl_div_module_on_raw_scores_log_target, {"logits.unnormalized_log_probs"}),
    (nll_on_relu_scores, {"logits.unnormalized_log_probs"}),
    (ce_on_relu, {"logits.clamped_scores"}),
    (ce_module_on_relu_module, {"logits.clamped_scores"}),
    (ce_on_relu_method, {"logits.clamped_scores"}),
    (ce_on_clamp_min_zero, {"logits.clamped_scores"}),
    (ce_on_clamp_min_method_scaled, {"logits.clamped_scores"}),
    (ce_on_relu6, {"logits.clamped_scores"}),
    (log_softmax_of_relu, {"logits.clamped_scores"}),
    (bce_with_logits_on_relu, {"logits.clamped_scores"}),
]


# ---- legitimate look-alikes: no finding ---------------------------------------------------------
def attention_then_logits(x, y, t):
    torch.manual_seed(0)
    q, k, v, head = nn.Linear(C, 8), nn.Linear(C, 8), nn.Linear(C, 8), nn.Linear(8, C)
    attn = torch.softmax(q(x) @ k(x).T / math.sqrt(8), dim=-1)
    return F.cross_entropy(head(attn @ v(x)), y)


def attention_module(x, y, t):
    torch.manual_seed(0)
    mha, head = nn.MultiheadAttention(C, 1, batch_first=True), nn.Linear(C, C)
    out, weights = mha(x[None], x[None], x[None])
    return F.cross_entropy(head(out[0]), y) + weights.sum() * 0


def distillation(x, y, t):
    with torch.no_grad():
        teacher = F.softmax(t / 2.0, dim=-1)
    student = F.log_softmax(x / 2.0, dim=-1)
    return nn.KLDivLoss(reduction="batchmean")(student, teacher) + F.cross_entropy(x, y)


def log_softmax_nll(x, y, t):
    return F.nll_loss(F.log_softmax(x, dim=1), y) + nn.NLLLoss()(nn.LogSoftmax(dim=1)(x), y)


def label_smoothing(x, y, t):
    return nn.CrossEntropyLoss(label_smoothing=0.1)(x, y)


def soft_targets(x, y, t):
    return F.cross_entropy(x, F.softmax(t, dim=-1))


def user_logsumexp(x, y, t):
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    return (x - lse).exp().sum() + x.logsumexp(1).sum()


def safe_logsumexp_max(x, y, t):
    m = x.max(dim=-1, keepdim=True).values
    return torch.log(torch.exp(x - m).sum(dim=-1)) + m.squeeze(-1)


def safe_logsumexp_amax_detached(x, y, t):
    m = x.amax(dim=1, keepdim=True).detach()
    return (x - m).exp().sum(1).log() + m[:, 0]


def safe_logsumexp_index(x, y, t):
    m = torch.max(x, dim=1, keepdim=True)[0]
    return torch.log(torch.sum(torch.exp(x - m), dim=1))


def safe_logsumexp_no_grad_max(x, y, t):
    with torch.no_grad():
        m = x.max()
    return torch.log(torch.exp(x - m).sum())


def safe_softmax_by_hand(x, y, t):
    e = torch.exp(x - x.amax(-1, keepdim=True))
    p = e / e.sum(-1, keepdim=True)
    return (p * t).sum()


def probabilities_for_a_metric(x, y, t):
    acc = (F.softmax(x, -1).argmax(-1) == y).float().mean()
    return F.cross_entropy(x, y) + acc * 0


def bce_with_logits_on_logits(x, y, t):
    return nn.BCEWithLogitsLoss()(x, t) + F.binary_cross_entropy_with_logits(x * 0.1, t)


def scaled_logits(x, y, t):
    return F.cross_entropy(x / 0.5, y) + F.cross_entropy((x - 1.0) * 2, y)


def nll_on_log_softmax_module_and_method(x, y, t):
    return nn.NLLLoss()(nn.LogSoftmax(dim=1)(x), y) + F.nll_loss(x.log_softmax(1), y)


def nll_on_log_softmax_then_dropout(x, y, t):
    return F.nll_loss(F.dropout(F.log_softmax(x, dim=1), p=0.3), y)


def nll_on_manual_log_softmax(x, y, t):
    return F.nll_loss(x - x.logsumexp(dim=1, keepdim=True), y)


def nll_on_clamped_log_probabilities(x, y, t):
    return F.nll_loss(F.log_softmax(x, dim=1).clamp(min=-100.0), y)


def nll_on_log_of_a_mixture(x, y, t):
    p = 0.5 * F.softmax(x, dim=1) + 0.5 * F.softmax(x * 2, dim=1)  # a mixture of two predictions
    return F.nll_loss(torch.log(p + 1e-8), y)


def focal_loss_through_nll(x, y, t):
    logp = F.log_softmax(x, dim=1)
    return F.nll_loss((1 - logp.exp()) ** 2 * logp, y)


def label_smoothing_by_hand(x, y, t):
    logp = F.log_softmax(x, dim=-1)
    return 0.9 * F.nll_loss(logp, y) - 0.1 * logp.mean(-1).mean()


def kl_div_log_target(x, y, t):
    student, teacher = F.log_softmax(x, -1), F.log_softmax(t, -1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def kl_div_bernoulli_logsigmoid(x, y, t):
    return nn.KLDivLoss(reduction="batchmean")(F.logsigmoid(x), t)


def relu_inside_hidden_layers(x, y, t):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(C, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, C))
    return F.cross_entropy(model(x), y) + F.cross_entropy(nn.Linear(C, C)(F.relu(x)), y)


def logit_clipping_for_safety(x, y, t):
    return F.cross_entropy(x.clamp(-30.0, 30.0), y) + F.cross_entropy(torch.clamp(x, max=5.0), y)


def clamped_probabilities_into_nll(x, y, t):
    logp = F.log_softmax(x, dim=1)
    return F.nll_loss(logp.clamp(max=0.0), y)


def relu_scores_for_a_regression_head(x, y, t):
    return F.mse_loss(F.relu(x), t) + F.cross_entropy(x, y)


LEGIT: list[Callable] = [
    attention_then_logits,
    attention_module,
    distillation,
    log_softmax_nll,
    label_smoothing,
    soft_targets,
    user_logsumexp,
    safe_logsumexp_max,
    safe_logsumexp_amax_detached,
    safe_logsumexp_index,
    safe_logsumexp_no_grad_max,
    safe_softmax_by_hand,
    probabilities_for_a_metric,
    bce_with_logits_on_logits,
    scaled_logits,
    nll_on_log_softmax_module_and_method,
    nll_on_log_softmax_then_dropout,
    nll_on_manual_log_softmax,
    nll_on_clamped_log_probabilities,
    nll_on_log_of_a_mixture,
    focal_loss_through_nll,
    label_smoothing_by_hand,
    kl_div_log_target,
    kl_div_bernoulli_logsigmoid,
    relu_inside_hidden_layers,
    logit_clipping_for_safety,
    clamped_probabilities_into_nll,
    relu_scores_for_a_regression_head,
]


def _marked_line(fn: Callable) -> int:
    lines, first = inspect.getsourcelines(fn)
    marked = [first + i for i, line in enumerate(lines) if line.rstrip().endswith("# <-")]
    assert len(marked) == 1, fn.__name__
    return marked[0]


def _same_place(where: str | None, fn: Callable, line: int) -> bool:
    assert where is not None
    path, _, lineno = where.rpartition(":")
    return os.path.realpath(path) == os.path.realpath(inspect.getsourcefile(fn)) and int(lineno) == line


def _intercept(fn: Callable, grad: bool) -> tuple[LogitsInterceptor, list]:
    x, y, t = _data()
    x.requires_grad_(grad)
    mode = LogitsInterceptor()
    with torch.set_grad_enabled(grad), mode:
        fn(x, y, t)
    findings = mode.findings()
    assert mode.errors == []
    return mode, findings


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize(("fn", "codes"), FIRING, ids=[f.__name__ for f, _ in FIRING])
def test_pattern_fires_at_the_users_line(fn: Callable, codes: set[str], grad: bool) -> None:
    mode, findings = _intercept(fn, grad)
    assert {f.code for f in findings} == codes
    line = _marked_line(fn)
    for f in findings:
        assert _same_place(f.where, fn, line), (f.where, line)
        assert f.hint and f.message
    assert mode.checks >= 1


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("fn", LEGIT, ids=[f.__name__ for f in LEGIT])
def test_legitimate_code_raises_nothing(fn: Callable, grad: bool) -> None:
    mode, findings = _intercept(fn, grad)
    assert findings == []


def test_hints_are_the_exact_fix() -> None:
    hints = {f.__name__: _intercept(f, True)[1][0].hint for f, _ in FIRING}
    assert "F.cross_entropy(logits, y)" in hints["ce_functional_softmax"]
    assert "BCEWithLogitsLoss" in hints["bce_with_logits_sigmoid"]
    assert "F.log_softmax" in hints["log_of_softmax"]
    assert "torch.logsumexp" in hints["naive_logsumexp"]
    assert "torch.softmax" in hints["naive_softmax"]


# ---- saturation --------------------------------------------------------------------------------
def saturated_log_softmax(x, y, t):
    return F.nll_loss(torch.log(F.softmax(x * 1000, dim=-1)), y)  # <-


def saturated_bce(x, y, t):
    return F.binary_cross_entropy(torch.sigmoid(x * 1000), t)  # <-


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize(
    ("fn", "codes", "prob"),
    [
        (saturated_log_softmax, {"logits.naive_log_softmax"}, lambda x: F.softmax(x * 1000, -1)),
        (saturated_bce, {"logits.sigmoid_bce"}, lambda x: torch.sigmoid(x * 1000)),
    ],
)
def test_saturated_probabilities_are_counted_exactly(fn, codes, prob, grad: bool) -> None:
    _, findings = _intercept(fn, grad)
    assert {f.code for f in findings} == codes | {"softmax.saturated"}
    sat = next(f for f in findings if f.code == "softmax.saturated")
    x, _, _ = _data()
    p = prob(x)
    expected = sum(1 for v in p.flatten().tolist() if v == 0.0 or v == 1.0) / p.numel()
    assert expected > 0
    assert sat.value == pytest.approx(expected, rel=1e-6)
    assert _same_place(sat.where, fn, _marked_line(fn))


def test_unsaturated_probabilities_do_not_alert_saturation() -> None:
    _, findings = _intercept(log_of_softmax, True)
    assert "softmax.saturated" not in {f.code for f in findings}


# ---- evidence without interception: graph fallback and values ----------------------------------
def test_graph_provenance_for_tensors_made_before_interception() -> None:
    x, y, _ = _data()
    x.requires_grad_(True)
    probs = torch.softmax(x, -1)
    summed = torch.exp(x).sum(-1)
    shifted_sum = torch.exp(x - x.amax(-1, keepdim=True)).sum(-1)
    assert graph_kind(probs.grad_fn) == "softmax"
    assert graph_kind((probs + 1e-8).clamp(min=1e-6).grad_fn) == "softmax"
    assert graph_kind(torch.sigmoid(x).grad_fn) == "sigmoid"
    assert graph_kind(summed.grad_fn) == "sum_exp"
    assert graph_kind(shifted_sum.grad_fn) == "sum_exp_shifted"
    assert graph_kind((x.exp() / x.exp().sum(-1, keepdim=True)).grad_fn) == "softmax"
    assert graph_kind((x @ x.T).grad_fn) is None
    mode = LogitsInterceptor()
    with mode:
        F.cross_entropy(probs, y)
        torch.log(summed)
        torch.log(shifted_sum)
    assert sorted(f.code for f in mode.findings()) == ["logits.naive_logsumexp", "logits.probabilities"]


def test_values_decide_when_there_is_no_graph_and_no_tag() -> None:
    x, y, t = _data()
    probs, sig = torch.softmax(x, -1), torch.sigmoid(x)  # made outside interception, no graph
    mode = LogitsInterceptor()
    with mode:
        F.cross_entropy(probs, y)  # fires
        F.cross_entropy(probs[0], y[0])  # fires (unbatched input: classes along dim 0)
        nn.BCEWithLogitsLoss()(sig, t)  # fires
        F.cross_entropy(x, y)  # raw logits: silent
        F.cross_entropy(probs * 0.5, y)  # rows sum to 0.5: silent
        F.binary_cross_entropy_with_logits(x, t)  # logits outside (0, 1): silent
        F.nll_loss(F.log_softmax(x, -1), y)  # log-probabilities are <= 0: silent
    findings = mode.findings()
    assert [f.code for f in findings] == ["logits.probabilities"] * 3
    assert len({f.where for f in findings}) == 3
    assert all(f.value is None for f in findings)


def test_raw_scores_and_clamped_scores_by_graph_made_before_interception() -> None:
    torch.manual_seed(0)
    x, y, t = _data()
    head = nn.Linear(C, C)
    scores = head(x)  # made before interception: only the graph says what they are
    clamped = F.relu(scores)
    log_probs = F.dropout(F.log_softmax(scores, 1), 0.2)
    mode = LogitsInterceptor()
    with mode:
        F.nll_loss(scores, y)  # fires: raw scores
        F.kl_div(scores, F.softmax(t, -1), reduction="batchmean")  # fires: raw scores
        F.cross_entropy(clamped, y)  # fires: relu
        F.nll_loss(log_probs, y)  # log-probabilities behind dropout: silent
        F.cross_entropy(scores, y)  # silent
        F.cross_entropy(scores.clamp(-5.0, 5.0), y)  # a safety clip, not a clamp at 0: silent
    findings = mode.findings()
    assert sorted(f.code for f in findings) == [
        "logits.clamped_scores",
        "logits.unnormalized_log_probs",
        "logits.unnormalized_log_probs",
    ]
    relu = next(f for f in findings if f.code == "logits.clamped_scores")
    assert "went through relu" in relu.message
    assert relu.value == pytest.approx((clamped == 0).float().mean().item())


def test_raw_scores_and_clamped_scores_by_values_without_graph() -> None:
    x, y, t = _data()
    log_probs, clamped = F.log_softmax(x, 1), F.relu(x)  # made outside interception, no graph
    mode = LogitsInterceptor()
    with mode:
        F.nll_loss(x, y)  # fires
        F.nll_loss(x[0], y[0])  # fires (unbatched input: classes along dim 0)
        F.cross_entropy(clamped, y)  # fires
        F.nll_loss(log_probs, y)  # silent
        F.nll_loss(F.dropout(log_probs, 0.3), y)  # silent: still never positive
        F.nll_loss(torch.softmax(x, 1).detach(), y)  # probabilities: the other rule, once
        F.cross_entropy(torch.zeros(N, C), y)  # a zero-initialised head's output: silent
        F.cross_entropy(x, y)  # silent
    findings = mode.findings()
    assert sorted(f.code for f in findings) == [
        "logits.clamped_scores",
        "logits.probabilities",
        "logits.unnormalized_log_probs",
        "logits.unnormalized_log_probs",
    ]
    raw = next(f for f in findings if f.code == "logits.unnormalized_log_probs" and f.value is not None)
    expected = max(abs(torch.logsumexp(x, 1)).tolist())
    assert raw.value == pytest.approx(expected, rel=1e-6)
    assert f"{expected:.3g}" in raw.message
    relu = next(f for f in findings if f.code == "logits.clamped_scores")
    assert relu.value == pytest.approx((clamped == 0).float().mean().item())
    assert "are clamped at 0" in relu.message


def test_new_codes_take_their_hint_from_the_registry() -> None:
    from healthmon.alerts import code_info

    cases = ((nll_on_raw_scores, "logits.unnormalized_log_probs"), (ce_on_relu, "logits.clamped_scores"))
    for fn, code in cases:
        (finding,) = _intercept(fn, True)[1]
        assert finding.code == code and finding.hint == code_info(code).hint
    assert "F.log_softmax" in code_info("logits.unnormalized_log_probs").hint
    assert "ReLU" in code_info("logits.clamped_scores").hint


# ---- transparency, counting, location ----------------------------------------------------------
def test_results_and_gradients_are_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(C, 16), nn.Tanh(), nn.Linear(16, C), nn.Softmax(-1))
    x, y, _ = _data()

    def run(intercept: bool):
        model.zero_grad(set_to_none=True)
        mode = LogitsInterceptor()
        if intercept:
            mode.__enter__()
        p = model(x)
        loss = F.cross_entropy(p, y) + torch.log(torch.exp(x * 3).sum(-1)).mean() * 0.1
        if intercept:
            mode.__exit__(None, None, None)
        loss.backward()
        return p.detach(), loss.detach(), [q.grad.clone() for q in model.parameters()], mode

    p0, l0, g0, _ = run(False)
    p1, l1, g1, mode = run(True)
    assert torch.equal(p0, p1) and torch.equal(l0, l1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert {f.code for f in mode.findings()} == {"logits.probabilities", "logits.naive_logsumexp"}


def test_checks_count_the_inspected_calls() -> None:
    x, y, _ = _data()
    mode = LogitsInterceptor()
    with mode:
        F.cross_entropy(F.softmax(x, -1), y)  # softmax + cross_entropy
        x.exp().sum().log()  # exp + sum + log
        x @ x.T  # not inspected
    assert mode.checks == 5


def test_interceptor_is_inactive_outside_its_window() -> None:
    x, y, _ = _data()
    mode = LogitsInterceptor()
    with mode:
        assert torch._C._len_torch_function_stack() == 1
    F.cross_entropy(F.softmax(x, -1), y)
    assert torch._C._len_torch_function_stack() == 0
    assert mode.findings() == [] and mode.checks == 0


def test_source_line_finder_names_this_line() -> None:
    where = SourceLineFinder().caller(1)
    line = inspect.currentframe().f_lineno - 1
    assert where is not None and _same_place(where, test_source_line_finder_names_this_line, line)


def test_numerics_module_does_not_import_lightning() -> None:
    code = (
        "import sys, healthmon.numerics.logits; "
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'tensorboard') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
