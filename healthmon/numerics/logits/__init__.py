"""Catch unstable logits formulas at the line that wrote them: a ``TorchFunctionMode`` interceptor.

The seed's second half is about formulas that are right on paper and wrong in floating point:
``log(sum(exp(x)))`` overflows, ``exp(x) / exp(x).sum()`` overflows or divides 0 by 0, and a loss
that expects logits but receives probabilities saturates and rounds its gradient to zero. These are
bugs in *how* a number was computed, so :class:`LogitsInterceptor` watches the computation itself:
while it is active (a sampled step's forward pass) it sees every call that goes through the torch
function layer (``torch.*``, ``Tensor.*`` methods and operators, ``torch.nn.functional.*`` and
hence the ``nn`` modules built on them), looks only at a small table of interesting functions and
hands every call through untouched: ``func(*args, **kwargs)`` is returned as is. Two more ways
scores reach the wrong loss -- raw scores where log-probabilities belong (``nll_loss``,
``kl_div``) and scores clamped at 0 before a logits loss -- are judged with the evidence in
:mod:`healthmon.numerics.loss_inputs`.

Evidence comes in two kinds:

* **Provenance** -- what produced an argument. Results of the interesting functions are tagged
  (softmax, sigmoid, exp, sum of exp, ...) in a weak, per-step table, which works with or without
  autograd; tensors made before interception started are classified from their autograd node
  (``SoftmaxBackward0``, ``ExpBackward0``, ...) when they have one.
* **Values** -- only for the arguments of a loss, only when provenance is silent and there is no
  graph: entries in [0, 1] with rows summing to 1 (softmax output), or inside (0, 1) (sigmoid
  output). Value checks and the saturation counts are device tensors, resolved with one host
  synchronisation in :meth:`LogitsInterceptor.findings`.

Each finding names the user's own source line (``path/file.py:LINE``): the first stack frame
outside torch, Lightning, torchmetrics, healthmon and the standard library, found by
:class:`~healthmon.numerics.source_lines.SourceLineFinder`.

The package, one idea per module:

* :mod:`~healthmon.numerics.logits.kinds` - provenance tags and the autograd-graph classifier.
* :mod:`~healthmon.numerics.logits.values` - value evidence (looks like softmax / sigmoid output).
* :mod:`~healthmon.numerics.logits.findings` - :class:`Finding` and the per-window evidence book.
* :mod:`~healthmon.numerics.logits.rules` - one rule per interesting function.
* :mod:`~healthmon.numerics.logits.table` - which torch callables each rule judges.
* :mod:`~healthmon.numerics.logits.interceptor` - :class:`LogitsInterceptor`, the mode itself.

This package is pure torch: no Lightning, no logging.
"""

from __future__ import annotations

from healthmon.numerics.logits.findings import Finding
from healthmon.numerics.logits.interceptor import LogitsInterceptor
from healthmon.numerics.logits.kinds import graph_kind
from healthmon.numerics.logits.values import looks_like_sigmoid, looks_like_softmax, saturated_fraction

__all__ = [
    "Finding",
    "LogitsInterceptor",
    "graph_kind",
    "looks_like_sigmoid",
    "looks_like_softmax",
    "saturated_fraction",
]
