"""Evidence about loss inputs: log provenance, clamp provenance and the value checks, exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from healthmon.numerics.loss_inputs import (
    CLAMPED_MIN_ZERO_FRACTION,
    clamp_source,
    clamped_zero_fraction,
    log_prob_tolerance,
    log_source,
    raw_score_logsumexp,
    zero_fraction,
)


def _scores(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 2


# ---- provenance: a log behind elementwise steps ----------------------------------------------
@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda z: F.log_softmax(z, 1), "log_softmax"),
        (lambda z: nn.LogSoftmax(1)(z)[:, :3].reshape(-1), "log_softmax"),
        (lambda z: F.dropout(F.log_softmax(z, 1), 0.5), "log_softmax"),
        (lambda z: (1 - F.log_softmax(z, 1).exp()) ** 2 * F.log_softmax(z, 1), "log_softmax"),
        (lambda z: F.logsigmoid(z), "logsigmoid"),
        (lambda z: torch.log(torch.sigmoid(z) + 1e-6), "log"),
        (lambda z: z - z.logsumexp(1, keepdim=True), "logsumexp"),
        (lambda z: z * 2 + 1, None),
        (lambda z: nn.Linear(5, 5)(F.log_softmax(z, 1)), None),  # a log behind a matmul: the model's
        (lambda z: F.relu(z), None),
    ],
)
def test_log_source(build, expected) -> None:
    torch.manual_seed(0)
    z = _scores(4, 5).requires_grad_(True)
    assert log_source(build(z).grad_fn) == expected


def test_log_source_without_a_graph() -> None:
    assert log_source(None) is None


# ---- provenance: a clamp at or above 0 ------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda z: F.relu(z), "relu"),
        (lambda z: nn.ReLU()(z), "relu"),
        (lambda z: z.relu().view(-1), "relu"),
        (lambda z: F.relu(z) / 0.5, "relu"),
        (lambda z: z.clamp(min=0), "clamp(min=0)"),
        (lambda z: z.clamp(0.5, 4.0), "clamp(min=0.5)"),
        (lambda z: torch.clamp_min(z, 0.0), "clamp(min=0)"),
        (lambda z: F.relu6(z), "hardtanh/relu6 (min_val=0)"),
        (lambda z: z.clamp(min=-1.0), None),
        (lambda z: z.clamp(max=3.0), None),
        (lambda z: F.hardtanh(z), None),
        (lambda z: F.leaky_relu(z), None),
        (lambda z: F.softplus(z), None),
        (lambda z: nn.Linear(5, 5)(F.relu(z)), None),
        (lambda z: F.relu(z) + F.relu(-z), None),
    ],
)
def test_clamp_source(build, expected) -> None:
    torch.manual_seed(0)
    z = _scores(4, 5).requires_grad_(True)
    assert clamp_source(build(z).grad_fn) == expected


# ---- values -----------------------------------------------------------------------------------
def test_raw_score_logsumexp_is_the_largest_row_logsumexp() -> None:
    z = _scores(6, 5)
    expected = max(abs(math.log(sum(math.exp(v) for v in row))) for row in z.tolist())
    assert raw_score_logsumexp(z, 1).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_log_probabilities_are_never_raw_scores(dtype: torch.dtype) -> None:
    z = _scores(64, 1000) * 5
    assert raw_score_logsumexp(F.log_softmax(z.double(), 1).to(dtype), 1).item() == 0.0
    assert raw_score_logsumexp(torch.log(F.softmax(z, 1) + 1e-8).to(dtype), 1).item() == 0.0
    assert log_prob_tolerance(dtype) > 0


def test_raw_scores_with_nonfinite_rows_or_all_negative_entries() -> None:
    z = _scores(3, 4)
    z[0] = float("-inf")  # a fully masked row: its logsumexp is -inf, left out
    expected = max(abs(math.log(sum(math.exp(v) for v in row))) for row in z[1:].tolist())
    assert raw_score_logsumexp(z, 1).item() == pytest.approx(expected, rel=1e-6)
    assert raw_score_logsumexp(-z.abs() - 1, 1).item() == 0.0  # never positive: not evidence
    assert raw_score_logsumexp(torch.empty(0, 4), 1).item() == 0.0


def test_zero_fractions_count_exactly() -> None:
    z = torch.tensor([[0.0, 1.5, 0.0, 2.0], [0.3, 0.0, 4.0, 0.0]])
    assert zero_fraction(z).item() == pytest.approx(4 / 8)
    assert clamped_zero_fraction(z).item() == pytest.approx(4 / 8)
    assert clamped_zero_fraction(torch.relu(_scores(16, 5))).item() == pytest.approx(
        (torch.relu(_scores(16, 5)) == 0).sum().item() / 80
    )


@pytest.mark.parametrize(
    "values",
    [
        torch.zeros(4, 5),  # a zero-initialised head at step 0: no positive score
        _scores(4, 5),  # free logits: negative entries
        torch.rand(4, 5) + 0.1,  # positive, never exactly 0
        torch.tensor([[0.0] + [1.0] * 39]),  # 1 zero in 40 (2.5%): too few
    ],
    ids=["zeros", "free", "positive", "one-zero"],
)
def test_values_that_do_not_look_clamped(values: torch.Tensor) -> None:
    assert clamped_zero_fraction(values).item() == 0.0


def test_threshold_of_exact_zeros() -> None:
    n = 100
    zeros = math.ceil(CLAMPED_MIN_ZERO_FRACTION * n)
    values = torch.cat([torch.zeros(zeros), torch.ones(n - zeros)])
    assert clamped_zero_fraction(values).item() == pytest.approx(zeros / n)
