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

This module is pure torch: no Lightning, no logging.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

# SKIPPED_PACKAGES and user_frame_location are re-exported: they used to live here.
from healthmon.alerts import code_info
from healthmon.numerics.loss_inputs import (
    VIEW_NODES,
    clamp_source,
    clamped_zero_fraction,
    log_source,
    raw_score_logsumexp,
    zero_fraction,
)
from healthmon.numerics.source_lines import (  # noqa: F401
    SKIPPED_PACKAGES,
    SourceLineFinder,
    shared_finder,
    user_frame_location,
)

# ---- kinds of evidence (provenance tags) ------------------------------------------------------
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

# Hints: the registry's (healthmon.alerts) where one fits every call; the call-specific fixes of
# logits.probabilities and logits.naive_log_softmax refine it for the loss or the form at hand.
HINT_CE = "Pass the raw logits: F.cross_entropy(logits, y) (remove the softmax before the loss)."
HINT_NLL = "Use F.log_softmax(logits, dim=1) before F.nll_loss, or F.cross_entropy(logits, y)."
HINT_BCE_LOGITS = "Pass the pre-sigmoid values: nn.BCEWithLogitsLoss()(logits, y) (remove the sigmoid)."
HINT_KL = "kl_div expects log-probabilities as input: F.kl_div(F.log_softmax(student, dim=-1), target)."
HINT_LOG_SOFTMAX = "Use F.log_softmax(logits, dim=-1) instead of torch.log(F.softmax(logits, dim=-1))."
HINT_DOUBLE_SOFTMAX = "Apply F.log_softmax to the logits, not to softmax outputs (remove the softmax)."
HINT_LOGSUMEXP = code_info("logits.naive_logsumexp").hint
HINT_SOFTMAX = code_info("logits.naive_softmax").hint
HINT_SIGMOID_BCE = code_info("logits.sigmoid_bce").hint
HINT_UNNORMALIZED = code_info("logits.unnormalized_log_probs").hint
HINT_CLAMPED = code_info("logits.clamped_scores").hint
HINT_SATURATED = code_info("softmax.saturated").hint


@dataclass(frozen=True)
class Finding:
    """One unstable formula seen during interception.

    Attributes:
        code: the alert code (``logits.probabilities``, ``logits.naive_log_softmax``, ...).
        message: one sentence: what was computed and why it is unstable.
        where: the user's source line, ``path/file.py:LINE`` (relative to the working directory
            when inside it), or None when no frame outside the skipped packages was found.
        hint: the exact fix for this call.
        value: the measured number, when there is one (e.g. the fraction of saturated entries).
        count: how many calls at this line fired during the interception window.
    """

    code: str
    message: str
    where: str | None
    hint: str
    value: float | None = None
    count: int = 1


# ---- provenance from the autograd graph (tensors made before interception) --------------------
_PASS_NODES = VIEW_NODES | {"ClampBackward0", "ClampBackward1", "ClampMinBackward0", "ClampMaxBackward0"}
_SCALAR_NODES = frozenset({"AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0"})
_MAX_NODES = frozenset({"MaxBackward0", "MaxBackward1", "AmaxBackward0", "LogsumexpBackward0"})
_MAX_WALK = 12


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
    if name == "SoftmaxBackward0":
        return SOFTMAX
    if name == "SigmoidBackward0":
        return SIGMOID
    if name == "LogSoftmaxBackward0":
        return LOG_SOFTMAX
    if name in _MAX_NODES:
        return MAX
    parents = _parents(node)
    if name == "ExpBackward0":
        inner = graph_kind(parents[0], depth + 1) if parents else None
        return _exp_kind(inner) if parents and parents[0] is not None else EXP
    if name.startswith("SumBackward"):
        return _sum_kind(graph_kind(parents[0], depth + 1) if parents else None)
    if name == "LogBackward0":
        inner = graph_kind(parents[0], depth + 1) if parents else None
        return LOG_NAIVE if inner in PROBABILITIES else None
    if name in _SCALAR_NODES and len(parents) == 2:
        first, second = parents
        if name == "SubBackward0" and first is not None:
            # x - max(x); a detached subtrahend (x - x.max().detach()) is indistinguishable from a
            # constant here, so it counts as a shift too: no alert without evidence.
            if second is None or graph_kind(second, depth + 1) == MAX:
                inner = graph_kind(first, depth + 1)
                return SHIFTED if second is not None or inner is None else inner
        if name == "DivBackward0" and first is not None and second is not None:
            return _div_kind(graph_kind(first, depth + 1), graph_kind(second, depth + 1))
        if second is None and first is not None:  # an op with a Python number
            return graph_kind(first, depth + 1)
    return None


def _exp_kind(inner: str | None) -> str:
    if inner == SHIFTED:
        return EXP_SAFE
    if inner in (LOG_SOFTMAX, LOG_NAIVE):
        return SOFTMAX
    return EXP


def _sum_kind(inner: str | None) -> str | None:
    return {EXP: SUM_EXP, EXP_SAFE: SUM_EXP_SAFE}.get(inner or "")


def _div_kind(num: str | None, den: str | None) -> str | None:
    if (num, den) in ((EXP, SUM_EXP), (EXP_SAFE, SUM_EXP_SAFE)):
        return SOFTMAX
    return None


# ---- value evidence (device tensors, resolved once) -------------------------------------------
def _row_tolerance(x: Tensor) -> float:
    return 1e-3 if torch.finfo(x.dtype).bits >= 32 else 2e-2


@torch.no_grad()
def looks_like_softmax(x: Tensor, dim: int) -> Tensor:
    """1.0 when every entry is in [0, 1] and every slice along ``dim`` sums to 1, else 0.0 (device)."""
    x = x.detach()
    if x.dim() == 0 or x.numel() == 0 or x.shape[dim] < 2:
        return torch.zeros((), device=x.device)
    in_range = ((x >= 0) & (x <= 1)).all()
    rows = x.float().sum(dim)
    ok = (rows - 1).abs().amax() <= _row_tolerance(x)
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


# ---- the interceptor --------------------------------------------------------------------------
def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class _Pending:
    code: str
    where: str | None
    hint: str
    value: Tensor
    message: Callable[[float], str]
    threshold: float  # fires when value > threshold
    report_value: bool  # False when the value is only a yes/no flag


class LogitsInterceptor(TorchFunctionMode):
    """A ``TorchFunctionMode`` that spots unstable logits formulas; results are never changed.

    Use it as a context manager around a forward pass (or ``__enter__``/``__exit__`` across hooks),
    then call :meth:`findings` once. A fresh instance per interception window keeps the
    provenance table short-lived.

    Attributes:
        checks: number of interesting calls (losses, softmax/log/exp/sum/division...) inspected.
        errors: internal errors of the rules (a rule that fails is skipped; the call still runs).
    """

    def __init__(self, source_lines: SourceLineFinder | None = None) -> None:
        super().__init__()
        self.source_lines = source_lines if source_lines is not None else shared_finder()
        self.checks = 0
        self.errors: list[str] = []
        self._tags: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._found: dict[tuple[str, str | None], list[Any]] = {}
        self._pending: list[_Pending] = []

    # -- dispatch ------------------------------------------------------------------------------
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        rule = _RULES.get(func)
        if rule is None:
            return func(*args, **kwargs)
        kind: str | None = None
        try:
            kind = rule(self, args, kwargs)
        except Exception as exc:  # a rule must never break the user's step
            self.errors.append(f"{getattr(func, '__name__', func)}: {type(exc).__name__}: {exc}")
        out = func(*args, **kwargs)
        target = out[0] if isinstance(out, tuple) and out else out
        if isinstance(target, Tensor):
            if kind is not None:
                self._tags[target] = kind
            elif target in self._tags:  # an in-place op overwrote a tagged tensor
                del self._tags[target]
        return out

    # -- evidence ------------------------------------------------------------------------------
    def kind_of(self, x: Any) -> str | None:
        """What produced ``x``: its tag from this window, else its autograd node, else None."""
        if not isinstance(x, Tensor):
            return None
        kind = self._tags.get(x)
        if kind is not None:
            return kind
        return graph_kind(x.grad_fn)

    def _tag_of(self, x: Any) -> str | None:
        return self._tags.get(x) if isinstance(x, Tensor) else None

    def _emit(self, code: str, message: str, hint: str, value: float | None = None) -> None:
        where = self.source_lines.caller(3)
        self._record(code, where, message, hint, value)

    def _record(self, code: str, where: str | None, message: str, hint: str, value: float | None) -> None:
        known = self._found.get((code, where))
        if known is None:
            self._found[(code, where)] = [message, hint, value, 1]
        else:
            known[3] += 1
            if value is not None:
                known[2] = value

    def _defer(
        self,
        code: str,
        hint: str,
        value: Tensor,
        message: Callable[[float], str],
        *,
        threshold: float = 0.0,
        report_value: bool = True,
    ) -> None:
        where = self.source_lines.caller(3)
        self._pending.append(_Pending(code, where, hint, value, message, threshold, report_value))

    def _check_saturated(self, p: Tensor, what: str) -> None:
        self._defer(
            "softmax.saturated",
            HINT_SATURATED,
            saturated_fraction(p),
            lambda v: (
                f"{v:.1%} of the probabilities reaching {what} are exactly 0 or 1: their gradient is lost."
            ),
        )

    # -- results -------------------------------------------------------------------------------
    def findings(self) -> list[Finding]:
        """Resolve the value checks (one host synchronisation) and return the findings, once.

        Call it after the interception window has closed; it clears what it returns.
        """
        pending, self._pending = self._pending, []
        if pending:
            device = pending[0].value.device
            values = torch.stack([p.value.detach().float().reshape(()).to(device) for p in pending]).tolist()
            for p, v in zip(pending, values, strict=True):
                if v > p.threshold:
                    self._record(p.code, p.where, p.message(v), p.hint, v if p.report_value else None)
        found, self._found = self._found, {}
        return [
            Finding(code, message, where, hint, value, count)
            for (code, where), (message, hint, value, count) in found.items()
        ]

    # -- rules: each inspects the inputs and returns the kind of the result ----------------------
    def _pass(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        return self._tag_of(_arg(args, kwargs, 0, "input"))

    def _arith(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        # x + eps, x * t: keeps the kind of the tensor operand when the other is a Python number.
        a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other")
        if _is_number(b):
            return self._tag_of(a)
        if _is_number(a):
            return self._tag_of(b)
        return None

    def _rsub(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        # 1 - sigmoid(x) is sigmoid(-x): still a probability that can saturate.
        a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other")
        return SIGMOID if _is_number(b) and b == 1 and self.kind_of(a) == SIGMOID else None

    def _sub(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other")
        if _is_number(b):
            return self._tag_of(a)
        if isinstance(b, Tensor) and self.kind_of(b) == MAX:
            return SHIFTED
        return None

    def _max(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        return MAX

    def _softmax(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        return SOFTMAX

    def _sigmoid(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        return SIGMOID

    def _log_softmax(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        x = _arg(args, kwargs, 0, "input")
        if self.kind_of(x) == SOFTMAX:
            self._emit(
                "logits.naive_log_softmax",
                "log_softmax was applied to softmax outputs (a double softmax): the log-probabilities "
                "are squashed towards uniform and the gradient is lost.",
                HINT_DOUBLE_SOFTMAX,
            )
            return LOG_NAIVE
        self._check_clamped(x, "log_softmax")
        return LOG_SOFTMAX

    def _log(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        x = _arg(args, kwargs, 0, "input")
        kind = self.kind_of(x)
        if kind == SOFTMAX:
            self._emit(
                "logits.naive_log_softmax",
                "log(softmax(x)) computed in two steps: softmax underflows to 0 and the log gives "
                "-inf; log_softmax computes the same thing stably.",
                HINT_LOG_SOFTMAX,
            )
        elif kind == SUM_EXP:
            self._emit(
                "logits.naive_logsumexp",
                "log(sum(exp(x))) without subtracting the max: exp overflows to inf for large x "
                "and underflows to 0 (log gives -inf) for very negative x.",
                HINT_LOGSUMEXP,
            )
        if kind in PROBABILITIES:
            self._check_saturated(x, "a log")
            return LOG_NAIVE
        return None

    def _exp(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        return _exp_kind(self.kind_of(_arg(args, kwargs, 0, "input")))

    def _sum(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        return _sum_kind(self.kind_of(_arg(args, kwargs, 0, "input")))

    def _div(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other")
        if _is_number(b):
            return self._tag_of(a)
        if not isinstance(b, Tensor):
            return None
        num, den = self.kind_of(a), self.kind_of(b)
        if (num, den) == (EXP, SUM_EXP):
            self._emit(
                "logits.naive_softmax",
                "A softmax written as exp(x) / exp(x).sum() without subtracting the max: exp "
                "overflows to inf (inf/inf = NaN) or underflows to 0 (0/0 = NaN).",
                HINT_SOFTMAX,
            )
        return _div_kind(num, den)

    def _cross_entropy(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        x = _arg(args, kwargs, 0, "input")
        self._expect_logits(x, "F.cross_entropy", HINT_CE, class_dim=1)
        self._check_clamped(x, "F.cross_entropy")
        return None

    def _nll_loss(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        x = _arg(args, kwargs, 0, "input")
        self._expect_logits(x, "F.nll_loss (which expects log-probabilities)", HINT_NLL, class_dim=1)
        self._expect_log_probabilities(x, "F.nll_loss", class_dim=1)
        return None

    def _kl_div(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        x = _arg(args, kwargs, 0, "input")
        self._expect_logits(x, "F.kl_div (whose input must be log-probabilities)", HINT_KL, class_dim=-1)
        self._expect_log_probabilities(x, "The input of F.kl_div", class_dim=-1)
        return None

    def _bce_with_logits(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        x = _arg(args, kwargs, 0, "input")
        self._expect_logits(x, "BCEWithLogits", HINT_BCE_LOGITS, class_dim=None)
        self._check_clamped(x, "BCEWithLogits")
        return None

    def _bce(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        x = _arg(args, kwargs, 0, "input")
        if isinstance(x, Tensor) and self.kind_of(x) == SIGMOID:
            self._emit(
                "logits.sigmoid_bce",
                "BCELoss on sigmoid outputs: legal, but the logits form is more stable (it never "
                "takes log(0)).",
                HINT_SIGMOID_BCE,
            )
            self._check_saturated(x, "BCELoss")
        return None

    def _expect_logits(self, x: Any, loss: str, hint: str, class_dim: int | None) -> None:
        """A loss that expects logits (or log-probabilities): flag probabilities by provenance or values."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return
        kind = self.kind_of(x)
        if kind in PROBABILITIES:
            what = "softmax" if kind == SOFTMAX else "sigmoid"
            self._emit(
                "logits.probabilities",
                f"{loss} received {what} probabilities instead of logits: the loss saturates and "
                "the gradient is rounded to zero, which stalls training.",
                hint,
            )
            self._check_saturated(x, loss)
            return
        if kind is not None or x.grad_fn is not None:
            return  # the graph says what it is, and it is not probabilities
        # No graph and no tag: judge by values (device tensors, resolved in findings()).
        if class_dim is None:
            evidence, shape = looks_like_sigmoid(x), "inside (0, 1)"
        else:
            dim = class_dim if x.dim() >= 2 or class_dim < 0 else 0
            evidence, shape = looks_like_softmax(x, dim), "in [0, 1] with rows summing to 1"
        self._defer(
            "logits.probabilities",
            hint,
            evidence,
            lambda v: (
                f"{loss} received values that all lie {shape}: probabilities, not logits; "
                "the gradient is rounded to zero, which stalls training."
            ),
            threshold=0.5,
            report_value=False,
        )

    def _expect_log_probabilities(self, x: Any, loss: str, class_dim: int) -> None:
        """A loss that expects log-probabilities: flag raw scores (positive entries, rows not normalised).

        Provenance exempts what the probabilities rule already covers (softmax/sigmoid output) and
        inputs built from a log; the values decide the rest.
        """
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0:
            return
        kind = self.kind_of(x)
        if kind in PROBABILITIES or kind in LOG_PROBABILITIES:
            return
        if x.grad_fn is not None and log_source(x.grad_fn) is not None:
            return
        dim = class_dim if x.dim() >= 2 or class_dim < 0 else 0
        evidence = raw_score_logsumexp(x, dim) * (
            1 - looks_like_softmax(x, dim)
        )  # probabilities: the other rule
        self._defer(
            "logits.unnormalized_log_probs",
            HINT_UNNORMALIZED,
            evidence,
            lambda v: (
                f"{loss} received raw scores, not log-probabilities: some entries are positive and the "
                f"rows' logsumexp reaches {v:.3g} instead of 0. The loss is unbounded below: it falls "
                "forever by inflating the target's score while the model gets no better."
            ),
            threshold=_row_tolerance(x),
        )

    def _check_clamped(self, x: Any, consumer: str) -> None:
        """Scores clamped at 0 (relu, clamp(min=0)) reaching a logits loss or log_softmax."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return
        kind = self.kind_of(x)
        if kind is not None:
            op = kind[len(CLAMPED) :] if kind.startswith(CLAMPED) else None
        else:
            op = clamp_source(x.grad_fn) if x.grad_fn is not None else None
        if op is not None:  # provenance: the scores went through the clamp
            evidence, threshold, how = zero_fraction(x), -1.0, f"went through {op}"
        elif kind is None and x.grad_fn is None:  # no graph: the values must look clamped
            dim = 1 if x.dim() >= 2 else 0
            not_probabilities = 1 - looks_like_softmax(x, dim) if x.dim() >= 1 else 1
            evidence, threshold, how = clamped_zero_fraction(x) * not_probabilities, 0.0, "are clamped at 0"
        else:
            return
        self._defer(
            "logits.clamped_scores",
            HINT_CLAMPED,
            evidence,
            lambda v: (
                f"{consumer} received class scores that {how}: {v:.1%} of them are exactly 0 and pass "
                "no gradient, and no score can go below 0 to rule a class out."
            ),
            threshold=threshold,
        )

    def _clamp(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        # clamp(min >= 0) of scores: tagged; a clamp of a tagged tensor (probabilities) keeps its tag.
        x = _arg(args, kwargs, 0, "input")
        kind = self._tag_of(x)
        if kind is not None:
            return kind
        low = _arg(args, kwargs, 1, "min")
        return f"{CLAMPED}clamp(min={low:g})" if _is_number(low) and low >= 0 else None

    def _relu(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        return self._tag_of(_arg(args, kwargs, 0, "input")) or f"{CLAMPED}relu"

    def _hardtanh(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        kind = self._tag_of(_arg(args, kwargs, 0, "input"))
        if kind is not None:
            return kind
        low = _arg(args, kwargs, 1, "min_val")
        low = -1.0 if low is None else low
        return f"{CLAMPED}hardtanh/relu6 (min_val={low:g})" if _is_number(low) and low >= 0 else None

    def _relu6(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        return self._tag_of(_arg(args, kwargs, 0, "input")) or f"{CLAMPED}hardtanh/relu6 (min_val=0)"


# ---- the table of interesting functions -------------------------------------------------------
Rule = Callable[[LogitsInterceptor, tuple[Any, ...], dict[str, Any]], "str | None"]


def _funcs(torch_names: tuple[str, ...] = (), tensor_names: tuple[str, ...] = (), extra: tuple = ()) -> list:
    found: list[Any] = list(extra)
    for name in torch_names:
        for namespace in (torch, torch.special):
            if hasattr(namespace, name):
                found.append(getattr(namespace, name))
    for name in tensor_names:
        for cls in (torch.Tensor, torch._C.TensorBase):
            if hasattr(cls, name):
                found.append(getattr(cls, name))
    return found


def _build_rules() -> dict[Any, Rule]:
    L = LogitsInterceptor
    table: list[tuple[list[Any], Rule]] = [
        (
            _funcs(
                tensor_names=(
                    "detach",
                    "clone",
                    "contiguous",
                    "to",
                    "float",
                    "double",
                    "half",
                    "bfloat16",
                    "type",
                    "view",
                    "view_as",
                    "reshape",
                    "reshape_as",
                    "squeeze",
                    "unsqueeze",
                    "flatten",
                    "permute",
                    "transpose",
                    "t",
                    "clamp_max",
                    "__getitem__",
                ),
                torch_names=("clamp_max", "reshape", "flatten", "squeeze"),
            ),
            L._pass,
        ),
        (
            _funcs(
                ("clamp", "clip", "clamp_min"),
                ("clamp", "clamp_", "clamp_min", "clamp_min_", "clip", "clip_"),
            ),
            L._clamp,
        ),
        (_funcs(("relu", "relu_"), ("relu", "relu_"), (F.relu,)), L._relu),
        ([F.hardtanh], L._hardtanh),
        ([F.relu6], L._relu6),
        (
            _funcs(
                ("add", "mul", "multiply"),
                ("add", "add_", "__add__", "__radd__", "__iadd__", "mul", "mul_", "__mul__", "__rmul__"),
            ),
            L._arith,
        ),
        (_funcs(("rsub",), ("__rsub__",)), L._rsub),
        (_funcs(("sub", "subtract"), ("sub", "sub_", "subtract", "__sub__", "__isub__")), L._sub),
        (_funcs(("max", "amax", "logsumexp"), ("max", "amax", "logsumexp")), L._max),
        (_funcs(("softmax",), ("softmax",), (F.softmax,)), L._softmax),
        (_funcs(("sigmoid", "expit"), ("sigmoid", "sigmoid_"), (F.sigmoid,)), L._sigmoid),
        (_funcs(("log_softmax",), ("log_softmax",), (F.log_softmax,)), L._log_softmax),
        (_funcs(("log",), ("log", "log_")), L._log),
        (_funcs(("exp",), ("exp", "exp_")), L._exp),
        (_funcs(("sum",), ("sum",)), L._sum),
        (
            _funcs(
                ("div", "divide", "true_divide"),
                ("div", "div_", "divide", "true_divide", "__truediv__", "__itruediv__"),
            ),
            L._div,
        ),
        ([F.cross_entropy], L._cross_entropy),
        ([F.nll_loss], L._nll_loss),
        ([F.kl_div], L._kl_div),
        ([F.binary_cross_entropy_with_logits, torch.binary_cross_entropy_with_logits], L._bce_with_logits),
        ([F.binary_cross_entropy], L._bce),
    ]
    rules: dict[Any, Rule] = {}
    for funcs, rule in table:
        for f in funcs:
            rules[f] = rule
    return rules


_RULES: dict[Any, Rule] = _build_rules()
