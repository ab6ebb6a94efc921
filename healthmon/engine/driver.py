"""Driver: the one hook sequence every integration runs, over a bundle of monitors.

An integration (the Lightning callbacks, :func:`healthmon.watch` for plain PyTorch and Fabric, the
Hugging Face callback) keeps a :class:`~healthmon.engine.run.Run` up to date and calls the
driver at the points of a training step; the driver hands each point to its monitors, then does
what must happen once per step whatever the monitors are: forget the accumulated loss, enforce
the alert policy on every rank, gather alerts to rank zero, write the report. Monitors see the
driver as their way out: :meth:`alert`, :meth:`log`, :meth:`grad_step`, :meth:`defer`.

Order of a step: ``batch_start`` -> ``before_backward`` (per micro-batch) ->
``before_optimizer_step`` (per optimizer, after unscaling, before clipping) -> ``batch_end``.

Checked steps: the monitors' ``on_optimizer_step`` runs on the steps the
:class:`~healthmon.schedules.CheckBudget` selects (every step, unless that would cost more than
``overhead_budget`` of the step time), on the steps a monitor's own ``every_n_steps`` asks for,
on log steps, and on any step whose loss is NaN/Inf. Other steps fetch only the loss, which the
monitors that judge losses see through ``on_unchecked_losses``, handed over together before the
next checked step: an unchecked step calls no monitor beyond its ``unchecked_points``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from healthmon.alerts import Alert, AlertPolicy, make_alert
from healthmon.engine.escalation import Escalation
from healthmon.engine.output import RunOutput
from healthmon.engine.run import Run
from healthmon.engine.step_stats import GradStep, ParamIndex, StepStatistics
from healthmon.numerics.findings import Finding

if TYPE_CHECKING:
    from healthmon.monitors.base import Monitor

#: The per-step points; a monitor is called at one only if it overrides the matching method.
PER_STEP = ("on_batch_start", "on_loss", "on_optimizer_step", "on_batch_end")


class Driver:
    """Runs a bundle of monitors against one :class:`Run`: statistics, escalation, output."""

    def __init__(
        self,
        monitors: Sequence[Monitor],
        policy: AlertPolicy,
        *,
        log_every_n_steps: int | None = None,
        overhead_budget: float | None = None,
        write_report: bool = True,
        print_summary: bool = True,
    ) -> None:
        self.monitors: list[Monitor] = []
        self.stats = StepStatistics(log_every_n_steps, overhead_budget)
        self.escalation = Escalation(policy)
        self.output = RunOutput(write_report=write_report, print_summary=print_summary)
        self.run: Run | None = None
        self._per_step: dict[str, list[Monitor]] = {hook: [] for hook in PER_STEP}
        self._own_cadence: list[Monitor] = []  # step checkers with an every_n_steps of their own
        self._loss_watchers: list[Monitor] = []  # monitors that judge the loss of unchecked steps
        self._unchecked_losses: list[tuple[int, float]] = []  # (step, loss) not yet handed to them
        self._losses_optimizer: Any = None  # the optimizer whose steps those losses are
        self._step_samplers: list[Monitor] = []  # monitors that name steps they need whole (needs_step)
        self._unchecked: dict[str, list[Monitor]] = {hook: [] for hook in PER_STEP}
        self._light = False  # this batch's optimizer step will not be checked
        self._next_check = 0  # one optimizer: the global step of its next checked step
        self._one_optimizer = False  # the run has exactly one optimizer (read at start)
        self._deferred_sampled = False  # the values waiting for the next sync are a sample's
        for m in monitors:
            self.add(m)

    def add(self, monitor: Monitor) -> None:
        """Drive one more monitor (monitors that intercept the forward pass go last)."""
        if monitor in self.monitors:
            return
        self.monitors.append(monitor)
        self.monitors.sort(key=lambda m: m.intercepts_forward)  # stable
        from healthmon.monitors.base import Monitor

        for hook in PER_STEP:
            self._per_step[hook] = [
                m for m in self.monitors if getattr(type(m), hook) is not getattr(Monitor, hook)
            ]
        self._own_cadence = [m for m in self._per_step["on_optimizer_step"] if m.every_n_steps is not None]
        self._loss_watchers = [
            m for m in self.monitors if type(m).on_unchecked_losses is not Monitor.on_unchecked_losses
        ]
        self._step_samplers = [m for m in self.monitors if type(m).needs_step is not Monitor.needs_step]
        for hook in PER_STEP:
            self._unchecked[hook] = [m for m in self._per_step[hook] if hook in m.unchecked_points]
        monitor.bind(self)
        if self.run is not None:  # joined after setup (a standalone monitor after the bundle)
            monitor.on_setup(self.run)

    # ---- what monitors use ----------------------------------------------------------------
    @property
    def policy(self) -> AlertPolicy:
        """What a new alert triggers (warn, raise or stop) and from which severity."""
        return self.escalation.policy

    @policy.setter
    def policy(self, policy: AlertPolicy) -> None:
        self.escalation.policy = policy

    @property
    def book(self) -> Any:
        """The run's alert book: alerts de-duplicated by (code, where), with counts."""
        return self.escalation.book

    @property
    def alerts(self) -> list[Alert]:
        """The run's alerts so far, in the order detected."""
        return self.escalation.book.alerts

    @property
    def params(self) -> ParamIndex | None:
        """The model's parameter names and layers (None before setup)."""
        return self.stats.params

    @property
    def scaler(self) -> Any:
        """The loop's ``GradScaler`` found at setup, or None."""
        return self.stats.scaler

    @property
    def amp_skipped_steps(self) -> int:
        """Optimizer steps the ``GradScaler`` skipped so far (inf/NaN in the scaled gradients)."""
        return self.stats.amp_skipped_steps

    @property
    def config(self) -> dict[str, Any]:
        """The settings recorded in the report and TensorBoard's configuration text."""
        return self.output.config

    @property
    def last(self) -> dict[str, float]:
        """The last value written of each scalar tag (the report's ``last``)."""
        return self.output.last

    @property
    def log_dir(self) -> str | None:
        """The folder of the event files and the report (None before setup and off rank zero)."""
        return self.output.log_dir

    @property
    def report_path(self) -> str | None:
        """Where the JSON report is written (None before setup and off rank zero)."""
        return self.output.report_path

    @property
    def stop_requested(self) -> bool:
        """Whether the ``stop`` policy asked the loop to end."""
        return self.escalation.stop_requested

    def grad_step(self, run: Run, optimizer: Any) -> GradStep:
        """This optimizer step's gradient statistics (see :class:`StepStatistics`)."""
        return self.stats.grad_step(run, optimizer)

    def defer(self, values: Tensor, callback: Callable[[list[float]], None]) -> None:
        """Fetch ``values`` with the next step's one host synchronisation."""
        self.stats.defer(values, callback)

    def is_log_step(self, run: Run, optimizer_index: int | None = None) -> bool:
        """Whether scalars are written at this step (see :meth:`StepStatistics.is_log_step`)."""
        return self.stats.is_log_step(run, optimizer_index)

    def log(self, run: Run, values: Mapping[str, float], step: int | None = None) -> None:
        """Write scalars at ``step`` (default: this step)."""
        self.output.scalars(values, run.global_step if step is None else step)

    def histogram(self, run: Run, tag: str, values: Tensor) -> None:
        """Write a histogram of ``values`` at this step (rank zero)."""
        self.output.histogram(tag, values, run.global_step)

    def declare_layout(self, category: str, charts: Mapping[str, list[str]]) -> None:
        """Add charts to TensorBoard's custom-scalars layout: {title: [tags on one chart]}."""
        self.output.declare_layout(category, charts)

    def alert(
        self,
        run: Run,
        code: str,
        message: str,
        *,
        where: str | None = None,
        hint: str | None = None,
        severity: str | None = None,
        value: float | None = None,
        step: int | None = None,
    ) -> Alert:
        """Record an alert; warn on the first occurrence; the policy acts at the step's end.

        ``step`` is the step the alert is about when it is judged later (deferred values).
        """
        alert = make_alert(
            code,
            run.global_step if step is None else step,
            message,
            where=where,
            hint=hint,
            severity=severity,  # type: ignore[arg-type]  # validated by make_alert
            value=value,
        )
        return self.escalation.record(alert, self.output.text)

    def report(
        self, run: Run, finding: Finding, *, where: str | None = None, step: int | None = None
    ) -> Alert:
        """Record a finding of the numerics as an alert (``where`` overrides the finding's own)."""
        times = f" ({finding.count} calls this step)" if finding.count > 1 else ""
        return self.alert(
            run,
            finding.code,
            finding.message + times,
            where=finding.where if where is None else where,
            hint=finding.hint,
            value=finding.value,
            step=step,
        )

    def write_crash_record(self, record: Mapping[str, Any]) -> str | None:
        """Write ``record`` as the crash file beside the report (rank zero); its path, or None."""
        return self.output.crash_record(record)

    # ---- the hook sequence -----------------------------------------------------------------
    def setup(self, run: Run) -> None:
        """A fit begins: index parameters, open the writer, let monitors declare their charts."""
        self.run = run
        self.stats.setup(run)
        self.escalation.reset()
        self.output.open(run)
        for m in self.monitors:
            m.on_setup(run)

    def start(self, run: Run) -> None:
        """The loop is about to take its first step: monitors read the loop's settings."""
        self._one_optimizer = len(run.optimizers) == 1
        self._light, self._next_check, self._deferred_sampled = False, 0, False
        self._unchecked_losses, self._losses_optimizer = [], None
        for m in self.monitors:
            m.on_start(run)
        self.output.start()

    def batch_start(self, run: Run, batch: Any, batch_idx: int) -> None:
        """A micro-batch begins: the monitors that watch batch starts see it.

        When the coming optimizer step will not be checked, only the monitors that name a point
        in their ``unchecked_points`` are called at this batch's points.
        """
        self._light = run.global_step < self._next_check
        for m in self._points("on_batch_start"):
            m.on_batch_start(run, batch, batch_idx)

    def _points(self, hook: str) -> list[Monitor]:
        return self._unchecked[hook] if self._light else self._per_step[hook]

    def _plan_next_check(self, run: Run) -> None:
        """Find the next step to check, once per checked step (and when the stride changes).

        Until then, a step's batch starts "light": one comparison of the step decides it. The
        steps a monitor needs whole (:meth:`Monitor.needs_step`: a sampled forward pass) are
        planned like checked ones. Only a run with one optimizer plans ahead; with several, each
        optimizer step is decided as it comes.
        """
        step = run.global_step
        if self.stats.budget.stride == 1 or not self._one_optimizer:
            self._next_check = step + 1
            return
        due_by: float = math.inf  # the first step a cadence known ahead names
        step_by_step: list[Callable[[int], bool]] = []  # the others (plain callables) say each step
        wanted = [(m.next_due, m.due_at) for m in self._own_cadence]
        wanted += [(m.next_needed, m.needs_step) for m in self._step_samplers]
        for next_one, is_due in wanted:
            n = next_one(step)
            if n is None:
                step_by_step.append(is_due)
            else:
                due_by = min(due_by, n)

        def due(s: int) -> bool:
            return any(is_due(s) for is_due in step_by_step)

        self._next_check = self.stats.next_checked_step(run, due_by, due if step_by_step else None)

    def before_backward(self, run: Run, loss: Tensor, *, scaled: bool = True) -> None:
        """The loss of one micro-batch, as handed to backward (scaled under fp16 AMP).

        ``scaled=False``: ``loss`` is the user's loss before the ``GradScaler`` multiplies it (a
        plain loop hands healthmon the loss its step function returned).
        """
        self.stats.add_loss(loss, scaled=scaled)
        for m in self._points("on_loss"):
            m.on_loss(run, loss)

    def before_optimizer_step(self, run: Run, optimizer: Any) -> None:
        """Gradients are complete and unscaled, not yet clipped: the monitors' main check.

        On a step that is not checked (see the module docstring) only the loss is fetched; a
        NaN/Inf loss makes it a checked step.
        """
        stats, budget = self.stats, self.stats.budget
        started = budget.step_started()
        step = run.global_step
        if step >= self._next_check:
            self._light = False  # a second optimizer step of the batch (manual optimization)
        if not self._light and self.checks(run, optimizer):
            stats.mark_checked()
            self._hand_over_losses(run)
            for m in self._per_step["on_optimizer_step"]:
                m.on_optimizer_step(run, optimizer)
            periods = [p for m in self._own_cadence if (p := m.sample_period) and m.due_at(step)]
            sampled = bool(periods)
            if sampled:
                budget.sample(min(periods))
            budget.spent(budget.now() - started, forced=sampled or not stats.on_stride, sampled=sampled)
            self._deferred_sampled = sampled
        else:
            if self._light:
                stats.count_unchecked()
            deferred = stats.has_deferred  # a checked step's judgement, run with this sync
            loss = stats.fetch_loss(run)
            if deferred:  # the judgement of the last checked step's values
                budget.spent(budget.now() - started, forced=True, sampled=self._deferred_sampled)
                self._deferred_sampled = False
            if loss is not None and not math.isfinite(loss):
                self._light = False  # every monitor sees this step through
                stats.mark_checked()
                self._hand_over_losses(run)
                for m in self._per_step["on_optimizer_step"]:
                    m.on_optimizer_step(run, optimizer)
            elif loss is not None and self._loss_watchers:
                if optimizer is not self._losses_optimizer:  # several optimizers: each one's in turn
                    self._hand_over_losses(run)
                    self._losses_optimizer = optimizer
                self._unchecked_losses.append((step, loss))
        if budget.plan(step) or step >= self._next_check:
            self._plan_next_check(run)
        stats.end_step()
        self.escalation.enforce(run, optimizer)

    def _hand_over_losses(self, run: Run) -> None:
        """Give the monitors that judge losses the unchecked steps' losses kept so far, in order."""
        losses = self._unchecked_losses
        if not losses:
            return
        self._unchecked_losses = []
        for m in self._loss_watchers:
            m.on_unchecked_losses(run, self._losses_optimizer, losses)

    def checks(self, run: Run, optimizer: Any) -> bool:
        """Whether this optimizer step gets the monitors' gradient checks (call once per step)."""
        if self.stats.checks(run, optimizer):
            return True
        step = run.global_step
        return any(m.due_at(step) for m in self._own_cadence)

    def batch_end(self, run: Run, batch: Any, batch_idx: int) -> None:
        """A micro-batch ended: monitors see it and the policy acts.

        At log steps, every rank's alerts are gathered.
        """
        for m in self._points("on_batch_end"):
            m.on_batch_end(run, batch, batch_idx)
        self.escalation.enforce(run)
        if not self._light and self.stats.is_log_step(run):  # a light step is never a log step
            self.escalation.gather(run, self.output.text)

    def train_end(self, run: Run) -> None:
        """Training ended normally: monitors conclude and every rank's alerts are gathered."""
        self._hand_over_losses(run)
        for m in self.monitors:
            m.on_training_end(run)
        self.stats.flush_deferred()  # the last step's deferred findings, before alerts are gathered
        self.escalation.gather(run, self.output.text)

    def end(self, run: Run, error: BaseException | None = None) -> None:
        """The fit ended (``error``: by an exception): write the report and the summary."""
        for m in self.monitors:
            m.on_end(run, error)
        self.stats.flush_deferred()
        self.output.facts["gradient_checks"] = self.stats.budget.summary()
        status = "exception" if error is not None else ("stopped" if self.stop_requested else "completed")
        self.output.finish(run, status, self.alerts, self.book.dropped, error)

    def teardown(self, run: Run) -> None:
        """The fit is over: monitors release what they hold and the writer closes."""
        for m in self.monitors:
            m.on_teardown(run)
        self.output.close()
        self.run = None

    # ---- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The alerts, the last scalars and the AMP skip count, for a checkpoint."""
        return {
            "alerts": self.escalation.state_dict(),
            "last": dict(self.output.last),
            "amp_skipped_steps": self.stats.amp_skipped_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (a resumed run keeps its alerts)."""
        self.escalation.load_state_dict(state.get("alerts", {}))
        self.output.last.update(state.get("last", {}))
        self.stats.amp_skipped_steps = int(state.get("amp_skipped_steps", 0))
