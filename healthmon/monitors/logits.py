"""LogitsCheck: probabilities used in place of logits, and the other unstable softmax formulas.

A thin adapter over :class:`healthmon.numerics.logits.LogitsInterceptor`. On sampled steps the
interceptor (a ``TorchFunctionMode``) is entered in ``on_train_batch_start`` and left in
``on_before_backward``: it sees the forward pass only, not backward or the optimizer. Outside
sampled steps nothing is active, so the cost is zero. Findings become alerts at the user's source
line; the driver de-duplicates them by (code, where), so each call site is reported once, then
counted.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from healthmon import _checks, tags
from healthmon._checks import Cadence
from healthmon.alerts import OnAlert, Severity
from healthmon.engine.driver import Driver
from healthmon.engine.run import Run
from healthmon.monitors.base import Monitor
from healthmon.numerics.logits import LogitsInterceptor
from healthmon.numerics.source_lines import SourceLineFinder
from healthmon.schedules import SAMPLED_EVERY_100

TAG_CHECKS = tags.LOGITS_CHECKS
TAG_FINDINGS = tags.LOGITS_FINDINGS

#: Default sampling: the first ``first_steps`` optimizer steps, then every ``every_n_steps``.
DEFAULT_EVERY_N_STEPS = SAMPLED_EVERY_100  # spaced out by the overhead budget on very short steps
DEFAULT_FIRST_STEPS = 3


class LogitsCheck(Monitor):
    """Catch losses fed probabilities, ``log(softmax)``, naive logsumexp/softmax and saturation.

    On a sampled step the forward pass (from ``on_train_batch_start`` to ``on_before_backward``)
    runs under a ``TorchFunctionMode`` that inspects loss functions and the elementary ops of the
    softmax family; every call's result is returned untouched, so the run is unchanged. Findings
    are resolved with one host synchronisation at ``on_before_backward``, before the optimizer
    step, so ``on_alert="stop"`` can still drop the step.

    Alerts (``where`` is the user's ``path/file.py:LINE``): ``logits.probabilities`` (a loss that
    expects logits or log-probabilities received softmax/sigmoid output), ``logits.naive_log_softmax``
    (``log(softmax(x))``, or ``log_softmax`` of probabilities), ``logits.naive_logsumexp``
    (``log(sum(exp(x)))`` without the max), ``logits.naive_softmax`` (``exp(x) / exp(x).sum()``),
    ``softmax.saturated`` (probabilities exactly 0 or 1 reach a log or a loss),
    ``logits.unnormalized_log_probs`` (raw scores into ``nll_loss`` or the input of ``kl_div``),
    ``logits.clamped_scores`` (scores through ``relu``/``clamp(min=0)`` before ``cross_entropy``,
    ``log_softmax`` or ``BCEWithLogits``) and ``logits.sigmoid_bce`` (info: BCELoss on sigmoid
    outputs).

    Scalars, written on every sampled step: ``healthmon/logits/checks`` (interesting calls
    inspected) and ``healthmon/logits/findings`` (distinct call sites that fired).

    Args:
        every_n_steps: after the first steps, sample every N optimizer steps (or a callable
            ``step -> bool``). A sampled step costs roughly 1.1-1.3x a plain one on a small MLP, so
            the default, every 100 steps, keeps the amortised overhead well under 1%; it spaces
            out further where the sampled checks overrun the bundle's ``overhead_budget``
            (:class:`~healthmon.schedules.SampledEvery`); an int is kept exactly.
        first_steps: also sample global steps ``0 .. first_steps - 1`` (bugs of this kind are
            present from the first step; 0 disables this).
        on_alert: see :class:`~healthmon.monitors.base.Monitor`.
        fail_on: see :class:`~healthmon.monitors.base.Monitor`.
        log_every_n_steps: see :class:`~healthmon.monitors.base.Monitor` (the two scalars above
            are written on every sampled step regardless, since sampled steps are sparse).
    """

    intercepts_forward = True
    #: its sampled steps are planned by the driver (:meth:`needs_step`), whole: no other step calls
    #: it (the interceptor is pushed and popped within a sampled step, and at the fit's end)
    unchecked_points = frozenset()

    def __init__(
        self,
        *,
        every_n_steps: Cadence = DEFAULT_EVERY_N_STEPS,
        first_steps: int = DEFAULT_FIRST_STEPS,
        on_alert: OnAlert = "warn",
        fail_on: Severity = "warning",
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            on_alert=on_alert,
            fail_on=fail_on,
            log_every_n_steps=log_every_n_steps,
        )
        self.first_steps = _checks.non_negative_int(first_steps, "first_steps")
        self._mode: LogitsInterceptor | None = None
        self._source_lines = SourceLineFinder()  # its caches live as long as the monitor
        self.sampled_steps = 0

    @override
    def config(self) -> dict[str, Any]:
        return {**super().config(), "first_steps": self.first_steps}

    @override
    def declare_layout(self, driver: Driver) -> None:
        driver.declare_layout("healthmon: logits", {"logits checks and findings": [TAG_CHECKS, TAG_FINDINGS]})

    def should_sample(self, run: Run) -> bool:
        """Whether this step's forward pass is intercepted (the first steps, then the cadence)."""
        return self.needs_step(run.global_step)

    @override
    def needs_step(self, step: int) -> bool:
        return step < self.first_steps or self.due_at(step)

    @override
    def next_needed(self, step: int) -> int | None:
        return step + 1 if step + 1 < self.first_steps else self.next_due(step)

    @property
    def active(self) -> bool:
        """Whether the interceptor is currently on the torch function mode stack."""
        return self._mode is not None

    # ---- the points of a step ----------------------------------------------------------------
    @override
    def on_batch_start(self, run: Run, batch: Any, batch_idx: int) -> None:
        if self._mode is None and self.should_sample(run):
            mode = LogitsInterceptor(source_lines=self._source_lines)
            mode.__enter__()
            self._mode = mode

    @override
    def on_loss(self, run: Run, loss: Tensor) -> None:
        self._finish(run)

    @override
    def on_batch_end(self, run: Run, batch: Any, batch_idx: int) -> None:
        self._finish(run)  # a step that never reached backward (the step function returned None)

    @override
    def on_end(self, run: Run, error: BaseException | None) -> None:
        self._leave()

    @override
    def on_teardown(self, run: Run) -> None:
        self._leave()

    # ---- helpers -----------------------------------------------------------------------------
    def _leave(self) -> LogitsInterceptor | None:
        """Pop the interceptor off the mode stack; returns it, or None if it was not active.

        A ``TorchFunctionMode`` exit pops the top of the stack, so it is only exited when it is on
        top; otherwise (a mode the user pushed and has not popped yet) it stays for a later hook.
        """
        mode = self._mode
        if mode is None:
            return None
        depth = torch._C._len_torch_function_stack()
        if depth == 0 or torch._C._get_function_stack_at(depth - 1) is not mode:
            if not any(torch._C._get_function_stack_at(i) is mode for i in range(depth)):
                self._mode = None  # already gone (someone cleared the stack)
                return mode
            return None
        mode.__exit__(None, None, None)
        self._mode = None
        return mode

    def _finish(self, run: Run) -> None:
        mode = self._leave()
        if mode is None:
            return
        self.sampled_steps += 1
        findings = mode.findings()
        if mode.errors:
            rank_zero_warn(f"healthmon: LogitsCheck skipped a rule after an internal error: {mode.errors[0]}")
        step = run.global_step
        self.driver.log(run, {TAG_CHECKS: float(mode.checks), TAG_FINDINGS: float(len(findings))}, step)
        for f in findings:
            self.driver.report(run, f)

    @override
    def monitor_state(self) -> dict[str, Any]:
        return {"sampled_steps": self.sampled_steps}

    @override
    def load_monitor_state(self, state: dict[str, Any]) -> None:
        self.sampled_steps = int(state.get("sampled_steps", 0))
