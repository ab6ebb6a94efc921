"""Why an operation of the forward pass turned finite inputs into NaN/Inf, and the fix.

Read from the values the operation received: zeros under a log (and the softmax or sigmoid that
underflowed to make them), the largest input of an overflowing ``exp``, a constant feature under
``/ std``, a fully masked row, a value beyond the dtype's maximum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from healthmon.numerics.nonfinite.hints import HINT_GENERIC, overflow_hint
from healthmon.numerics.nonfinite.operations import TracedOp, argument
from healthmon.numerics.nonfinite.producers import Producer, came_from
from healthmon.numerics.nonfinite.values import (
    NAN,
    NEGINF,
    POSINF,
    count_true,
    finfo_of,
    kinds_text,
    largest_finite,
    number_text,
)
from healthmon.numerics.precision import dtype_name

#: Operations whose forward is explained from their input values (kept for in-place variants).
FORWARD_EXPLAINED = frozenset(
    {"log", "log2", "log10", "log1p", "sqrt", "rsqrt", "div", "divide", "true_divide", "truediv", "itruediv"}
    | {"reciprocal", "exp", "exp2", "expm1", "pow", "ipow", "acos", "arccos", "asin", "arcsin", "atanh"}
)


_PROB_OPS = {"softmax", "sigmoid", "expit", "exp"}
_SPREAD_OPS = {"std", "var", "std_mean", "var_mean", "norm", "vector_norm", "sqrt"}


def _zeros_note(x: Tensor, producer: Producer) -> str:
    """Where exact zeros under a log came from: a softmax/sigmoid/exp that underflowed or saturated."""
    src = came_from(producer(x), _PROB_OPS)
    if src is None:
        return ""
    fn = {"softmax": "softmax", "sigmoid": "sigmoid", "expit": "sigmoid", "exp": "exp"}[src.name]
    direct = producer(x) is src
    if direct:
        return f" Its input comes from {fn} at {src.where}, which underflowed to exactly 0."
    return (
        f" Its input is computed from {fn} at {src.where}, which saturated: e.g. 1 - p is exactly 0 "
        "where p rounded to 1.0."
    )


def _denominator_note(den: Tensor, producer: Producer) -> str:
    """Where a zero denominator came from: a std of a constant feature, a zero norm, an empty count."""
    note = ""
    src = came_from(producer(den), _SPREAD_OPS)
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
    elif came_from(producer(den), {"sum", "count_nonzero"}) is not None:
        note = " The denominator is a count or a sum that is 0 in this batch (no positives?)."
    return note


Cause = tuple[str, str]


@dataclass
class _Call:
    """A traced call whose output holds new NaN/Inf, as the explanations read it."""

    op: TracedOp
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inputs: list[Tensor]
    out: Tensor
    new: frozenset[str]
    producer: Producer

    @property
    def name(self) -> str:
        return self.op.name

    @property
    def x(self) -> Any:
        """The first argument (``input``)."""
        return argument(self.args, self.kwargs, 0, "input")

    @property
    def finfo(self) -> torch.finfo:
        return finfo_of(self.out)

    @property
    def dt(self) -> str:
        return dtype_name(self.out.dtype)


def _log(c: _Call) -> Cause | None:
    """Find a log of exact zeros (from a softmax/sigmoid that underflowed?) or of negatives."""
    name, x, producer = c.name, c.x, c.producer
    if name in ("log", "log2", "log10") and isinstance(x, Tensor):
        zeros, neg = count_true(x == 0), count_true(x < 0)
        parts = []
        if zeros:
            parts.append(f"log of {zeros} exact zero(s) gives -inf.")
        if neg:
            parts.append(f"log of {neg} negative value(s) (min {number_text(float(x.min()))}) gives NaN.")
        note = _zeros_note(x, producer) if zeros else ""
        src = came_from(producer(x), _PROB_OPS)
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
    return None


def _log1p(c: _Call) -> Cause | None:
    """log1p of values at or below -1."""
    name, x = c.name, c.x
    if name == "log1p" and isinstance(x, Tensor):
        return (
            f"log1p of {count_true(x <= -1)} value(s) <= -1 (min {number_text(float(x.min()))}).",
            "Keep the argument of log1p above -1 (clamp it).",
        )
    return None


def _root(c: _Call) -> Cause | None:
    """Find a sqrt of negatives (a variance by subtraction?) or an rsqrt of zeros."""
    name, x, producer = c.name, c.x, c.producer
    if name in ("sqrt", "rsqrt") and isinstance(x, Tensor):
        neg = count_true(x < 0)
        if neg:
            note = ""
            if came_from(producer(x), {"sub", "rsub"}) is not None:
                note = (
                    " Its input is a difference (a variance written as E[x^2] - E[x]^2?) that rounding "
                    "made slightly negative."
                )
            return (
                f"sqrt of {neg} negative value(s) (min {number_text(float(x.min()))}) gives NaN.{note}",
                "Clamp before the root: torch.sqrt(v.clamp_min(0) + eps), or compute the variance with "
                "x.var(dim) / x.std(dim), which is never negative.",
            )
        return (
            f"rsqrt of {count_true(x == 0)} exact zero(s) gives +inf.",
            "Add an epsilon: torch.rsqrt(v + eps).",
        )
    return None


def _division(c: _Call) -> Cause | None:
    """Division by zero (from a std of a constant feature, a zero norm, an empty count) or overflow."""
    name, x, args, kwargs, producer, finfo, dt = c.name, c.x, c.args, c.kwargs, c.producer, c.finfo, c.dt
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
            num, den = argument(args, kwargs, 1, "other"), x
        elif name == "reciprocal":
            num, den = 1.0, x
        else:
            num, den = x, argument(args, kwargs, 1, "other")
        if isinstance(den, (int, float)) and den == 0:
            return (
                "division by the constant 0.",
                "Divide by a non-zero value (a count clamped to 1, or + eps).",
            )
        if isinstance(den, Tensor):
            zero = den == 0
            n_zero = count_true(zero)
            if n_zero:
                both = 0
                if isinstance(num, Tensor):
                    both = count_true(zero & (num == 0))
                elif isinstance(num, (int, float)) and num == 0:
                    both = n_zero
                detail = f" ({both} of them 0/0 = NaN)" if both else ""
                note = _denominator_note(den, producer)
                return (
                    f"division by exact zero: {n_zero} denominator "
                    f"entr{'y is' if n_zero == 1 else 'ies are'} 0{detail}.{note}",
                    "Guard the denominator: x / (d + eps) or x / d.clamp_min(eps); for a count, "
                    "count.clamp_min(1); or torch.where(d > 0, x / d.clamp_min(eps), 0).",
                )
            tiny = float(den.detach().abs().min()) if den.numel() else 0.0
            return (
                f"the quotient exceeds the {dt} maximum {number_text(finfo.max)} "
                f"(smallest |denominator| {number_text(tiny)}).",
                "Add an epsilon to the denominator or compute in float32.",
            )
    return None


def _exp_overflow(c: _Call) -> Cause | None:
    """Find an exp overflow: the largest input against the limit of the dtype."""
    name, x, finfo, dt = c.name, c.x, c.finfo, c.dt
    if name in ("exp", "exp2", "expm1", "cosh", "sinh") and isinstance(x, Tensor):
        top = float(x.detach().max())
        limit = math.log(finfo.max) if name != "exp2" else math.log2(finfo.max)
        return (
            f"{name} overflows to +inf: the largest input is {number_text(top)}, and {name}(x) exceeds "
            f"the {dt} maximum {number_text(finfo.max)} above x = {limit:.2f}.",
            "For a softmax or a log-sum-exp, subtract the max first (x - x.amax(dim, keepdim=True)) or "
            "use torch.softmax / F.log_softmax / torch.logsumexp; for a scale such as exp(logvar), "
            "clamp the input (logvar.clamp(max=20)) or use F.softplus.",
        )
    return None


def _masked_attention(c: _Call) -> Cause | None:
    """Attention with a query whose keys are all masked."""
    name, new = c.name, c.new
    if name in ("scaled_dot_product_attention", "multi_head_attention_forward") and NAN in new:
        return (
            "a query whose keys are all masked (a fully masked row: every position of a sequence is "
            "padding, or the attention mask hides every key): its softmax is 0/0 = NaN.",
            "Make sure every query keeps at least one visible key (drop all-padding sequences, or unmask "
            "one position and zero the outputs of empty rows).",
        )
    return None


def _normalisation(c: _Call) -> Cause | None:
    """A normalisation layer over a constant input without eps."""
    name, args, kwargs, new = c.name, c.args, c.kwargs, c.new
    if name in ("layer_norm", "group_norm", "instance_norm", "batch_norm", "rms_norm") and NAN in new:
        eps = kwargs.get("eps", args[4] if name == "layer_norm" and len(args) > 4 else None)
        shown = f" with eps={eps!r}" if eps is not None else ""
        return (
            f"normalising values whose variance is exactly 0{shown}: (x - mean) / sqrt(var + eps) is 0/0.",
            "Keep a positive eps (the default 1e-5), or drop constant inputs.",
        )
    return None


def _masked_softmax(c: _Call) -> Cause | None:
    """A softmax over a row that is entirely -inf."""
    name, new = c.name, c.new
    if name in ("softmax", "log_softmax", "logsumexp") and NAN in new:
        return (
            "a row whose entries are all -inf (a fully masked row, e.g. a padding-only sequence): "
            "its softmax is 0/0 = NaN.",
            "Make sure every row keeps at least one unmasked position, or fill masks with "
            "torch.finfo(dtype).min instead of -inf and zero the outputs of empty rows.",
        )
    return None


def _inf_minus_inf(c: _Call) -> Cause | None:
    """Find an inf - inf."""
    name, new = c.name, c.new
    if name in ("sub", "rsub", "add", "radd", "isub", "iadd") and NAN in new:
        return (
            "inf - inf = NaN: infinities of the same sign are subtracted (e.g. a fully masked row minus "
            "its max).",
            "Keep at least one finite entry per row, or use torch.finfo(dtype).min instead of -inf.",
        )
    return None


def _zero_times_inf(c: _Call) -> Cause | None:
    """0 * inf."""
    name, new = c.name, c.new
    if name in ("mul", "rmul", "imul") and NAN in new:
        return (
            "0 * inf = NaN: an infinite factor meets an exact zero.",
            "Remove the infinity before multiplying (torch.where / masked_fill with a finite value).",
        )
    return None


def _power(c: _Call) -> Cause | None:
    """A negative base to a fractional power, or 0 to a negative power."""
    name, x, args, kwargs, new = c.name, c.x, c.args, c.kwargs, c.new
    if name in ("pow", "ipow", "rpow", "float_power") and isinstance(x, Tensor):
        e = argument(args, kwargs, 1, "exponent")
        if NAN in new:
            return (
                f"a negative base ({count_true(x < 0)} entries, min {number_text(float(x.min()))}) "
                f"raised to a non-integer power {e!r} gives NaN.",
                "Raise only non-negative values to fractional powers: x.clamp_min(0) ** p or x.abs() ** p.",
            )
        if isinstance(e, (int, float)) and e < 0 and count_true(x == 0):
            return (
                f"0 raised to the negative power {e!r} gives +inf ({count_true(x == 0)} zeros).",
                "Add an epsilon to the base: (x + eps) ** p.",
            )
    return None


def _unbiased_single_value(c: _Call) -> Cause | None:
    """The unbiased std/var of a single value."""
    name, new = c.name, c.new
    if name in ("std", "var", "std_mean", "var_mean") and NAN in new:
        return (
            "the unbiased estimator of a single value divides by N - 1 = 0.",
            "Use correction=0 (unbiased=False), or reduce over more than one element.",
        )
    return None


def _empty_mean(c: _Call) -> Cause | None:
    """The mean of nothing: an empty selection, or every target ignored."""
    name, x, args, kwargs, new = c.name, c.x, c.args, c.kwargs, c.new
    if name in ("mean", "nanmean", "cross_entropy", "nll_loss") and NAN in new and isinstance(x, Tensor):
        if x.numel() == 0:
            return (
                "the mean of an empty tensor (a mask that selected nothing) is 0/0 = NaN.",
                "Guard the mean: x.sum() / mask.sum().clamp_min(1), or skip the term when nothing is "
                "selected.",
            )
        target = argument(args, kwargs, 1, "target")
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
    return None


def _domain(c: _Call) -> Cause | None:
    """acos/asin/atanh outside [-1, 1]."""
    name, x = c.name, c.x
    if name in ("acos", "arccos", "asin", "arcsin", "atanh", "arctanh") and isinstance(x, Tensor):
        top = float(x.detach().abs().max())
        return (
            f"{name} of {count_true(x.abs() > 1) or count_true(x.abs() >= 1)} value(s) outside its domain "
            f"(max |x| = {top!r}; rounding pushed a cosine past 1?).",
            "Clamp into the domain: x.clamp(-1 + 1e-7, 1 - 1e-7).",
        )
    return None


def _cast_overflow(c: _Call) -> Cause | None:
    """A cast to a narrower dtype that overflows."""
    name, inputs, out, new, finfo, dt = c.name, c.inputs, c.out, c.new, c.finfo, c.dt
    if name in ("to", "half", "bfloat16", "type") and (POSINF in new or NEGINF in new):
        top = largest_finite(inputs)
        return (
            f"casting to {dt} overflows: values up to {number_text(top or float('nan'))} exceed the {dt} "
            f"maximum {number_text(finfo.max)}.",
            overflow_hint(out.dtype),
        )
    return None


def _overflow(c: _Call) -> Cause | None:
    """Any other result beyond the maximum of the dtype."""
    inputs, out, new, finfo, dt = c.inputs, c.out, c.new, c.finfo, c.dt
    if POSINF in new or NEGINF in new:
        top = largest_finite(inputs)
        shown = f" (largest input magnitude {number_text(top)})" if top is not None else ""
        return (
            f"the result exceeds the {dt} maximum {number_text(finfo.max)}{shown}: overflow.",
            overflow_hint(out.dtype),
        )
    return None


#: Tried in order; the first that recognises the call explains it.
_RULES: tuple[Callable[[_Call], Cause | None], ...] = (
    _log,
    _log1p,
    _root,
    _division,
    _exp_overflow,
    _masked_attention,
    _normalisation,
    _masked_softmax,
    _inf_minus_inf,
    _zero_times_inf,
    _power,
    _unbiased_single_value,
    _empty_mean,
    _domain,
    _cast_overflow,
    _overflow,
)


@torch.no_grad()
def explain_forward(
    op: TracedOp,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    inputs: list[Tensor],
    out: Tensor,
    new: frozenset[str],
    producer: Producer,
) -> tuple[str, str]:
    """What about the inputs of ``op`` produced the non-finite ``new`` kinds in ``out``, and the fix.

    ``producer`` finds the operation that made an input, to follow it back (the softmax whose zeros
    reached the log, the ``std`` under a division).
    """
    call = _Call(op, args, kwargs, inputs, out, new, producer)
    for rule in _RULES:
        found = rule(call)
        if found is not None:
            return found
    return (f"it turned finite inputs into {kinds_text(new)}.", HINT_GENERIC)
