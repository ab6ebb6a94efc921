"""What reaches a loss: raw scores where log-probabilities belong, and class scores clamped at 0.

Two ways class scores reach the wrong loss, each judged from provenance (the autograd graph that
produced the loss's input) and from values (when there is no graph to read):

* **Raw scores into a log-probability loss.** ``nll_loss`` (and ``NLLLoss``) computes
  ``-input[y]`` and the input of ``kl_div`` enters as ``target * (log target - input)``: both
  assume rows of log-probabilities, which are never positive and whose ``logsumexp`` over the
  classes is 0. Fed raw scores, the loss is unbounded below: it falls forever by inflating the
  target's score while the model gets no better. Provenance exempts inputs built from a log
  (``log_softmax``, ``logsigmoid``, ``log``, ``x - logsumexp(x)``), also through elementwise steps
  (dropout, a focal weight, a slice); the values decide the rest: a positive entry is never a
  log-probability.
* **Scores clamped at 0 before a logits loss.** A ``relu`` / ``clamp(min=0)`` on the last layer's
  output, before ``cross_entropy``, ``log_softmax`` or ``BCEWithLogits``: every score stuck at
  exactly 0 passes no gradient, and no score can go below 0. Provenance names the clamp; without
  a graph, the values must look clamped (no negative entry, some positive, many exactly 0).

All value evidence is a device scalar, for the caller to resolve with its other checks in one
host synchronisation. Pure torch: no Lightning.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor

#: Autograd nodes that produce a log (of probabilities, presumably): the user meant log-probabilities.
LOG_NODES: dict[str, str] = {
    "LogSoftmaxBackward0": "log_softmax",
    "LogSigmoidBackward0": "logsigmoid",
    "LogBackward0": "log",
    "Log1pBackward0": "log1p",
    "LogsumexpBackward0": "logsumexp",
}

#: Autograd nodes that only copy, cast or re-view a tensor: its values are still what they were.
VIEW_NODES = frozenset(
    {
        "CloneBackward0",
        "ToCopyBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "UnsqueezeBackward0",
        "PermuteBackward0",
        "TransposeBackward0",
        "TBackward0",
        "ExpandBackward0",
    }
)
_SHAPE_NODES = VIEW_NODES | {"SliceBackward0", "SelectBackward0", "IndexBackward0", "ContiguousBackward0"}
#: Elementwise steps through which a log still makes a log-probability-like tensor (dropout, a
#: focal weight ``(1 - p) ** gamma * logp``, label smoothing mixes, masking, a safety clamp).
_ELEMENTWISE_NODES = frozenset(
    {
        "AddBackward0",
        "AddBackward1",
        "SubBackward0",
        "SubBackward1",
        "RsubBackward0",
        "RsubBackward1",
        "MulBackward0",
        "MulBackward1",
        "DivBackward0",
        "DivBackward1",
        "NegBackward0",
        "PowBackward0",
        "PowBackward1",
        "ExpBackward0",
        "WhereBackward0",
        "MaskedFillBackward0",
        "MaskedFillBackward1",
        "NativeDropoutBackward0",
        "ClampBackward0",
        "ClampBackward1",
        "ClampMinBackward0",
        "ClampMaxBackward0",
        "MaximumBackward0",
        "MinimumBackward0",
    }
)
_SCALAR_ARITH_NODES = frozenset({"MulBackward0", "DivBackward0", "AddBackward0", "SubBackward0"})
_MAX_NODES_VISITED = 48
_MAX_CHAIN = 12


def _parents(node: Any) -> list[Any]:
    return [n for n, _ in node.next_functions if n is not None]


def log_source(node: Any) -> str | None:
    """The log operation (``log_softmax``, ``log``...) a tensor was built from, through elementwise steps.

    Walks the autograd graph from ``node`` through shape and elementwise nodes only, so a log
    deep inside the network (behind a matmul) does not count. None when no log is found.
    """
    if node is None:
        return None
    queue, seen = deque([node]), {id(node)}
    while queue and len(seen) <= _MAX_NODES_VISITED:
        current = queue.popleft()
        name = type(current).__name__
        if name in LOG_NODES:
            return LOG_NODES[name]
        if name not in _SHAPE_NODES and name not in _ELEMENTWISE_NODES:
            continue
        for parent in _parents(current):
            if id(parent) not in seen:
                seen.add(id(parent))
                queue.append(parent)
    return None


def _lower_bound(node: Any, name: str) -> float | None:
    """The lower bound a clamp-like node applied (None when it has none or it is a tensor)."""
    if name == "ReluBackward0":
        return 0.0
    attribute = {"ClampMinBackward0": "_saved_min", "ClampBackward1": "_saved_min"}.get(name)
    if name == "HardtanhBackward0":
        attribute = "_saved_min_val"
    if attribute is None:
        return None
    bound = getattr(node, attribute, None)
    return float(bound) if isinstance(bound, (int, float)) and not isinstance(bound, bool) else None


def clamp_source(node: Any) -> str | None:
    """How a tensor was clamped at or above 0 just before this point (``relu``, ``clamp(min=0)``...).

    Follows shape nodes and arithmetic with a Python number (``relu(z) / T``) back to a ReLU,
    a ``clamp``/``clamp_min`` with a lower bound >= 0, or ``relu6``/``hardtanh`` with ``min_val``
    >= 0. None when the tensor's last real operation is anything else (a Linear, say).
    """
    for _ in range(_MAX_CHAIN):
        if node is None:
            return None
        name = type(node).__name__
        bound = _lower_bound(node, name)
        if bound is not None:
            if bound < 0:
                return None
            if name == "ReluBackward0":
                return "relu"
            if name == "HardtanhBackward0":
                return f"hardtanh/relu6 (min_val={bound:g})"
            return f"clamp(min={bound:g})"
        edges = [n for n, _ in node.next_functions]
        through_shape = name in _SHAPE_NODES and edges
        through_scalar_arith = name in _SCALAR_ARITH_NODES and len(edges) == 2 and edges[1] is None
        if not (through_shape or through_scalar_arith):
            return None
        node = edges[0]
    return None


# ---- value evidence (device scalars) ----------------------------------------------------------
def log_prob_tolerance(dtype: torch.dtype) -> float:
    """How far from 0 a log-probability computed in ``dtype`` may stray by rounding."""
    return 1e-3 if torch.finfo(dtype).bits >= 32 else 2e-2


@torch.no_grad()
def raw_score_logsumexp(x: Tensor, dim: int) -> Tensor:
    """The largest row ``logsumexp`` over ``dim`` when an entry is positive, else 0 (device scalar).

    Log-probabilities are never positive and their rows' ``logsumexp`` is 0, so a positive entry
    (beyond rounding) proves the rows are not log-probabilities; the ``logsumexp`` says how far
    from normalised they are. Rows with a non-finite ``logsumexp`` are left out (NaN/Inf are the
    non-finite checks' business).
    """
    x = x.detach()
    if x.dim() == 0 or x.numel() == 0:
        return torch.zeros((), device=x.device)
    values = x.float()
    finite = torch.isfinite(values)
    positive = (torch.where(finite, values, 0.0) > log_prob_tolerance(x.dtype)).any()
    lse = torch.logsumexp(values, dim)
    largest = torch.where(torch.isfinite(lse), lse.abs(), 0.0).amax()
    return torch.where(positive, largest, 0.0)


@torch.no_grad()
def zero_fraction(x: Tensor) -> Tensor:
    """Fraction of entries that are exactly 0 (device scalar)."""
    x = x.detach()
    if x.numel() == 0:
        return torch.zeros((), device=x.device)
    return (x == 0).float().mean()


#: Without a graph, scores look clamped when at least this fraction is exactly 0.
CLAMPED_MIN_ZERO_FRACTION = 0.05


@torch.no_grad()
def clamped_zero_fraction(x: Tensor) -> Tensor:
    """Fraction of exact zeros when the values look clamped at 0, else 0 (device scalar).

    Clamped scores have no negative entry, some positive ones, and at least
    :data:`CLAMPED_MIN_ZERO_FRACTION` of exact zeros. Free logits are almost never exactly 0, and
    an all-zero output (a zero-initialised head at step 0) has no positive entry.
    """
    x = x.detach()
    if x.numel() < 2:
        return torch.zeros((), device=x.device)
    zeros = zero_fraction(x)
    looks = (x.amin() == 0) & (x.amax() > 0) & (zeros >= CLAMPED_MIN_ZERO_FRACTION)
    return torch.where(looks, zeros, 0.0)
