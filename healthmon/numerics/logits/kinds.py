"""Provenance: what kind of value produced a tensor (softmax output, exp of unshifted scores, ...).

The logits rules judge an argument by what made it. A result of an interesting call is tagged
with one of the kinds below by the interceptor; a tensor made before interception started is
classified here from its autograd node (``SoftmaxBackward0``, ``ExpBackward0``, ...), walking a
few view-like nodes back. The combinators :func:`exp_kind`, :func:`sum_kind` and :func:`div_kind`
are shared by both routes, so a formula is classified the same way whichever route saw it.

>>> import torch
>>> x = torch.randn(3, 4, requires_grad=True)
>>> graph_kind(torch.softmax(x, -1).grad_fn)
'softmax'
>>> graph_kind(torch.exp(x - x.max()).grad_fn)
'exp_shifted'
>>> graph_kind((x * 2).grad_fn) is None
True
"""

from __future__ import annotations

from typing import Any

from healthmon.numerics.loss_inputs import VIEW_NODES

SOFTMAX = "softmax"  # probabilities along a dim (softmax, or exp/sum written by hand, exp(log_softmax))
SIGMOID = "sigmoid"  # elementwise probabilities in (0, 1)
LOG_SOFTMAX = "log_softmax"  # stable log-probabilities
LOG_NAIVE = "log_naive"  # log of probabilities (already reported where it was computed)
EXP = "exp"  # exp of an unshifted input
EXP_SAFE = "exp_shifted"  # exp(x - max) or exp(x - logsumexp): cannot overflow
SUM_EXP = "sum_exp"
SUM_EXP_SAFE = "sum_exp_shifted"
MAX = "max"  # max / amax / logsumexp values: what a stable formula subtracts
SHIFTED = "shifted"  # x - max(x)
CLAMPED = "clamped:"  # prefix: scores clamped at 0, "clamped:relu", "clamped:clamp(min=0)"

PROBABILITIES = (SOFTMAX, SIGMOID)
LOG_PROBABILITIES = (LOG_SOFTMAX, LOG_NAIVE)


# ---- provenance from the autograd graph (tensors made before interception) --------------------
_PASS_NODES = VIEW_NODES | {"ClampBackward0", "ClampBackward1", "ClampMinBackward0", "ClampMaxBackward0"}
_SCALAR_NODES = frozenset({"AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0"})
_MAX_NODES = frozenset({"MaxBackward0", "MaxBackward1", "AmaxBackward0", "LogsumexpBackward0"})
_MAX_WALK = 12
# nodes whose output is of a known kind, whatever their inputs
_LEAF_KINDS = {
    "SoftmaxBackward0": SOFTMAX,
    "SigmoidBackward0": SIGMOID,
    "LogSoftmaxBackward0": LOG_SOFTMAX,
    **dict.fromkeys(_MAX_NODES, MAX),
}


def _parents(node: Any) -> list[Any]:
    return [n for n, _ in node.next_functions]


def graph_kind(node: Any, depth: int = 0) -> str | None:
    """The kind of value an autograd node produced (None when it says nothing about logits)."""
    if node is None or depth > _MAX_WALK:
        return None
    name = type(node).__name__
    if name in _PASS_NODES:
        parents = _parents(node)
        return graph_kind(parents[0], depth + 1) if parents else None
    if name in _LEAF_KINDS:
        return _LEAF_KINDS[name]
    parents = _parents(node)
    if name == "ExpBackward0":
        inner = graph_kind(parents[0], depth + 1) if parents else None
        return exp_kind(inner) if parents and parents[0] is not None else EXP
    if name.startswith("SumBackward"):
        return sum_kind(graph_kind(parents[0], depth + 1) if parents else None)
    if name == "LogBackward0":
        inner = graph_kind(parents[0], depth + 1) if parents else None
        return LOG_NAIVE if inner in PROBABILITIES else None
    if name in _SCALAR_NODES and len(parents) == 2:
        return _arithmetic_kind(name, parents[0], parents[1], depth)
    return None


def _arithmetic_kind(name: str, first: Any, second: Any, depth: int) -> str | None:
    """The kind of ``first (+ - * /) second`` (node ``name``; ``second`` None: a Python number)."""
    # x - max(x); a detached subtrahend (x - x.max().detach()) is indistinguishable from a
    # constant here, so it counts as a shift too: no alert without evidence.
    if (
        name == "SubBackward0"
        and first is not None
        and (second is None or graph_kind(second, depth + 1) == MAX)
    ):
        inner = graph_kind(first, depth + 1)
        return SHIFTED if second is not None or inner is None else inner
    if name == "DivBackward0" and first is not None and second is not None:
        return div_kind(graph_kind(first, depth + 1), graph_kind(second, depth + 1))
    if second is None and first is not None:  # an op with a Python number
        return graph_kind(first, depth + 1)
    return None


def exp_kind(inner: str | None) -> str:
    """The kind of ``exp`` of a value of kind ``inner``.

    A shift makes it safe; exp of log-probabilities is a softmax.
    """
    if inner == SHIFTED:
        return EXP_SAFE
    if inner in (LOG_SOFTMAX, LOG_NAIVE):
        return SOFTMAX
    return EXP


def sum_kind(inner: str | None) -> str | None:
    """The kind of a sum of a value of kind ``inner`` (only sums of exp are remembered)."""
    return {EXP: SUM_EXP, EXP_SAFE: SUM_EXP_SAFE}.get(inner or "")


def div_kind(num: str | None, den: str | None) -> str | None:
    """The kind of ``num / den``: a softmax written by hand when it is exp over a sum of the same exp."""
    if (num, den) in ((EXP, SUM_EXP), (EXP_SAFE, SUM_EXP_SAFE)):
        return SOFTMAX
    return None
