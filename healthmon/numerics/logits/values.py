"""Value evidence: does a tensor *look* like probabilities? (device tensors, resolved once).

Used only for the arguments of a loss, only when provenance is silent and there is no autograd
graph. Every check returns a device scalar so that the interceptor resolves all of them with one
host synchronisation.

>>> import torch
>>> p = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
>>> looks_like_softmax(p, 1).item(), looks_like_sigmoid(p).item(), saturated_fraction(p).item()
(1.0, 0.0, 0.5)
"""

from __future__ import annotations

import torch
from torch import Tensor


def row_tolerance(x: Tensor) -> float:
    """How far from 1 a row sum of ``x``'s dtype may be and still count as normalised."""
    return 1e-3 if torch.finfo(x.dtype).bits >= 32 else 2e-2


@torch.no_grad()
def looks_like_softmax(x: Tensor, dim: int) -> Tensor:
    """1.0 when every entry is in [0, 1] and every slice along ``dim`` sums to 1, else 0.0 (device)."""
    x = x.detach()
    if x.dim() == 0 or x.numel() == 0 or x.shape[dim] < 2:
        return torch.zeros((), device=x.device)
    in_range = ((x >= 0) & (x <= 1)).all()
    rows = x.float().sum(dim)
    ok = (rows - 1).abs().amax() <= row_tolerance(x)
    return (in_range & ok).float()


@torch.no_grad()
def looks_like_sigmoid(x: Tensor) -> Tensor:
    """1.0 when every entry lies strictly inside (0, 1) (and there are at least 2), else 0.0."""
    x = x.detach()
    if x.numel() < 2:
        return torch.zeros((), device=x.device)
    return ((x > 0) & (x < 1)).all().float()


@torch.no_grad()
def saturated_fraction(p: Tensor) -> Tensor:
    """Fraction of probabilities that are exactly 0 or exactly 1 (device scalar)."""
    p = p.detach()
    if p.numel() == 0:
        return torch.zeros((), device=p.device)
    return ((p == 0) | (p == 1)).float().mean()
