"""healthmon.numerics.probe: the probe batch's parts, weights and the loss closures they give."""

from __future__ import annotations

import math

import pytest
import torch
from numerics.hessian_cases import exact_hessian
from torch import nn

from healthmon.numerics.hvp import HessianOperator
from healthmon.numerics.probe import ProbeBatch, loss_of


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(
        n, 1, generator=g, dtype=torch.float64
    )


def test_rows_and_completion() -> None:
    probe = ProbeBatch()
    probe.add(_data(5, 0), 0)
    probe.add({"scalar": torch.tensor(1.0)}, 1)  # no rows known: weighs 1
    assert probe.rows == 6 and [rows for _, _, rows in probe.parts] == [5, 1]
    assert not probe.close_after(3) and not probe.complete
    assert probe.close_after(2) and probe.complete
    assert ProbeBatch().close_after(None) is False  # no part yet
    one = ProbeBatch()
    one.add(_data(2, 0), 0)
    assert one.close_after(0) and one.close_after(None)  # None/0 micro-batches count as 1
    two = ProbeBatch()
    two.add(_data(2, 0), 0)
    assert two.close_after(4, available=1)  # an epoch of one batch: the probe is whole
    assert not ProbeBatch().close_after(4, available=math.inf)


def test_chunk_weights_are_shares_of_all_rows() -> None:
    probe = ProbeBatch()
    probe.add(_data(6, 0), 3)
    probe.add(_data(2, 1), 4)
    chunks = probe.chunks(4)
    assert [(idx, w) for _, idx, w in chunks] == [(3, 0.5), (3, 0.25), (4, 0.25)]
    assert [c[0].shape[0] for c, _, _ in chunks] == [4, 2, 2]
    assert sum(w for _, _, w in probe.chunks(None)) == pytest.approx(1.0)


def test_losses_replay_before_each_call_and_read_the_loss() -> None:
    probe = ProbeBatch()
    probe.add(_data(3, 0), 7)
    calls: list[str] = []
    seen: list[int] = []

    def step(batch, idx):
        calls.append("step")
        seen.append(idx)
        return {"loss": batch[0].sum().requires_grad_()}

    ((fn, weight),) = probe.losses(step, None, before=lambda: calls.append("before"))
    loss = fn()
    assert calls == ["before", "step"] and seen == [7] and weight == 1.0
    assert loss.item() == pytest.approx(probe.parts[0][0][0].sum().item())


def test_loss_of_accepts_a_tensor_or_a_dict_and_rejects_the_rest() -> None:
    t = torch.ones(1, requires_grad=True).sum()
    assert loss_of(t) is t and loss_of({"loss": t}) is t
    for bad in (None, torch.ones(()), {"other": t}, 1.0):
        with pytest.raises(TypeError, match="differentiable loss"):
            loss_of(bad)


def test_weighted_chunks_give_the_hessian_of_the_whole_probe_mean_loss() -> None:
    """Two micro-batches of different sizes, cut into chunks.

    The operator's dense matrix is the exact (torch.func.hessian) Hessian of the mean loss over all
    probe rows.
    """
    model = _tiny()
    (xa, ya), (xb, yb) = _data(5, 0), _data(3, 1)
    probe = ProbeBatch()
    probe.add((xa, ya), 0)
    probe.add((xb, yb), 1)

    def step(batch, idx):
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    losses = probe.losses(step, 2, before=lambda: None)
    assert len(losses) == 5  # chunks of 2, 2, 1 rows of the first part, 2, 1 of the second
    op = HessianOperator(model, losses, method="double_backward")
    dense = torch.stack([op.matvec(e) for e in torch.eye(op.n, dtype=torch.float64)], dim=1)
    op.release()
    x, y = torch.cat([xa, xb]), torch.cat([ya, yb])
    exact = exact_hessian(model, lambda m: ((m(x) - y) ** 2).mean())
    assert torch.allclose(dense, exact, rtol=1e-10, atol=1e-12)
