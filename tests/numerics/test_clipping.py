"""healthmon.numerics.clipping: the norm of the clipped gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from healthmon.numerics.clipping import clipped_norm


def test_clipped_norm_is_the_norm_clip_grad_norm_leaves() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1))
    frozen = nn.Parameter(torch.ones(3))  # no gradient: ignored
    (model(torch.randn(16, 5)) * 100).pow(2).mean().backward()
    params = [*model.parameters(), frozen]
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
    assert total > 0.5
    norm = clipped_norm(params)
    assert norm is not None and norm.item() == pytest.approx(0.5, rel=1e-5)
    exact = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert norm.item() == pytest.approx(exact.item(), rel=1e-6)
    assert clipped_norm([frozen]) is None and clipped_norm([]) is None
