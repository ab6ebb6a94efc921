"""The forward tracer: a ``TorchFunctionMode`` that keeps the provenance of every NaN/Inf.

:class:`NonFiniteTracer` sees every ``torch.*`` function, ``Tensor`` method and operator
(``nn`` modules reach it through ``torch.nn.functional``), at the outermost call, with the
Python stack of the user's line. After each call it checks the floating outputs (one host
synchronisation per call: this runs only when something is already wrong) and keeps, for every
tensor that holds NaN/Inf, its *provenance*: the operation that created the non-finite values.
An operation is an origin when its output holds a kind of non-finite value (NaN, +inf, -inf)
that none of its inputs held; otherwise its output inherits the provenance of its inputs.
Non-finite values that are intended are sources of a weaker kind and never win over a real
origin: an infinite constant (``masked_fill(mask, -inf)``, ``torch.full(..., -inf)``) and
tensors made before the step that hold only infinities (a causal-mask buffer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from healthmon.numerics.nonfinite.backward_causes import BACKWARD_EXPLAINED
from healthmon.numerics.nonfinite.forward_causes import FORWARD_EXPLAINED, explain_forward
from healthmon.numerics.nonfinite.hints import HINT_CONSTANT, HINT_GENERIC, HINT_MASK
from healthmon.numerics.nonfinite.inputs import input_origin
from healthmon.numerics.nonfinite.operations import TracedOp, base_name, is_inplace, raw_name
from healthmon.numerics.nonfinite.origin import Origin
from healthmon.numerics.nonfinite.values import (
    NAN,
    is_floating,
    kinds_text,
    nonfinite_kinds,
    number_kind,
    numbers_in,
    tensors_in,
)
from healthmon.numerics.source_lines import SourceLineFinder


@dataclass
class _Before:
    """What an in-place operation's target held before the operation overwrote it."""

    kinds: frozenset[str]
    prov: Origin | None
    saved: Tensor | None


_SKIP_FUNCS = frozenset(
    {
        "__set__",
        "size",
        "dim",
        "numel",
        "item",
        "tolist",
        "data_ptr",
        "stride",
        "is_floating_point",
        "is_complex",
        "requires_grad_",
        "retain_grad",
        "register_hook",
        "backward",
        "__repr__",
        "__format__",
        "__bool__",
        "__len__",
        "__iter__",
        "__hash__",
    }
)


def _written(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, inplace: bool
) -> list[Tensor]:
    """The floating tensors a call wrote: its results, and the target of an in-place call.

    An input a call returns as it is (``F.dropout`` with ``p=0``, ``contiguous`` of a contiguous
    tensor) was not written: it keeps its provenance.
    """
    outputs = [t for t in tensors_in(out) if is_floating(t)]
    if inplace and args and is_floating(args[0]):
        if not any(t is args[0] for t in outputs):
            outputs.append(args[0])
        return outputs
    given = list(tensors_in((args, kwargs)))
    return [t for t in outputs if not any(t is g for g in given)]


class NonFiniteTracer(TorchFunctionMode):
    """A ``TorchFunctionMode`` that records the provenance of every NaN/Inf; results are untouched.

    Args:
        names: tensors made before the step, by what they are (``{tensor: ("batch", "batch[0]")}``,
            ``("parameter", "net.0.weight")``, ``("buffer", "mask")``); NaN/Inf found in them is
            named after them.
        module_of: a callable returning the module whose forward is running (or None).
        source_lines: the finder naming the user's line of each operation (a fresh one when None).
    """

    def __init__(
        self,
        names: WeakIdKeyDictionary | None = None,
        module_of: Callable[[], str | None] | None = None,
        source_lines: SourceLineFinder | None = None,
    ) -> None:
        super().__init__()
        self.source_lines = source_lines if source_lines is not None else SourceLineFinder()
        self.names = names if names is not None else WeakIdKeyDictionary()
        self.module_of = module_of or (lambda: None)
        self.ops = 0
        self.errors: list[str] = []
        self.origins: list[Origin] = []
        self.nodes: dict[Any, TracedOp] = {}
        self._prov: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> Origin | None (finite)
        self._producer: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> TracedOp

    # -- dispatch ------------------------------------------------------------------------------
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if raw_name(func) in _SKIP_FUNCS:
            return func(*args, **kwargs)
        before: _Before | None = None
        inplace = is_inplace(func, args, kwargs)
        if inplace and args and is_floating(args[0]):
            try:  # an in-place op overwrites its input: remember what it held
                before = self._before_inplace(func, args[0])
            except Exception as exc:
                self._note_error(func, exc)
        out = func(*args, **kwargs)
        try:
            self._observe(func, args, kwargs, out, inplace, before)
        except Exception as exc:  # the tracer must never break the user's step
            self._note_error(func, exc)
        return out

    def _note_error(self, func: Any, exc: Exception) -> None:
        """Keep the tracer's first ten internal errors (they are reported, never raised)."""
        if len(self.errors) < 10:
            self.errors.append(f"{raw_name(func)}: {type(exc).__name__}: {exc}")

    def _before_inplace(self, func: Any, target: Tensor) -> _Before:
        """The kinds and provenance of an in-place op's target before the op (and its values, if needed)."""
        if target in self._prov:
            prov = self._prov[target]
            kinds = nonfinite_kinds([target])[0] if prov is not None else frozenset()
        else:
            kinds = nonfinite_kinds([target])[0]
            prov = self._external(target, kinds, None) if kinds else None
        saved = target.detach().clone() if base_name(func) in FORWARD_EXPLAINED else None
        return _Before(kinds, prov, saved)

    def _observe(
        self,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        out: Any,
        inplace: bool,
        before: _Before | None = None,
    ) -> None:
        outputs = _written(func, args, kwargs, out, inplace)
        if not outputs:
            return
        self.ops += 1
        inputs = [
            t for t in tensors_in((args, kwargs)) if is_floating(t) and not any(t is o for o in outputs)
        ]
        name = base_name(func)
        if before is not None and before.saved is not None:
            args = (before.saved, *args[1:])  # explain with the values the op read
        op = TracedOp(
            seq=self.ops,
            func=func,
            name=name,
            where=self.source_lines.caller(3),
            module=self.module_of(),
            args=args if name in BACKWARD_EXPLAINED else (),
            kwargs=kwargs if name in BACKWARD_EXPLAINED else {},
            parents=[self._producer.get(t) for t in inputs[:4]],
        )
        out_kinds = nonfinite_kinds(outputs)
        self._register(op, outputs)
        if not any(out_kinds):
            for t in outputs:
                self._prov[t] = None
            return
        in_kinds, in_prov = self._input_state(inputs, op)
        if before is not None:
            in_kinds.append(before.kinds)
            in_prov.append(before.prov)
        constant = self._constant_kinds(args, kwargs)
        present = set(constant).union(*in_kinds) if in_kinds else set(constant)
        real = [p for p in in_prov if p is not None and not p.intended]
        for t, kinds in zip(outputs, out_kinds, strict=True):
            if not kinds:
                self._prov[t] = None
                continue
            new = frozenset(kinds - present)
            if real:
                prov = min(real, key=lambda p: p.seq)
                if new and prov.then is None and NAN in new:
                    prov.then = f"Downstream, {op.name} turned it into NaN at {op.where}."
            elif new:
                prov = self._new_origin(op, args, kwargs, inputs, t, new)
            else:
                prov = self._constant_origin(op, in_prov, constant, kinds)
            self._prov[t] = prov

    def _register(self, op: TracedOp, outputs: list[Tensor]) -> None:
        """Remember ``op`` as the maker of ``outputs`` and as the owner of their autograd nodes."""
        for t in outputs:
            self._producer[t] = op
            node = t.grad_fn
            if node is not None and node not in self.nodes:
                self.nodes[node] = op

    def _constant_origin(
        self, op: TracedOp, in_prov: list[Origin | None], constant: list[str], kinds: frozenset[str]
    ) -> Origin:
        """Provenance of NaN/Inf that no input made new: a NaN literal, an intended source, or a mask."""
        if NAN in constant:
            return self._origin(op, "a NaN literal among its arguments.", HINT_CONSTANT, frozenset({NAN}))
        intended = [p for p in in_prov if p is not None]
        if intended:
            return min(intended, key=lambda p: p.seq)
        return self._origin(
            op,
            f"an infinite constant among its arguments ({', '.join(sorted(constant))}), e.g. a mask.",
            HINT_MASK,
            frozenset(kinds),
            intended=True,
        )

    def _constant_kinds(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
        kinds = []
        for x in numbers_in(list(args) + list(kwargs.values())):
            k = number_kind(x)
            if k is not None:
                kinds.append(k)
        return kinds

    def _input_state(
        self, inputs: list[Tensor], op: TracedOp | None
    ) -> tuple[list[frozenset[str]], list[Origin | None]]:
        """Kinds and provenance of each input; tensors not seen before are checked now."""
        unknown = [t for t in inputs if t not in self._prov]
        kinds_of = dict(zip([id(t) for t in unknown], nonfinite_kinds(unknown), strict=True))
        for t in unknown:
            kinds = kinds_of[id(t)]
            base = t._base
            if not kinds:
                self._prov[t] = None
            elif base is not None and self._prov.get(base) is not None:
                self._prov[t] = self._prov[base]  # a view made outside the traced calls
            else:
                self._prov[t] = self._external(t, kinds, op)
        known = [t for t in inputs if id(t) not in kinds_of and self._prov.get(t) is not None]
        exact = dict(zip([id(t) for t in known], nonfinite_kinds(known), strict=True))
        kinds_list = [kinds_of.get(id(t), exact.get(id(t), frozenset())) for t in inputs]
        return kinds_list, [self._prov.get(t) for t in inputs]

    def _external(self, t: Tensor, kinds: frozenset[str], op: TracedOp | None) -> Origin:
        """Provenance of NaN/Inf in a tensor the tracer did not make (batch, weight, buffer, other)."""
        default = (
            ("untraced", "a tensor computed by code the tracer does not see")
            if t.grad_fn is not None
            else ("tensor", "a tensor made before the step")
        )
        kind, name = self.names.get(t, default)
        origin = input_origin(t, kinds, kind, name, op, self.ops)
        self.origins.append(origin)
        return origin

    def _origin(
        self, op: TracedOp, cause: str, hint: str, produced: frozenset[str], *, intended: bool = False
    ) -> Origin:
        origin = Origin.at_op("forward", op, cause, hint, produced, intended=intended)
        self.origins.append(origin)
        return origin

    def _new_origin(
        self,
        op: TracedOp,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        inputs: list[Tensor],
        out: Tensor,
        new: frozenset[str],
    ) -> Origin:
        try:
            cause, hint = explain_forward(op, args, kwargs, inputs, out, new, self.producer)
        except Exception as exc:  # an explanation must not hide the origin
            self.errors.append(f"explain {op.name}: {type(exc).__name__}: {exc}")
            cause, hint = f"it turned finite inputs into {kinds_text(new)}.", HINT_GENERIC
        return self._origin(op, cause, hint, new)

    # -- provenance queries --------------------------------------------------------------------
    def provenance(self, t: Any) -> Origin | None:
        """The origin of the NaN/Inf in ``t`` (None when ``t`` is finite or was never seen)."""
        return self._prov.get(t) if isinstance(t, Tensor) else None

    def producer(self, t: Any) -> TracedOp | None:
        """The traced operation that made ``t`` (None when it was made outside the step's calls)."""
        return self._producer.get(t) if isinstance(t, Tensor) else None

    def first_real_origin(self) -> Origin | None:
        """The earliest origin that is not an intended mask (None when there is none)."""
        real = [o for o in self.origins if not o.intended]
        return min(real, key=lambda o: o.seq) if real else None
