"""Find the operation that produced the first NaN/Inf of a training step, forward or backward.

A non-finite loss or gradient is a symptom; the cause is one operation that turned finite inputs
into NaN/Inf: ``log`` of an exact zero, a division by zero, ``sqrt`` of a negative, ``exp`` that
overflowed, or, in the backward pass, the derivative of ``sqrt``/``log``/``pow`` at 0. This module
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

This module is pure torch: no Lightning, no logging.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from healthmon.numerics.source_lines import user_frame_location

NAN, POSINF, NEGINF = "NaN", "+inf", "-inf"
MAX_SAMPLES = 10

# ---- names of operations -------------------------------------------------------------------
_OPERATORS = {
    "add": "+",
    "radd": "+",
    "iadd": "+=",
    "sub": "-",
    "rsub": "-",
    "isub": "-=",
    "mul": "*",
    "rmul": "*",
    "imul": "*=",
    "truediv": "/",
    "rtruediv": "/",
    "itruediv": "/=",
    "pow": "**",
    "rpow": "**",
    "ipow": "**=",
    "matmul": "@",
    "rmatmul": "@",
}


def _raw_name(func: Any) -> str:
    return str(getattr(func, "__name__", None) or getattr(func, "name", None) or func)


def base_name(func: Any) -> str:
    """``__rtruediv__`` -> ``rtruediv``, ``log_`` -> ``log``, ``softmax`` -> ``softmax``."""
    name = _raw_name(func)
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return name.removeprefix("linalg_")


_ARITH = {
    "add": "+",
    "sub": "-",
    "rsub": "-",
    "mul": "*",
    "div": "/",
    "true_divide": "/",
    "pow": "**",
    "matmul": "@",
}


def display_name(func: Any) -> str:
    """How a user wrote the call: ```torch.log```, ```F.softmax```, ```/``` (div), ```Tensor.sqrt```."""
    raw = _raw_name(func)
    name = base_name(func)
    qualname = str(getattr(func, "__qualname__", "") or "")
    module = str(getattr(func, "__module__", "") or "")
    if raw.startswith("__") and name in _OPERATORS:
        return f"`{_OPERATORS[name]}` ({name})"
    if raw.startswith("linalg_"):
        return f"`torch.linalg.{raw.removeprefix('linalg_')}`"
    if module.startswith(("torch.nn.functional", "torch._C._nn")):
        return f"`F.{raw}`"
    if qualname.startswith(("TensorBase.", "Tensor.")):
        if name in _ARITH:
            return f"`{_ARITH[name]}` ({name})"
        return f"`Tensor.{raw}`"
    return f"`torch.{raw}`"


def _is_inplace(func: Any) -> bool:
    raw = _raw_name(func)
    return (
        raw == "__setitem__"
        or (raw.startswith("__i") and raw.endswith("__"))
        or (raw.endswith("_") and not raw.endswith("__"))
    )


# ---- values --------------------------------------------------------------------------------
def _floating(x: Any) -> bool:
    return isinstance(x, Tensor) and (x.is_floating_point() or x.is_complex())


def _tensors_in(value: Any, depth: int = 0) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif depth < 3 and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v, depth + 1)


def _numbers_in(value: Any, depth: int = 0) -> Iterator[float]:
    if isinstance(value, float):
        yield value
    elif depth < 2 and isinstance(value, (list, tuple)) and len(value) <= 64:
        for v in value:
            yield from _numbers_in(v, depth + 1)


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


@torch.no_grad()
def _flag_tensor(t: Tensor) -> Tensor:
    """[has NaN, has +inf, has -inf] as a device tensor (no synchronisation)."""
    r = _real(t.detach())
    if r.numel() == 0:
        return torch.zeros(3, dtype=torch.bool, device=r.device)
    return torch.stack([r.isnan().any(), r.isposinf().any(), r.isneginf().any()])


@torch.no_grad()
def _extremes(t: Tensor) -> Tensor:
    """(min, max) in float64 (NaN when the tensor holds one): one fused pass, no synchronisation."""
    r = _real(t.detach())
    if r.numel() == 0:
        return torch.zeros(2, dtype=torch.float64, device=r.device)
    lo, hi = torch.aminmax(r.reshape(-1))
    return torch.stack([lo, hi]).double()


def nonfinite_kinds(tensors: list[Tensor]) -> list[frozenset[str]]:
    """The kinds of non-finite values (NaN, +inf, -inf) each tensor holds.

    One fused min/max pass per tensor and one host synchronisation; the tensors holding NaN (whose
    min/max hide any infinities) get an exact second look.
    """
    if not tensors:
        return []
    ext = torch.stack([_extremes(t).cpu() for t in tensors]).tolist()
    kinds: list[frozenset[str]] = []
    nan_rows = []
    for i, (lo, hi) in enumerate(ext):
        if math.isnan(lo) or math.isnan(hi):
            nan_rows.append(i)
            kinds.append(frozenset({NAN}))
        else:
            kinds.append(frozenset(k for k, f in ((POSINF, hi == math.inf), (NEGINF, lo == -math.inf)) if f))
    if nan_rows:
        flags = torch.stack([_flag_tensor(tensors[i]).cpu() for i in nan_rows]).tolist()
        for i, row in zip(nan_rows, flags, strict=True):
            kinds[i] = frozenset(k for k, f in zip((NAN, POSINF, NEGINF), row, strict=True) if f)
    return kinds


def kinds_text(kinds: frozenset[str]) -> str:
    """``NaN/+inf/-inf`` in a fixed order ("NaN/Inf" when empty)."""
    return "/".join(k for k in (NAN, POSINF, NEGINF) if k in kinds) or "NaN/Inf"


def _number_kind(x: float) -> str | None:
    if math.isnan(x):
        return NAN
    if math.isinf(x):
        return POSINF if x > 0 else NEGINF
    return None


def _g(x: float) -> str:
    return f"{x:.4g}"


# ---- results ---------------------------------------------------------------------------------
@dataclass
class Origin:
    """Where the first NaN/Inf of a step came from.

    Attributes:
        phase: ``"forward"`` (an operation of the forward pass), ``"backward"`` (the derivative of a
            forward operation), ``"input"`` (a tensor that already held NaN/Inf before the step:
            the batch, a weight, a buffer) or ``"constant"`` (an infinite/NaN literal).
        op: the operation as the user wrote it (```torch.log```, ```/```, ```F.softmax```).
        where: the user's source line ``path/file.py:LINE`` (None when there is no such frame).
        module: the module whose forward was running (``"net.0 (Linear)"``), or None.
        cause: what about the inputs produced the NaN/Inf.
        hint: the fix.
        produced: the kinds of non-finite value produced (``{"NaN", "+inf", "-inf"}``).
        source: for ``phase="input"``: what held them (``batch[0]``, ``batch["x"]``, a parameter).
        source_kind: ``"batch"``, ``"parameter"``, ``"buffer"`` or ``"tensor"`` for inputs.
        samples: for a batch tensor: indices along dim 0 that hold NaN/Inf (at most ten).
        bad_samples: how many samples hold NaN/Inf, and ``batch_size`` how many there are.
        intended: an infinity put there on purpose (a mask); never reported while a real origin exists.
        then: what the value became downstream, when that is telling (``-inf`` turning into NaN).
        seq: the order of the operation in the step.
    """

    phase: str
    op: str
    where: str | None
    module: str | None
    cause: str
    hint: str
    produced: frozenset[str] = frozenset()
    source: str | None = None
    source_kind: str | None = None
    samples: list[int] = field(default_factory=list)
    bad_samples: int = 0
    batch_size: int = 0
    intended: bool = False
    then: str | None = None
    seq: int = 0

    def describe(self) -> str:
        """One paragraph for an alert message."""
        produced = kinds_text(self.produced)
        if self.phase == "input":
            return self.cause
        place = f" at {self.where}" if self.where else ""
        inside = f" (in {self.module})" if self.module else ""
        then = f" {self.then}" if self.then else ""
        if self.phase == "backward":
            return (
                f"The forward pass is finite; the first {produced} appears in the backward of "
                f"{self.op}{place}{inside}: {self.cause}{then}"
            )
        return f"The first {produced} of the step is produced by {self.op}{place}{inside}: {self.cause}{then}"


@dataclass
class OriginTrace:
    """What a traced step showed.

    Attributes:
        loss_finite: whether the replayed loss was finite (None when the step returned no loss).
        forward: the origin of the loss's NaN/Inf (or of the first real NaN/Inf when the loss
            carries no provenance), or None when the forward pass was finite.
        backward: the backward origin, when the forward was finite and the backward was not.
        grads_finite: whether the replayed gradients were finite (None when backward was not run).
        ops: operations traced; ``errors``: internal errors of the tracer (it never breaks a step).
    """

    loss_finite: bool | None
    forward: Origin | None
    backward: Origin | None
    grads_finite: bool | None
    ops: int
    errors: list[str]

    @property
    def origin(self) -> Origin | None:
        return self.forward or self.backward


@dataclass
class _Before:
    """What an in-place operation's target held before the operation overwrote it."""

    kinds: frozenset[str]
    prov: Origin | None
    saved: Tensor | None


@dataclass
class _Op:
    """A traced operation: enough to explain its backward later."""

    seq: int
    func: Any
    name: str
    where: str | None
    module: str | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    parents: list[_Op | None]


# ---- the tracer ----------------------------------------------------------------------------
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

#: Operations whose forward is explained from their input values (kept for in-place variants).
_EXPLAINED = frozenset(
    {"log", "log2", "log10", "log1p", "sqrt", "rsqrt", "div", "divide", "true_divide", "truediv", "itruediv"}
    | {"reciprocal", "exp", "exp2", "expm1", "pow", "ipow", "acos", "arccos", "asin", "arcsin", "atanh"}
)

#: Operations whose inputs are kept so their backward can be explained.
_BACKWARD_EXPLAINED = frozenset(
    {
        "sqrt",
        "rsqrt",
        "log",
        "log2",
        "log10",
        "log1p",
        "pow",
        "rpow",
        "float_power",
        "div",
        "divide",
        "true_divide",
        "truediv",
        "rtruediv",
        "reciprocal",
        "norm",
        "vector_norm",
        "dist",
        "cdist",
        "acos",
        "arccos",
        "asin",
        "arcsin",
        "atan2",
        "where",
    }
)


class NonFiniteTracer(TorchFunctionMode):
    """A ``TorchFunctionMode`` that records the provenance of every NaN/Inf; results are untouched.

    Args:
        names: tensors made before the step, by what they are (``{tensor: ("batch", "batch[0]")}``,
            ``("parameter", "net.0.weight")``, ``("buffer", "mask")``); NaN/Inf found in them is
            named after them.
        module_of: a callable returning the module whose forward is running (or None).
    """

    def __init__(
        self,
        names: WeakIdKeyDictionary | None = None,
        module_of: Callable[[], str | None] | None = None,
    ) -> None:
        super().__init__()
        self.names = names if names is not None else WeakIdKeyDictionary()
        self.module_of = module_of or (lambda: None)
        self.ops = 0
        self.errors: list[str] = []
        self.origins: list[Origin] = []
        self.nodes: dict[Any, _Op] = {}
        self._prov: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> Origin | None (finite)
        self._producer: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> _Op

    # -- dispatch ------------------------------------------------------------------------------
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        before: _Before | None = None
        if _is_inplace(func) and args and _floating(args[0]) and _raw_name(func) not in _SKIP_FUNCS:
            try:  # an in-place op overwrites its input: remember what it held
                before = self._before_inplace(func, args[0])
            except Exception as exc:
                if len(self.errors) < 10:
                    self.errors.append(f"{_raw_name(func)}: {type(exc).__name__}: {exc}")
        out = func(*args, **kwargs)
        if _raw_name(func) not in _SKIP_FUNCS:
            try:
                self._observe(func, args, kwargs, out, before)
            except Exception as exc:  # the tracer must never break the user's step
                if len(self.errors) < 10:
                    self.errors.append(f"{_raw_name(func)}: {type(exc).__name__}: {exc}")
        return out

    def _before_inplace(self, func: Any, target: Tensor) -> _Before:
        """The kinds and provenance of an in-place op's target before the op (and its values, if needed)."""
        if target in self._prov:
            prov = self._prov[target]
            kinds = nonfinite_kinds([target])[0] if prov is not None else frozenset()
        else:
            kinds = nonfinite_kinds([target])[0]
            prov = self._external(target, kinds, None) if kinds else None
        saved = target.detach().clone() if base_name(func) in _EXPLAINED else None
        return _Before(kinds, prov, saved)

    def _observe(
        self,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        out: Any,
        before: _Before | None = None,
    ) -> None:
        outputs = [t for t in _tensors_in(out) if _floating(t)]
        if _is_inplace(func) and args and _floating(args[0]) and not any(t is args[0] for t in outputs):
            outputs.append(args[0])
        if not outputs:
            return
        self.ops += 1
        inputs = [t for t in _tensors_in((args, kwargs)) if _floating(t) and not any(t is o for o in outputs)]
        name = base_name(func)
        if before is not None and before.saved is not None:
            args = (before.saved, *args[1:])  # explain with the values the op read
        op = _Op(
            seq=self.ops,
            func=func,
            name=name,
            where=user_frame_location(3),
            module=self.module_of(),
            args=args if name in _BACKWARD_EXPLAINED else (),
            kwargs=kwargs if name in _BACKWARD_EXPLAINED else {},
            parents=[self._producer.get(t) for t in inputs[:4]],
        )
        out_kinds = nonfinite_kinds(outputs)
        for t in outputs:
            self._producer[t] = op
            node = t.grad_fn
            if node is not None and node not in self.nodes:
                self.nodes[node] = op
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
                prov = self._new_origin(op, args, kwargs, inputs, in_kinds, t, new)
            elif NAN in constant:
                prov = self._origin(op, "a NaN literal among its arguments.", HINT_CONSTANT, frozenset({NAN}))
            else:
                intended = [p for p in in_prov if p is not None]
                prov = (
                    min(intended, key=lambda p: p.seq)
                    if intended
                    else self._origin(
                        op,
                        f"an infinite constant among its arguments ({', '.join(sorted(constant))}), e.g. a "
                        f"mask.",
                        HINT_MASK,
                        frozenset(kinds),
                        intended=True,
                    )
                )
            self._prov[t] = prov

    def _constant_kinds(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
        kinds = []
        for x in _numbers_in(list(args) + list(kwargs.values())):
            k = _number_kind(x)
            if k is not None:
                kinds.append(k)
        return kinds

    def _input_state(
        self, inputs: list[Tensor], op: _Op | None
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

    def _external(self, t: Tensor, kinds: frozenset[str], op: _Op | None) -> Origin:
        """Provenance of NaN/Inf in a tensor the tracer did not make (batch, weight, buffer, other)."""
        default = (
            ("untraced", "a tensor computed by code the tracer does not see")
            if t.grad_fn is not None
            else ("tensor", "a tensor made before the step")
        )
        kind, name = self.names.get(t, default)
        used = ""
        if op is not None:
            inside = f" in {op.module}" if op.module else ""
            used = f" It first enters the computation at {display_name(op.func)}{inside} at {op.where}."
        intended = NAN not in kinds and (kind != "batch" or kinds == {NEGINF})
        what = kinds_text(kinds)
        samples: list[int] = []
        bad = size = 0
        if kind == "batch":
            with torch.no_grad():
                rows = ~torch.isfinite(_real(t.detach()))
                rows = rows.reshape(rows.shape[0], -1).any(1) if rows.dim() > 0 else rows.reshape(1)
                idx = rows.nonzero().flatten()
                bad, size = int(idx.numel()), int(rows.numel())
                samples = idx[:MAX_SAMPLES].tolist()
            shown = ", ".join(map(str, samples)) + (" ..." if bad > len(samples) else "")
            cause = (
                f"The batch holds {what}: {name} has {what} in {bad} of its {size} samples "
                f"(indices {shown}).{used}"
            )
            hint = HINT_BATCH
        elif kind == "parameter":
            cause = (
                f"The weight {name} already holds {what} before the step (an earlier update "
                f"corrupted it).{used}"
            )
            hint = HINT_WEIGHTS
        elif kind == "buffer":
            cause = (
                f"The buffer {name} holds {what} (e.g. BatchNorm running statistics that absorbed NaN).{used}"
            )
            hint = HINT_WEIGHTS
        elif kind == "untraced":
            cause = (
                f"{what} comes from {name} (a custom autograd Function, a C++/Triton extension or a "
                f"compiled region).{used}"
            )
            hint = HINT_GENERIC
        else:
            cause = f"A tensor made before the step (a captured constant or attribute) holds {what}.{used}"
            hint = HINT_MASK if intended else HINT_WEIGHTS
        origin = Origin(
            phase="input",
            op="",
            where=None,
            module=None,
            cause=cause,
            hint=hint,
            produced=kinds,
            source=name,
            source_kind=kind,
            samples=samples,
            bad_samples=bad,
            batch_size=size,
            intended=intended,
            seq=self.ops,
        )
        self.origins.append(origin)
        return origin

    def _origin(
        self, op: _Op, cause: str, hint: str, produced: frozenset[str], *, intended: bool = False
    ) -> Origin:
        origin = Origin(
            phase="forward",
            op=display_name(op.func),
            where=op.where,
            module=op.module,
            cause=cause,
            hint=hint,
            produced=produced,
            intended=intended,
            seq=op.seq,
        )
        self.origins.append(origin)
        return origin

    def _new_origin(
        self,
        op: _Op,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        inputs: list[Tensor],
        in_kinds: list[frozenset[str]],
        out: Tensor,
        new: frozenset[str],
    ) -> Origin:
        try:
            cause, hint = explain_forward(op, args, kwargs, inputs, in_kinds, out, new, self)
        except Exception as exc:  # an explanation must not hide the origin
            self.errors.append(f"explain {op.name}: {type(exc).__name__}: {exc}")
            cause, hint = f"it turned finite inputs into {kinds_text(new)}.", HINT_GENERIC
        return self._origin(op, cause, hint, new)

    # -- provenance queries --------------------------------------------------------------------
    def provenance(self, t: Any) -> Origin | None:
        """The origin of the NaN/Inf in ``t`` (None when ``t`` is finite or was never seen)."""
        return self._prov.get(t) if isinstance(t, Tensor) else None

    def producer(self, t: Any) -> _Op | None:
        return self._producer.get(t) if isinstance(t, Tensor) else None

    def first_real_origin(self) -> Origin | None:
        real = [o for o in self.origins if not o.intended]
        return min(real, key=lambda o: o.seq) if real else None


def _came_from(op: _Op | None, names: set[str], depth: int = 0) -> _Op | None:
    """The nearest producer among ``names``, following single-input elementwise steps back."""
    if op is None or depth > 6:
        return None
    if op.name in names:
        return op
    if op.name in _PASS_THROUGH:
        for parent in op.parents:
            found = _came_from(parent, names, depth + 1)
            if found is not None:
                return found
    return None


_PASS_THROUGH = frozenset(
    {
        "rsub",
        "sub",
        "add",
        "radd",
        "mul",
        "rmul",
        "clone",
        "contiguous",
        "to",
        "float",
        "double",
        "half",
        "view",
        "reshape",
        "squeeze",
        "unsqueeze",
        "flatten",
        "getitem",
        "gather",
        "index_select",
        "transpose",
        "permute",
        "expand",
        "expand_as",
        "neg",
        "abs",
        "clamp",
    }
)
_PROB_OPS = {"softmax", "sigmoid", "expit", "exp"}
_SPREAD_OPS = {"std", "var", "std_mean", "var_mean", "norm", "vector_norm", "sqrt"}

HINT_GENERIC = (
    "Guard the inputs of this operation (clamp to its domain, add an epsilon) or use a stable form."
)
HINT_CONSTANT = "Remove the NaN literal (a placeholder or a debugging leftover)."
HINT_MASK = (
    "An infinite mask is fine as long as every row keeps at least one finite entry; nothing to change "
    "unless it reached the loss."
)
HINT_BATCH = (
    "Fix the data: find these samples in the dataset (the crash record has the batch index), drop or "
    "repair them (torch.nan_to_num, imputation), or check the transform that produced them."
)
HINT_WEIGHTS = (
    "See the alert of the step that corrupted them (update.nonfinite); restart from the last finite "
    "checkpoint."
)


def _finfo(t: Tensor) -> torch.finfo:
    dtype = t.dtype if t.is_floating_point() else torch.float32
    return torch.finfo(dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@torch.no_grad()
def _count(mask: Tensor) -> int:
    return int(mask.sum())


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(name)


def _largest_finite(inputs: list[Tensor]) -> float | None:
    vals = []
    with torch.no_grad():
        for t in inputs:
            r = _real(t.detach()).float()
            r = r[torch.isfinite(r)]
            if r.numel():
                vals.append(float(r.abs().max()))
    return max(vals) if vals else None


def _zeros_note(x: Tensor, tracer: NonFiniteTracer) -> str:
    src = _came_from(tracer.producer(x), _PROB_OPS)
    if src is None:
        return ""
    fn = {"softmax": "softmax", "sigmoid": "sigmoid", "expit": "sigmoid", "exp": "exp"}[src.name]
    direct = tracer.producer(x) is src
    if direct:
        return f" Its input comes from {fn} at {src.where}, which underflowed to exactly 0."
    return (
        f" Its input is computed from {fn} at {src.where}, which saturated: e.g. 1 - p is exactly 0 "
        "where p rounded to 1.0."
    )


@torch.no_grad()
def explain_forward(
    op: _Op,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    inputs: list[Tensor],
    in_kinds: list[frozenset[str]],
    out: Tensor,
    new: frozenset[str],
    tracer: NonFiniteTracer,
) -> tuple[str, str]:
    """What about the inputs of ``op`` produced the non-finite ``new`` kinds in ``out``, and the fix."""
    name = op.name
    produced = kinds_text(new)
    x = _arg(args, kwargs, 0, "input")
    finfo = _finfo(out)
    dt = _dtype_name(out.dtype)
    if name in ("log", "log2", "log10") and isinstance(x, Tensor):
        zeros, neg = _count(x == 0), _count(x < 0)
        parts = []
        if zeros:
            parts.append(f"log of {zeros} exact zero(s) gives -inf.")
        if neg:
            parts.append(f"log of {neg} negative value(s) (min {_g(float(x.min()))}) gives NaN.")
        note = _zeros_note(x, tracer) if zeros else ""
        src = _came_from(tracer.producer(x), _PROB_OPS)
        if src is not None and src.name == "softmax":
            hint = (
                "Use F.log_softmax(z, dim=...) instead of torch.log(F.softmax(z, dim=...)) (or "
                "F.cross_entropy on z)."
            )
        elif src is not None and src.name in ("sigmoid", "expit"):
            hint = (
                "Use F.logsigmoid(z) for log(sigmoid(z)) and F.logsigmoid(-z) for log(1 - sigmoid(z)), "
                "or F.binary_cross_entropy_with_logits(z, y)."
            )
        else:
            hint = (
                "Keep the argument of log positive: torch.log(x.clamp_min(eps)) or torch.log(x + "
                "eps), or work in log space."
            )
        return " ".join(parts) + note, hint
    if name == "log1p" and isinstance(x, Tensor):
        return (
            f"log1p of {_count(x <= -1)} value(s) <= -1 (min {_g(float(x.min()))}).",
            "Keep the argument of log1p above -1 (clamp it).",
        )
    if name in ("sqrt", "rsqrt") and isinstance(x, Tensor):
        neg = _count(x < 0)
        if neg:
            note = ""
            if _came_from(tracer.producer(x), {"sub", "rsub"}) is not None:
                note = (
                    " Its input is a difference (a variance written as E[x^2] - E[x]^2?) that rounding "
                    "made slightly negative."
                )
            return (
                f"sqrt of {neg} negative value(s) (min {_g(float(x.min()))}) gives NaN.{note}",
                "Clamp before the root: torch.sqrt(v.clamp_min(0) + eps), or compute the variance with "
                "x.var(dim) / x.std(dim), which is never negative.",
            )
        return (
            f"rsqrt of {_count(x == 0)} exact zero(s) gives +inf.",
            "Add an epsilon: torch.rsqrt(v + eps).",
        )
    if name in (
        "div",
        "divide",
        "true_divide",
        "truediv",
        "itruediv",
        "rtruediv",
        "reciprocal",
        "floor_divide",
    ):
        if name == "rtruediv":
            num, den = _arg(args, kwargs, 1, "other"), x
        elif name == "reciprocal":
            num, den = 1.0, x
        else:
            num, den = x, _arg(args, kwargs, 1, "other")
        if isinstance(den, (int, float)) and den == 0:
            return (
                "division by the constant 0.",
                "Divide by a non-zero value (a count clamped to 1, or + eps).",
            )
        if isinstance(den, Tensor):
            zero = den == 0
            n_zero = _count(zero)
            if n_zero:
                both = 0
                if isinstance(num, Tensor):
                    both = _count(zero & (num == 0))
                elif isinstance(num, (int, float)) and num == 0:
                    both = n_zero
                detail = f" ({both} of them 0/0 = NaN)" if both else ""
                note = ""
                src = _came_from(tracer.producer(den), _SPREAD_OPS)
                if src is not None and src.name in ("std", "var", "std_mean", "var_mean"):
                    note = (
                        f" The denominator comes from {src.name} at {src.where}: a feature that is constant "
                        "across the batch has a spread of exactly 0."
                    )
                elif src is not None and src.name == "sqrt":
                    note = (
                        f" The denominator comes from sqrt at {src.where}, which is 0 there (a variance or "
                        "a squared norm that is exactly 0)."
                    )
                elif src is not None:
                    note = f" The denominator comes from {src.name} at {src.where}: a zero vector has norm 0."
                elif _came_from(tracer.producer(den), {"sum", "count_nonzero"}) is not None:
                    note = " The denominator is a count or a sum that is 0 in this batch (no positives?)."
                return (
                    f"division by exact zero: {n_zero} denominator "
                    f"entr{'y is' if n_zero == 1 else 'ies are'} 0{detail}.{note}",
                    "Guard the denominator: x / (d + eps) or x / d.clamp_min(eps); for a count, "
                    "count.clamp_min(1); or torch.where(d > 0, x / d.clamp_min(eps), 0).",
                )
            tiny = float(den.detach().abs().min()) if den.numel() else 0.0
            return (
                f"the quotient exceeds the {dt} maximum {_g(finfo.max)} (smallest |denominator| {_g(tiny)}).",
                "Add an epsilon to the denominator or compute in float32.",
            )
    if name in ("exp", "exp2", "expm1", "cosh", "sinh") and isinstance(x, Tensor):
        top = float(x.detach().max())
        limit = math.log(finfo.max) if name != "exp2" else math.log2(finfo.max)
        return (
            f"{name} overflows to +inf: the largest input is {_g(top)}, and {name}(x) exceeds the {dt} "
            f"maximum {_g(finfo.max)} above x = {limit:.2f}.",
            "For a softmax or a log-sum-exp, subtract the max first (x - x.amax(dim, keepdim=True)) or "
            "use torch.softmax / F.log_softmax / torch.logsumexp; for a scale such as exp(logvar), "
            "clamp the input (logvar.clamp(max=20)) or use F.softplus.",
        )
    if name in ("scaled_dot_product_attention", "multi_head_attention_forward") and NAN in new:
        return (
            "a query whose keys are all masked (a fully masked row: every position of a sequence is "
            "padding, or the attention mask hides every key): its softmax is 0/0 = NaN.",
            "Make sure every query keeps at least one visible key (drop all-padding sequences, or unmask "
            "one position and zero the outputs of empty rows).",
        )
    if name in ("layer_norm", "group_norm", "instance_norm", "batch_norm", "rms_norm") and NAN in new:
        eps = kwargs.get("eps", args[4] if name == "layer_norm" and len(args) > 4 else None)
        shown = f" with eps={eps!r}" if eps is not None else ""
        return (
            f"normalising values whose variance is exactly 0{shown}: (x - mean) / sqrt(var + eps) is 0/0.",
            "Keep a positive eps (the default 1e-5), or drop constant inputs.",
        )
    if name in ("softmax", "log_softmax", "logsumexp") and NAN in new:
        return (
            "a row whose entries are all -inf (a fully masked row, e.g. a padding-only sequence): "
            "its softmax is 0/0 = NaN.",
            "Make sure every row keeps at least one unmasked position, or fill masks with "
            "torch.finfo(dtype).min instead of -inf and zero the outputs of empty rows.",
        )
    if name in ("sub", "rsub", "add", "radd", "isub", "iadd") and NAN in new:
        return (
            "inf - inf = NaN: infinities of the same sign are subtracted (e.g. a fully masked row minus "
            "its max).",
            "Keep at least one finite entry per row, or use torch.finfo(dtype).min instead of -inf.",
        )
    if name in ("mul", "rmul", "imul") and NAN in new:
        return (
            "0 * inf = NaN: an infinite factor meets an exact zero.",
            "Remove the infinity before multiplying (torch.where / masked_fill with a finite value).",
        )
    if name in ("pow", "ipow", "rpow", "float_power") and isinstance(x, Tensor):
        e = _arg(args, kwargs, 1, "exponent")
        if NAN in new:
            return (
                f"a negative base ({_count(x < 0)} entries, min {_g(float(x.min()))}) raised to a "
                f"non-integer power {e!r} gives NaN.",
                "Raise only non-negative values to fractional powers: x.clamp_min(0) ** p or x.abs() ** p.",
            )
        if isinstance(e, (int, float)) and e < 0 and _count(x == 0):
            return (
                f"0 raised to the negative power {e!r} gives +inf ({_count(x == 0)} zeros).",
                "Add an epsilon to the base: (x + eps) ** p.",
            )
    if name in ("std", "var", "std_mean", "var_mean") and NAN in new:
        return (
            "the unbiased estimator of a single value divides by N - 1 = 0.",
            "Use correction=0 (unbiased=False), or reduce over more than one element.",
        )
    if name in ("mean", "nanmean", "cross_entropy", "nll_loss") and NAN in new and isinstance(x, Tensor):
        if x.numel() == 0:
            return (
                "the mean of an empty tensor (a mask that selected nothing) is 0/0 = NaN.",
                "Guard the mean: x.sum() / mask.sum().clamp_min(1), or skip the term when nothing is "
                "selected.",
            )
        target = _arg(args, kwargs, 1, "target")
        ignore = kwargs.get("ignore_index", args[4] if len(args) > 4 else -100)
        if (
            name in ("cross_entropy", "nll_loss")
            and isinstance(target, Tensor)
            and not target.is_floating_point()
            and bool((target == ignore).all())
        ):
            return (
                "every target equals ignore_index: the mean over 0 elements is 0/0 = NaN.",
                "Skip batches without a valid target, or use reduction='sum' divided by the count clamped "
                "to 1.",
            )
    if name in ("acos", "arccos", "asin", "arcsin", "atanh", "arctanh") and isinstance(x, Tensor):
        top = float(x.detach().abs().max())
        return (
            f"{name} of {_count(x.abs() > 1) or _count(x.abs() >= 1)} value(s) outside its domain "
            f"(max |x| = {top!r}; rounding pushed a cosine past 1?).",
            "Clamp into the domain: x.clamp(-1 + 1e-7, 1 - 1e-7).",
        )
    if name in ("to", "half", "bfloat16", "type") and (POSINF in new or NEGINF in new):
        top = _largest_finite(inputs)
        return (
            f"casting to {dt} overflows: values up to {_g(top or float('nan'))} exceed the {dt} maximum "
            f"{_g(finfo.max)}.",
            _overflow_hint(out.dtype),
        )
    if POSINF in new or NEGINF in new:
        top = _largest_finite(inputs)
        shown = f" (largest input magnitude {_g(top)})" if top is not None else ""
        return (
            f"the result exceeds the {dt} maximum {_g(finfo.max)}{shown}: overflow.",
            _overflow_hint(out.dtype),
        )
    return (f"it turned finite inputs into {produced}.", HINT_GENERIC)


def _overflow_hint(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return (
            "float16 overflows above 65504: use bf16 (precision='bf16-mixed'), loss scaling "
            "(precision='16-mixed'), or keep this operation in float32; normalise the activations."
        )
    return (
        "Check the scale of the inputs (normalisation, initialisation, learning rate) "
        "or compute in a wider dtype."
    )


# ---- backward -------------------------------------------------------------------------------
@torch.no_grad()
def explain_backward(op: _Op, grad_out: list[Tensor | None], grad_in: list[Tensor | None]) -> tuple[str, str]:
    """Why the derivative of ``op`` produced NaN/Inf from a finite incoming gradient, and the fix."""
    name = op.name
    args, kwargs = op.args, op.kwargs
    x = _arg(args, kwargs, 0, "input")
    masked = ""
    g = next((t for t in grad_out if isinstance(t, Tensor)), None)
    if g is not None and isinstance(x, Tensor) and g.shape == x.shape:
        bad = next((t for t in grad_in if isinstance(t, Tensor) and t.shape == g.shape), None)
        if bad is not None:
            with torch.no_grad():
                where_bad = ~torch.isfinite(bad)
                if bool(where_bad.any()) and bool((g[where_bad] == 0).all()):
                    masked = (
                        " The incoming gradient there is 0 (those entries were discarded by torch.where or "
                        "a mask), but 0 * inf = NaN: a where does not stop NaN in the branch it discards."
                    )
    safe_where = (
        "Make the discarded branch safe too (the safe-where pattern): "
        "torch.where(h > 0, torch.sqrt(torch.where(h > 0, h, 1.0)), 0.0)"
    )
    if name in ("sqrt", "rsqrt") and isinstance(x, Tensor):
        zeros, neg = _count(x == 0), _count(x < 0)
        parts = []
        if zeros:
            parts.append(
                f"the derivative of sqrt, 1/(2 sqrt(x)), is infinite at the {zeros} entries where x is "
                f"exactly 0"
            )
        if neg:
            parts.append(f"sqrt of {neg} negative entries is NaN (its derivative too)")
        cause = " and ".join(parts) + "." + masked
        hint = (
            f"{safe_where}, or clamp inside the root: torch.sqrt(h.clamp_min(1e-12))."
            if masked
            else "Add an epsilon inside the root (torch.sqrt(d2 + 1e-12)) or clamp (d2.clamp_min(1e-12)); "
            "for a norm or a distance use torch.linalg.vector_norm(h - c, dim=-1), whose gradient at 0 is 0."
        )
        return cause, hint
    if name in ("log", "log2", "log10") and isinstance(x, Tensor):
        return (
            f"the derivative of log, 1/x, is infinite at the {_count(x == 0)} exact zero(s) of its input "
            f"({_count(x < 0)} negative).{masked}",
            "Keep the argument of log positive (x.clamp_min(eps)); inside torch.where make the discarded "
            "branch safe: torch.log(torch.where(m, x, 1.0)).",
        )
    if name in ("pow", "rpow", "float_power") and isinstance(x, Tensor):
        e = _arg(args, kwargs, 1, "exponent")
        return (
            f"the derivative of x ** {e!r}, {e!r} * x ** ({e!r} - 1), is infinite at the {_count(x == 0)} "
            f"exact zero(s) of x.{masked}",
            "Add an epsilon to the base ((x + eps) ** p) or clamp it away from 0.",
        )
    if name in ("div", "divide", "true_divide", "truediv", "rtruediv", "reciprocal"):
        den = x if name in ("rtruediv", "reciprocal") else _arg(args, kwargs, 1, "other")
        zeros = _count(den == 0) if isinstance(den, Tensor) else 0
        return (
            f"the derivative of a / b, -a / b^2, is infinite where the denominator is 0 ({zeros} "
            f"entries).{masked}",
            "Guard the denominator: d + eps or d.clamp_min(eps), also inside the branch torch.where "
            "discards.",
        )
    if name in ("norm", "vector_norm", "dist", "cdist"):
        return (
            f"the derivative of a norm, x / ||x||, is 0/0 = NaN for a zero vector (a distance between "
            f"identical points).{masked}",
            "Use torch.linalg.vector_norm (its gradient at 0 is 0) or add an epsilon: sqrt(sum(x^2) + "
            "1e-12).",
        )
    if name in ("acos", "arccos", "asin", "arcsin") and isinstance(x, Tensor):
        return (
            f"the derivative of {name}, 1/sqrt(1 - x^2), is infinite at |x| = 1 ({_count(x.abs() >= 1)} "
            f"entries).",
            "Clamp into the open interval: x.clamp(-1 + 1e-7, 1 - 1e-7).",
        )
    bad = [t for t in grad_in if isinstance(t, Tensor) and t.is_floating_point()]
    kinds = frozenset().union(*nonfinite_kinds(bad)) if bad else frozenset()
    if kinds and NAN not in kinds and not masked:
        top = _largest_finite([t for t in grad_out if isinstance(t, Tensor)])
        dt = _dtype_name(bad[0].dtype)
        return (
            f"the gradient overflows the {dt} maximum {_g(torch.finfo(bad[0].dtype).max)} in the backward "
            f"of this operation (largest incoming gradient {_g(top or 0.0)}): exploding gradients.",
            "Lower the learning rate, clip gradients (Trainer(gradient_clip_val=1.0)), normalise the "
            "activations; in float16 use loss scaling or bf16.",
        )
    return (
        f"its derivative is not finite at the values it received.{masked}",
        "Keep the inputs of this operation inside the region where its derivative is finite (add an "
        "epsilon, clamp).",
    )


class BackwardWatch:
    """Hooks on the autograd nodes of a traced step: the first node that made a finite gradient NaN/Inf.

    Nodes recorded by the tracer are named after their operation; the nodes inside a composite
    operation (the log-softmax inside ``cross_entropy``) belong to the nearest recorded node above
    them in the graph.
    """

    def __init__(self, root: Any, nodes: dict[Any, _Op], errors: list[str]) -> None:
        self.origin: Origin | None = None
        self.leaves: list[Tensor] = []
        self.errors = errors
        self._handles: list[Any] = []
        owner: dict[Any, _Op | None] = {root: nodes.get(root)}
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

    def _hook(self, op: _Op | None) -> Callable[..., None]:
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
                self.origin = Origin(
                    phase="backward",
                    op=display_name(op.func),
                    where=op.where,
                    module=op.module,
                    cause=cause,
                    hint=hint,
                    produced=produced,
                    seq=op.seq,
                )
            except Exception as exc:
                self.errors.append(f"backward hook: {type(exc).__name__}: {exc}")

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# ---- module stack -----------------------------------------------------------------------------
class ModuleStack:
    """Forward pre/post hooks that track which module's forward is running (innermost)."""

    def __init__(self, module: torch.nn.Module | None) -> None:
        self.stack: list[str] = []
        self._handles: list[Any] = []
        if module is None:
            return
        for name, m in module.named_modules():
            label = f"{name} ({type(m).__name__})" if name else f"{type(m).__name__}.forward"
            self._handles.append(m.register_forward_pre_hook(self._push(label)))
            self._handles.append(m.register_forward_hook(self._pop, always_call=True))

    def _push(self, label: str) -> Callable[..., None]:
        def hook(module: Any, args: Any) -> None:
            self.stack.append(label)

        return hook

    def _pop(self, module: Any, args: Any, output: Any) -> None:
        if self.stack:
            self.stack.pop()

    def current(self) -> str | None:
        return self.stack[-1] if self.stack else None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def batch_names(batch: Any, prefix: str = "batch", depth: int = 0) -> Iterator[tuple[Tensor, str]]:
    """Every tensor inside a batch with its path: ``batch[0]``, ``batch["x"]``, ``batch.x``."""
    if isinstance(batch, Tensor):
        yield batch, prefix
    elif depth > 4:
        return
    elif isinstance(batch, dict):
        for k, v in batch.items():
            yield from batch_names(v, f"{prefix}[{k!r}]", depth + 1)
    elif isinstance(batch, (list, tuple)):
        fields = getattr(batch, "_fields", None)
        for i, v in enumerate(batch):
            yield from batch_names(v, f"{prefix}.{fields[i]}" if fields else f"{prefix}[{i}]", depth + 1)
    elif hasattr(batch, "__dataclass_fields__"):
        for k in batch.__dataclass_fields__:
            yield from batch_names(getattr(batch, k, None), f"{prefix}.{k}", depth + 1)


def trace_nonfinite(
    step: Callable[[], Any],
    *,
    module: torch.nn.Module | None = None,
    batch: Any = None,
    backward: bool = True,
) -> OriginTrace:
    """Run ``step`` (a forward pass returning the loss) under the tracer, then its backward if needed.

    Args:
        step: the replayed step; returns the loss tensor (or None).
        module: the model, to name modules, parameters and buffers.
        batch: the batch the step reads, to name its tensors.
        backward: run ``torch.autograd.grad`` of a finite loss under node hooks (the gradients are
            returned by autograd, never written into ``.grad``).

    Returns:
        an :class:`OriginTrace`; a step that raises is traced up to the exception.
    """
    names: WeakIdKeyDictionary = WeakIdKeyDictionary()
    if module is not None:
        for n, b in module.named_buffers():
            names[b] = ("buffer", n)
        for n, p in module.named_parameters():
            names[p] = ("parameter", n)
    for t, path in batch_names(batch):
        names[t] = ("batch", path)
    modules = ModuleStack(module)
    tracer = NonFiniteTracer(names, modules.current)
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
