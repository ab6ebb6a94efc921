"""The entry point: replay a step under the tracer, then its backward when the forward is finite.

The origin of the loss is the provenance of the loss tensor, so a NaN that is made and then
discarded (the forward of the ``torch.where`` trap) is not blamed for a loss it never reached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from healthmon.numerics.nonfinite.backward_watch import BackwardWatch
from healthmon.numerics.nonfinite.inputs import tensor_names
from healthmon.numerics.nonfinite.module_stack import ModuleStack
from healthmon.numerics.nonfinite.origin import OriginTrace
from healthmon.numerics.nonfinite.tracer import NonFiniteTracer
from healthmon.numerics.nonfinite.values import nonfinite_kinds
from healthmon.numerics.source_lines import SourceLineFinder


def trace_nonfinite(
    step: Callable[[], Any],
    *,
    module: torch.nn.Module | None = None,
    batch: Any = None,
    backward: bool = True,
    source_lines: SourceLineFinder | None = None,
) -> OriginTrace:
    """Run ``step`` (a forward pass returning the loss) under the tracer, then its backward if needed.

    Args:
        step: the replayed step; returns the loss tensor (or None).
        module: the model, to name modules, parameters and buffers.
        batch: the batch the step reads, to name its tensors.
        backward: run ``torch.autograd.grad`` of a finite loss under node hooks (the gradients are
            returned by autograd, never written into ``.grad``).
        source_lines: the finder naming the user's lines (a fresh one when None; pass the same
            finder to every replay to keep its caches).

    Returns:
        an :class:`OriginTrace`; a step that raises is traced up to the exception.
    """
    modules = ModuleStack(module)
    tracer = NonFiniteTracer(tensor_names(module, batch), modules.current, source_lines)
    loss: Any = None
    try:
        with tracer:
            loss = step()
    except Exception as exc:
        tracer.errors.append(f"step raised {type(exc).__name__}: {exc}")
    finally:
        modules.remove()
    if not isinstance(loss, Tensor) or not loss.is_floating_point():
        origin = tracer.first_real_origin()
        return OriginTrace(None, origin, None, None, tracer.ops, tracer.errors)
    loss_finite = bool(torch.isfinite(loss.detach()).all())
    if not loss_finite:
        origin = tracer.provenance(loss) or tracer.first_real_origin()
        return OriginTrace(False, origin, None, None, tracer.ops, tracer.errors)
    if not backward or loss.grad_fn is None:
        return OriginTrace(True, None, None, None, tracer.ops, tracer.errors)
    target = loss if loss.numel() == 1 else loss.sum()
    watch = BackwardWatch(target.grad_fn, tracer.nodes, tracer.errors)
    grads_finite: bool | None = None
    try:
        if watch.leaves:
            grads = torch.autograd.grad(target, watch.leaves, allow_unused=True)
            present = [g for g in grads if g is not None]
            grads_finite = not any(nonfinite_kinds(present))
    except Exception as exc:
        tracer.errors.append(f"backward raised {type(exc).__name__}: {exc}")
    finally:
        watch.remove()
    return OriginTrace(True, None, watch.origin, grads_finite, tracer.ops, tracer.errors)
