"""Find the operation that produced the first NaN/Inf of a training step, forward or backward.

A non-finite loss or gradient is a symptom; the cause is one operation that turned finite inputs
into NaN/Inf: ``log`` of an exact zero, a division by zero, ``sqrt`` of a negative, ``exp`` that
overflowed, or, in the backward pass, the derivative of ``sqrt``/``log``/``pow`` at 0. This package
re-runs a step (a closure) under an interceptor and names that operation at the user's source line.

*Forward.* :class:`NonFiniteTracer` is a ``TorchFunctionMode``: it sees every ``torch.*`` function,
``Tensor`` method and operator (``nn`` modules reach it through ``torch.nn.functional``), at the
outermost call, with the Python stack of the user's line. After each call it checks the floating
outputs (one host synchronisation per call: this runs only when something is already wrong) and
keeps, for every tensor that holds NaN/Inf, its *provenance*: the operation that created the
non-finite values. An operation is an origin when its output holds a kind of non-finite value
(NaN, +inf, -inf) that none of its inputs held; otherwise its output inherits the provenance of
its inputs. Non-finite values that are intended are sources of a weaker kind and never win over
a real origin: an infinite constant (``masked_fill(mask, -inf)``, ``torch.full(..., -inf)``) and
tensors made before the step that hold only infinities (a causal-mask buffer). The origin of the
loss is the provenance of the loss tensor, so a NaN that is made and then discarded (the forward
of the ``torch.where`` trap) is not blamed for a loss it never reached.

*Backward.* When the forward is finite, hooks on the autograd nodes of the recorded operations
(and on the nodes inside them, e.g. the log-softmax inside ``cross_entropy``) see each node's
incoming gradient and what it produced: a node whose incoming gradient is finite and whose output
is not made the first NaN/Inf of the backward pass, and the forward operation it belongs to is named.

*Explanations* say what about the inputs caused it (zeros under a log, the largest input of an
overflowing ``exp``, a constant feature under ``/ std``, a fully masked row...) and the fix.

*The optimizer step.* When the gradients are finite and the weights after a step are not,
:func:`explain_update` reads the optimizer and its state for the cause.

Files: ``values`` (kinds of non-finite values), ``operations`` (how a call is named, the traced
record), ``origin`` (the results), ``tracer`` (the forward), ``forward_causes`` and
``backward_causes`` (the explanations), ``hints``, ``inputs`` (batch, weights, buffers),
``backward_watch``, ``module_stack``, ``trace`` (the entry point), ``update_causes``.

Pure torch: no Lightning, no logging.
"""

from healthmon.numerics.nonfinite.backward_causes import explain_backward
from healthmon.numerics.nonfinite.backward_watch import BackwardWatch
from healthmon.numerics.nonfinite.forward_causes import explain_forward
from healthmon.numerics.nonfinite.inputs import batch_names
from healthmon.numerics.nonfinite.module_stack import ModuleStack
from healthmon.numerics.nonfinite.operations import base_name, display_name
from healthmon.numerics.nonfinite.origin import Origin, OriginTrace
from healthmon.numerics.nonfinite.trace import trace_nonfinite
from healthmon.numerics.nonfinite.tracer import NonFiniteTracer
from healthmon.numerics.nonfinite.update_causes import UpdateCause, explain_update
from healthmon.numerics.nonfinite.values import NAN, NEGINF, POSINF, kinds_text, nonfinite_kinds

__all__ = [
    "NAN",
    "NEGINF",
    "POSINF",
    "BackwardWatch",
    "ModuleStack",
    "NonFiniteTracer",
    "Origin",
    "OriginTrace",
    "UpdateCause",
    "base_name",
    "batch_names",
    "display_name",
    "explain_backward",
    "explain_forward",
    "explain_update",
    "kinds_text",
    "nonfinite_kinds",
    "trace_nonfinite",
]
