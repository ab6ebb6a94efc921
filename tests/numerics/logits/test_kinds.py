"""healthmon.numerics.logits.kinds: provenance from the autograd graph and the kind combinators."""

from __future__ import annotations

import torch

from healthmon.numerics.logits.kinds import (
    EXP,
    EXP_SAFE,
    LOG_NAIVE,
    LOG_SOFTMAX,
    MAX,
    SHIFTED,
    SOFTMAX,
    SUM_EXP,
    SUM_EXP_SAFE,
    div_kind,
    exp_kind,
    graph_kind,
    sum_kind,
)


def test_exp_sum_and_div_compose_into_a_softmax() -> None:
    assert exp_kind(None) == EXP and exp_kind(SHIFTED) == EXP_SAFE
    assert exp_kind(LOG_SOFTMAX) == SOFTMAX and exp_kind(LOG_NAIVE) == SOFTMAX
    assert sum_kind(EXP) == SUM_EXP and sum_kind(EXP_SAFE) == SUM_EXP_SAFE and sum_kind(None) is None
    assert div_kind(EXP, SUM_EXP) == SOFTMAX and div_kind(EXP_SAFE, SUM_EXP_SAFE) == SOFTMAX
    assert div_kind(EXP, SUM_EXP_SAFE) is None


def test_graph_kind_follows_views_shifts_and_scalars() -> None:
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    assert graph_kind(None) is None
    assert graph_kind(torch.softmax(x, -1).reshape(-1).grad_fn) == SOFTMAX
    assert graph_kind(torch.log_softmax(x, -1).grad_fn) == LOG_SOFTMAX
    assert graph_kind(torch.log(torch.softmax(x, -1)).grad_fn) == LOG_NAIVE
    assert graph_kind(x.amax(-1).grad_fn) == MAX
    assert graph_kind((x - x.amax(-1, keepdim=True)).grad_fn) == SHIFTED
    assert graph_kind((x - x.amax(-1, keepdim=True).detach()).exp().grad_fn) == EXP_SAFE
    assert graph_kind((torch.exp(x) * 2).grad_fn) == EXP  # an op with a Python number keeps the kind


def test_deep_graphs_stop_the_walk() -> None:
    x = torch.randn(3, requires_grad=True)
    y = torch.softmax(x, -1)
    for _ in range(20):
        y = y.view(-1)
    assert graph_kind(y.grad_fn) is None  # past the walk limit: no evidence, no alert
