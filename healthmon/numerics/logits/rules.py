"""The logits rules: one method per interesting torch function, judging its inputs.

Each rule receives the call's ``(args, kwargs)`` before the call runs, may record or defer a
finding (:class:`~healthmon.numerics.logits.findings.EvidenceBook`), and returns the kind of the
call's result (:mod:`healthmon.numerics.logits.kinds`) so that the next call can be judged by
provenance. Which torch functions map to which rule is :mod:`healthmon.numerics.logits.table`.
Hints are the registry's (:func:`healthmon.alerts.call_hint`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from healthmon.alerts import call_hint
from healthmon.numerics.logits.findings import EvidenceBook
from healthmon.numerics.logits.kinds import (
    CLAMPED,
    EXP,
    LOG_NAIVE,
    LOG_PROBABILITIES,
    LOG_SOFTMAX,
    MAX,
    PROBABILITIES,
    SHIFTED,
    SIGMOID,
    SOFTMAX,
    SUM_EXP,
    div_kind,
    exp_kind,
    sum_kind,
)
from healthmon.numerics.logits.values import looks_like_sigmoid, looks_like_softmax, row_tolerance
from healthmon.numerics.loss_inputs import (
    clamp_source,
    clamped_zero_fraction,
    log_source,
    raw_score_logsumexp,
    zero_fraction,
)


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    """Argument ``index`` when given by position, else keyword ``name`` (None when absent)."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name)


def _is_number(x: Any) -> bool:
    """A Python int or float (not a bool, not a tensor)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class LogitsRules(EvidenceBook):
    """The rules, as methods over the evidence book; each returns the kind of the call's result."""

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
                call_hint("logits.naive_log_softmax", "double_softmax"),
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
                call_hint("logits.naive_log_softmax", "log_of_softmax"),
            )
        elif kind == SUM_EXP:
            self._emit(
                "logits.naive_logsumexp",
                "log(sum(exp(x))) without subtracting the max: exp overflows to inf for large x "
                "and underflows to 0 (log gives -inf) for very negative x.",
                call_hint("logits.naive_logsumexp"),
            )
        if kind in PROBABILITIES:
            self._check_saturated(x, "a log")
            return LOG_NAIVE
        return None

    def _exp(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        return exp_kind(self.kind_of(_arg(args, kwargs, 0, "input")))

    def _sum(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        return sum_kind(self.kind_of(_arg(args, kwargs, 0, "input")))

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
                call_hint("logits.naive_softmax"),
            )
        return div_kind(num, den)

    def _cross_entropy(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        x = _arg(args, kwargs, 0, "input")
        self._expect_logits(x, "F.cross_entropy", "cross_entropy", class_dim=1)
        self._check_clamped(x, "F.cross_entropy")
        return None

    def _nll_loss(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        x = _arg(args, kwargs, 0, "input")
        self._expect_logits(x, "F.nll_loss (which expects log-probabilities)", "nll_loss", class_dim=1)
        self._expect_log_probabilities(x, "F.nll_loss", class_dim=1)
        return None

    def _kl_div(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        x = _arg(args, kwargs, 0, "input")
        self._expect_logits(x, "F.kl_div (whose input must be log-probabilities)", "kl_div", class_dim=-1)
        self._expect_log_probabilities(x, "The input of F.kl_div", class_dim=-1)
        return None

    def _bce_with_logits(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        self.checks += 1
        x = _arg(args, kwargs, 0, "input")
        self._expect_logits(x, "BCEWithLogits", "bce_with_logits", class_dim=None)
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
                call_hint("logits.sigmoid_bce"),
            )
            self._check_saturated(x, "BCELoss")
        return None

    def _expect_logits(self, x: Any, loss: str, form: str, class_dim: int | None) -> None:
        """A loss that expects logits (or log-probabilities): flag probabilities by provenance or values.

        ``form`` picks the loss's own fix among the registry's call hints.
        """
        hint = call_hint("logits.probabilities", form)
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
            call_hint("logits.unnormalized_log_probs"),
            evidence,
            lambda v: (
                f"{loss} received raw scores, not log-probabilities: some entries are positive and the "
                f"rows' logsumexp reaches {v:.3g} instead of 0. The loss is unbounded below: it falls "
                "forever by inflating the target's score while the model gets no better."
            ),
            threshold=row_tolerance(x),
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
            call_hint("logits.clamped_scores"),
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
