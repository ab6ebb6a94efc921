"""Hooks on the autograd graph of a traced step: the first node whose backward made NaN/Inf.

Used when the forward pass is finite and the gradients are not: a node whose incoming gradient is
finite and whose output is not made the first NaN/Inf of the backward pass, and the forward
operation it belongs to is named.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from healthmon.numerics.nonfinite.backward_causes import explain_backward
from healthmon.numerics.nonfinite.operations import TracedOp
from healthmon.numerics.nonfinite.origin import Origin
from healthmon.numerics.nonfinite.values import nonfinite_kinds


class BackwardWatch:
    """Hooks on the autograd nodes of a traced step: the first node that made a finite gradient NaN/Inf.

    Nodes recorded by the tracer are named after their operation; the nodes inside a composite
    operation (the log-softmax inside ``cross_entropy``) belong to the nearest recorded node above
    them in the graph.
    """

    def __init__(self, root: Any, nodes: dict[Any, TracedOp], errors: list[str]) -> None:
        self.origin: Origin | None = None
        self.leaves: list[Tensor] = []
        self.errors = errors
        self._handles: list[Any] = []
        owner: dict[Any, TracedOp | None] = {root: nodes.get(root)}
        stack = [root]
        while stack:
            node = stack.pop()
            if type(node).__name__ == "AccumulateGrad":
                self.leaves.append(node.variable)
                continue
            self._handles.append(node.register_hook(self._hook(owner[node])))
            for nxt, _ in node.next_functions:
                if nxt is not None and nxt not in owner:
                    owner[nxt] = nodes.get(nxt) or owner[node]
                    stack.append(nxt)

    def _hook(self, op: TracedOp | None) -> Callable[..., None]:
        def hook(grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...]) -> None:
            if self.origin is not None or op is None:
                return
            try:
                outs = [g for g in grad_outputs if isinstance(g, Tensor)]
                ins = [g for g in grad_inputs if isinstance(g, Tensor)]
                kinds = nonfinite_kinds(outs + ins)
                if any(kinds[: len(outs)]) or not any(kinds[len(outs) :]):
                    return
                produced = frozenset().union(*kinds[len(outs) :])
                cause, hint = explain_backward(op, list(grad_outputs), list(grad_inputs))
                self.origin = Origin.at_op("backward", op, cause, hint, produced)
            except Exception as exc:
                self.errors.append(f"backward hook: {type(exc).__name__}: {exc}")

        return hook

    def remove(self) -> None:
        """Take the hooks off the graph."""
        for h in self._handles:
            h.remove()
        self._handles = []
