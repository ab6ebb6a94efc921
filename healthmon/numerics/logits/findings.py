"""What the logits interceptor reports, and the book it keeps until it reports.

A :class:`Finding` is one unstable formula at one source line. Findings are collected by an
:class:`EvidenceBook`: provenance tags of the current window, findings known at once (from
provenance) and checks deferred to :meth:`EvidenceBook.findings` (value evidence, device tensors
resolved with one host synchronisation). Hints come from the alert registry
(:func:`healthmon.alerts.call_hint`), never from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from healthmon.alerts import call_hint
from healthmon.numerics.findings import Finding
from healthmon.numerics.logits.kinds import graph_kind
from healthmon.numerics.logits.values import saturated_fraction
from healthmon.numerics.source_lines import SourceLineFinder


@dataclass
class PendingCheck:
    """A finding that fires only if its device value, resolved later, exceeds ``threshold``."""

    code: str
    where: str | None
    hint: str
    value: Tensor
    message: Callable[[float], str]
    threshold: float  # fires when value > threshold
    report_value: bool  # False when the value is only a yes/no flag


class EvidenceBook:
    """The interceptor's memory for one window: provenance tags, findings and deferred checks.

    Args:
        source_lines: the finder that names the user's line of each finding; a fresh
            :class:`~healthmon.numerics.source_lines.SourceLineFinder` when None.

    Attributes:
        checks: number of interesting calls (losses, softmax/log/exp/sum/division...) inspected.
        errors: internal errors of the rules (a rule that fails is skipped; the call still runs).
    """

    def __init__(self, source_lines: SourceLineFinder | None = None) -> None:
        super().__init__()
        self.source_lines = source_lines if source_lines is not None else SourceLineFinder()
        self.checks = 0
        self.errors: list[str] = []
        self._tags: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._found: dict[tuple[str, str | None], list[Any]] = {}
        self._pending: list[PendingCheck] = []

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
        self._pending.append(PendingCheck(code, where, hint, value, message, threshold, report_value))

    def _check_saturated(self, p: Tensor, what: str) -> None:
        self._defer(
            "softmax.saturated",
            call_hint("softmax.saturated"),
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
            Finding(code, message, where=where, value=value, hint=hint, count=count)
            for (code, where), (message, hint, value, count) in found.items()
        ]
