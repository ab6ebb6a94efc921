"""NonFiniteMonitor: NaN/Inf in the loss and the gradients, and the operation that produced them.

Checking every operation on every step costs a synchronisation per operation. Instead the monitor
pays only when something is wrong: the loss and gradients are checked through the shared per-step
statistics (no extra synchronisation), and when one is non-finite the same batch is replayed once,
from the same RNG state, under an op-level tracer
(:mod:`healthmon.numerics.nonfinite`) that names the first operation that turned finite
inputs into NaN/Inf, at the user's source line: in the forward pass, in the backward pass (the
derivative of ``sqrt``/``log``/``pow`` at 0, the ``torch.where`` trap), or the batch itself. When the
weights are already non-finite, the optimizer step that wrote them is named instead. The replay
runs inside :func:`~healthmon.engine.isolation.isolated` (every RNG, buffers, modes, gradients,
torchmetrics states and ``self.log`` results restored); a model that cannot be replayed safely is
not replayed.

Under fp16 mixed precision a ``GradScaler`` turns overflowing gradients into skipped steps: a step
whose loss is finite but whose gradients are not is the scaler working (counted in
``healthmon/amp/skipped_steps``, no alert). Only a scaler that cannot find a working scale is an
alert (``amp.scaler_unstable``, see :mod:`healthmon.numerics.loss_scale`). A non-finite loss is a
fault whatever the scaler does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from typing_extensions import override

from healthmon import _checks, tags
from healthmon._checks import Cadence
from healthmon.alerts import OnAlert, Severity
from healthmon.engine.driver import Driver
from healthmon.engine.run import Run
from healthmon.engine.step_stats import GradStep
from healthmon.monitors.base import Monitor
from healthmon.numerics.findings import Finding, listed
from healthmon.numerics.gradients import nonfinite_indices, tensor_norms
from healthmon.numerics.loss_scale import LossScaleRule
from healthmon.numerics.nonfinite import Origin, OriginTrace, explain_update, trace_nonfinite
from healthmon.numerics.source_lines import SourceLineFinder

MAX_NAMES = 10
TAG_LOSS_SCALE = tags.AMP_LOSS_SCALE
TAG_SKIPPED = tags.AMP_SKIPPED_STEPS


def _shown(names: list[str]) -> str:
    return listed(names, MAX_NAMES)


#: How often (in optimizer steps) a model whose steps draw no random numbers is checked again.
RNG_RECHECK_EVERY = 16


class NonFiniteMonitor(Monitor):
    """NaN/Inf in the loss and gradients, and where they came from.

    Checked in ``on_before_optimizer_step``, so under ``on_alert="stop"`` or ``"raise"`` the step
    that would write NaN into the weights is not applied. A crash record (step, batch index,
    offending names, origin) is written beside the report at the first non-finite step.

    Alerts: ``loss.nonfinite``; ``grad.nonfinite`` (the parameters; ``where`` is the user's
    ``file.py:LINE`` when the replay finds that the backward of an operation produced the NaN/Inf);
    ``activation.nonfinite`` (``where``: the user's line of the first forward operation that turned
    finite inputs into NaN/Inf; the module running it is named in the message); ``batch.nonfinite``
    (the batch itself holds NaN/Inf: ``where`` is its path, e.g. ``batch[0]``, the message lists the
    sample indices); ``update.nonfinite`` (the gradients of the previous step were finite but the
    optimizer step made the weights non-finite: ``where`` names the optimizer and parameter group).

    Cost: nothing on healthy steps but one copy of the RNG state (a few kB) at batch start, so that
    the replay draws the same random numbers (dropout, noise); a training step that draws none
    (checked on the first step and every 16th step after) has nothing to copy. A replay costs one forward and
    one backward pass with a host synchronisation per operation; a repeated failure with the same
    non-finite parameters is counted on the alerts already raised instead of replayed again.

    With a ``GradScaler`` (``precision="16-mixed"``), non-finite gradients under a finite loss are
    overflow that the scaler handles by skipping the step: they are counted
    (``healthmon/amp/skipped_steps``, beside the scale ``healthmon/amp/loss_scale``), not
    reported. ``amp.scaler_unstable`` is raised when the scaler is in trouble.

    Args:
        every_n_steps: steps at which to check the gradients; None (default): the driver's checked
            steps, every step unless that costs more than ``overhead_budget`` of the step time. The
            loss is checked for NaN/Inf on every step whatever this says.
        find_module: replay the failing step to find the operation (and module) that produced NaN/Inf.
        max_replays: how many replays a run may spend.
        max_consecutive_skips: this many steps in a row skipped by the ``GradScaler`` raise
            ``amp.scaler_unstable`` (default 20: from the default initial scale 2**16 a healthy
            run finds a working scale within 16 halvings).
        min_loss_scale: a loss scale below this raises ``amp.scaler_unstable`` (default 1, the
            floor DeepSpeed and Megatron-LM use: below it gradients overflow float16 unscaled).
        on_alert: see :class:`~healthmon.monitors.base.Monitor`.
        fail_on: see :class:`~healthmon.monitors.base.Monitor`.
        log_every_n_steps: see :class:`~healthmon.monitors.base.Monitor`.
    """

    unchecked_points = frozenset({"on_batch_start", "on_batch_end"})  # the batches a NaN loss replays

    def __init__(
        self,
        *,
        every_n_steps: Cadence | None = None,
        find_module: bool = True,
        max_replays: int = 3,
        max_consecutive_skips: int = 20,
        min_loss_scale: float = 1.0,
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
        self.find_module = _checks.boolean(find_module, "find_module")
        self._source_lines = SourceLineFinder()  # its caches live as long as the monitor
        self.max_replays = _checks.non_negative_int(max_replays, "max_replays")
        self.max_consecutive_skips = _checks.positive_int(max_consecutive_skips, "max_consecutive_skips")
        self.min_loss_scale = _checks.positive_float(min_loss_scale, "min_loss_scale")
        self.scaler_rule = LossScaleRule(
            max_consecutive_skips=self.max_consecutive_skips, min_scale=self.min_loss_scale
        )
        self.replays = 0
        self.last_trace: OriginTrace | None = None
        self._batch_idx = -1
        # (batch, batch_idx, RNG state at its start) of each micro-batch of the current optimizer step
        self._window: list[tuple[Any, int, tuple[Any, Any] | None]] = []
        self._draws_random = True  # until a step shows it draws no random numbers
        self._recheck: tuple[Any, Any] | None = None  # the RNG state this micro-batch started with
        self._crash_written = False
        self._clean_step = -1  # last global step whose loss and gradients were checked finite
        self._diagnosed: dict[tuple[Any, ...], list[Finding]] = {}  # failure -> its alerts

    @override
    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "find_module": self.find_module,
            "max_replays": self.max_replays,
            "max_consecutive_skips": self.max_consecutive_skips,
            "min_loss_scale": self.min_loss_scale,
        }

    @override
    def declare_layout(self, driver: Driver) -> None:
        driver.declare_layout(
            "healthmon: precision", {"AMP loss scale and skipped steps": [TAG_LOSS_SCALE, TAG_SKIPPED]}
        )

    @override
    def on_batch_start(self, run: Run, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx
        if len(self._window) >= run.accumulate_grad_batches:
            self._window = []
        rng = None
        recheck = run.global_step % RNG_RECHECK_EVERY == 0
        if self.find_module and self.replays < self.max_replays and (self._draws_random or recheck):
            cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
            rng = (torch.get_rng_state(), cuda)
        self._recheck = rng if recheck else None
        self._window.append((batch, batch_idx, rng))

    @override
    def on_optimizer_step(self, run: Run, optimizer: Any) -> None:
        if self.should_run(run):
            self._check(run, optimizer)
        self._window = []  # this step's micro-batches are consumed

    def _check(self, run: Run, optimizer: Any) -> None:
        driver = self.driver
        stats = driver.grad_step(run, optimizer)
        loss_bad = stats.loss is not None and not math.isfinite(stats.loss)
        grads_bad = not math.isfinite(stats.norm)
        step = run.global_step
        if driver.scaler is not None:
            self._watch_scaler(run, stats)
            if stats.skipped and not loss_bad:
                return  # overflow: the scaler skips this step and lowers its scale
        if not (loss_bad or grads_bad):
            self._clean_step = step
            return
        names: list[str] = []
        if grads_bad and driver.params is not None:
            bad = nonfinite_indices(stats.per_tensor_host)
            names = [driver.params.name(stats.params[i]) for i in bad]
        weights = [p for p in run.model.parameters() if p.is_floating_point() or p.is_complex()]
        weight_norms = tensor_norms([p.detach() for p in weights]).tolist() if weights else []
        corrupted_params = [weights[i] for i in nonfinite_indices(weight_norms)]
        corrupted = [driver.params.name(p) for p in corrupted_params] if driver.params else []
        signature = (loss_bad, tuple(names), tuple(corrupted))
        origin, unreproduced, grads_explained = self._diagnose(run, step, signature, names, corrupted_params)
        self._write_crash_record(run, stats.loss, names, origin)
        if loss_bad:
            driver.alert(run, "loss.nonfinite", f"The loss is {stats.loss}.{unreproduced}", value=stats.loss)
        if grads_bad and not grads_explained:
            driver.alert(
                run,
                "grad.nonfinite",
                f"{len(names)} parameter gradient(s) hold NaN/Inf: {_shown(names)}."
                + (
                    f" {len(corrupted)} weight tensor(s) are already non-finite"
                    " (corrupted by an earlier step)."
                    if corrupted
                    else unreproduced
                ),
                where=names[0] if names else None,
            )

    def _diagnose(
        self,
        run: Run,
        step: int,
        signature: tuple[Any, ...],
        names: list[str],
        corrupted_params: Sequence[torch.Tensor],
    ) -> tuple[Origin | None, str, bool]:
        """Explain a non-finite step: a known failure again, a corrupting update, or a replay.

        Returns:
            The origin found by a replay (or None), a note for the alerts when a replay of the
            step was finite (else ""), and whether the alerts raised explain the gradients.
        """
        driver = self.driver
        known = self._diagnosed.get(signature)
        if known is not None:
            grads_explained = False
            for finding in known:  # the same failure again: count it, no replay
                driver.report(run, finding)
                grads_explained = grads_explained or finding.code == "grad.nonfinite"
            return None, "", grads_explained
        checked = self._clean_step == step - 1
        if corrupted_params and (checked or driver.stats.unchecked_step == step - 1):
            self._alert_update(run, corrupted_params, signature, step, gradients_checked=checked)
            return None, "", False
        if corrupted_params:
            return None, "", False  # non-finite gradients of an earlier step corrupted them: reported then
        trace = self._replay(run)
        origin = trace.origin if trace is not None else None
        unreproduced = ""
        if trace is not None and trace.loss_finite and trace.grads_finite:
            unreproduced = (
                " A replay of this step from the same batch, weights and RNG state was finite: the "
                "NaN/Inf depends on something the replay does not reproduce (a non-deterministic "
                "kernel, state changed by the step itself, loss scaling)."
            )
        grads_explained = False
        if origin is not None:
            self._alert_origin(run, origin, names, signature)
            grads_explained = origin.phase == "backward"
        return origin, unreproduced, grads_explained

    def _watch_scaler(self, run: Run, stats: GradStep) -> None:
        """Log the loss scale and the skipped steps; alert when the scaler is in trouble."""
        driver = self.driver
        if stats.logged:
            values = {TAG_SKIPPED: float(driver.amp_skipped_steps)}
            if stats.loss_scale is not None:
                values[TAG_LOSS_SCALE] = stats.loss_scale
            driver.log(run, values, stats.step)
        reason = self.scaler_rule.update(stats.skipped, stats.loss_scale)
        if reason is None:
            return
        bad = nonfinite_indices(stats.per_tensor_host) if driver.params is not None else []
        where = driver.params.name(stats.params[bad[0]]) if bad and driver.params is not None else None
        first = f" The first parameter with a non-finite gradient is {where}." if where else ""
        driver.alert(
            run,
            "amp.scaler_unstable",
            f"The GradScaler {reason} ({driver.amp_skipped_steps} step(s) skipped so far).{first}",
            where=where,
            value=stats.loss_scale,
        )

    def _report(self, run: Run, signature: tuple[Any, ...], finding: Finding) -> None:
        """Raise ``finding`` and remember it as what this failure (``signature``) looks like."""
        self.driver.report(run, finding)
        self._diagnosed.setdefault(signature, []).append(finding)

    def _alert_origin(self, run: Run, origin: Origin, names: list[str], signature: tuple[Any, ...]) -> None:
        """Turn the replay's origin into one alert, by where the NaN/Inf came from."""
        message = origin.describe()
        if origin.phase == "input" and origin.source_kind == "batch":
            code, where = "batch.nonfinite", origin.source
        elif origin.phase == "input":
            code, where = "activation.nonfinite", origin.source
        elif origin.phase == "backward":
            code, where = "grad.nonfinite", origin.where or (names[0] if names else None)
            message += f" {len(names)} parameter gradient(s) hold NaN/Inf: {_shown(names)}."
        else:
            code, where = "activation.nonfinite", origin.where or origin.module
        self._report(run, signature, Finding(code, message, where=where, hint=origin.hint))

    def _alert_update(
        self,
        run: Run,
        corrupted: Sequence[torch.Tensor],
        signature: tuple[Any, ...],
        step: int,
        *,
        gradients_checked: bool = True,
    ) -> None:
        """The weights are non-finite: name the optimizer step and parameter group that wrote them.

        ``gradients_checked=False``: the previous step's loss was finite but its gradients were
        not checked (the overhead budget's stride), so either may be the culprit.
        """
        driver = self.driver
        ids = {id(p) for p in corrupted}
        for opt in run.optimizers:
            for gi, group in enumerate(opt.param_groups):
                params = [p for p in group["params"] if id(p) in ids]
                if not params:
                    continue
                names = [driver.params.name(p) for p in params] if driver.params else []
                opt_name = type(opt).__name__
                head = f"The optimizer step of step {step - 1} wrote NaN/Inf into the weights"
                shown = (
                    f"{opt_name}, param group {gi} (lr {group.get('lr')}): {len(params)} weight tensor(s) "
                )
                shown += f"non-finite ({_shown(names)})."
                if gradients_checked:
                    cause = explain_update(opt, group, params)
                    message = (
                        f"{head} although its gradients were finite: the update, not the gradients, is "
                        f"the culprit. {shown} Cause: {cause.cause}"
                    )
                    hint = cause.hint
                else:
                    message = (
                        f"{head}. {shown} Its loss was finite; its gradients were not checked (on this "
                        f"model healthmon checks every {driver.stats.budget.stride}th step to stay within "
                        "`overhead_budget`), so a NaN/Inf gradient of that step or the update itself "
                        "is the culprit."
                    )
                    hint = (
                        "Run again with HealthMonitor(overhead_budget=None): every step is checked, and "
                        "a NaN/Inf gradient is replayed to the line that produced it."
                    )
                where = f"{opt_name} param group {gi}"
                self._report(run, signature, Finding("update.nonfinite", message, where=where, hint=hint))

    def _replay(self, run: Run) -> OriginTrace | None:
        """Run this step's batches again, from the same RNG states, under the op-level tracer.

        With gradient accumulation every micro-batch of the step is replayed in order until one
        shows where its NaN/Inf came from (one replay in the count).
        """
        if not self.find_module or self.replays >= self.max_replays or not self._window:
            return None
        blocker = run.replay_blocker()
        if blocker is not None:
            self.driver.alert(
                run,
                "monitor.skipped",
                "NonFiniteMonitor: the step is not replayed to find where the NaN/Inf came from "
                f"({blocker}).",
                where="NonFiniteMonitor",
            )
            return None
        self.replays += 1
        automatic = run.automatic_optimization
        trace: OriginTrace | None = None
        for batch, idx, rng in list(self._window):

            def step(batch: Any = batch, idx: int = idx, rng: Any = rng) -> Any:
                if rng is not None:
                    torch.set_rng_state(rng[0])
                    if rng[1] is not None:
                        torch.cuda.set_rng_state_all(rng[1])
                return run.loss_on(batch, idx)

            # manual optimisation steps the optimizer inside training_step: trace its forward only
            with run.replay_context(), torch.enable_grad() if automatic else torch.no_grad():
                trace = trace_nonfinite(
                    step,
                    module=run.model,
                    batch=batch,
                    backward=automatic,
                    source_lines=self._source_lines,
                )
            if trace.origin is not None:
                self._batch_idx = idx
                break
        self.last_trace = trace
        return trace

    def _write_crash_record(
        self, run: Run, loss: float | None, names: list[str], origin: Origin | None
    ) -> None:
        if self._crash_written:
            return
        self._crash_written = True
        self.driver.write_crash_record(
            {
                "schema": "healthmon.crash",
                "version": 1,
                "time": time.time(),
                "global_step": run.global_step,
                "epoch": run.current_epoch,
                "batch_idx": int(self._batch_idx),
                "loss": loss,
                "nonfinite_gradients": names,
                "first_nonfinite_module": origin.module if origin is not None else None,
                "origin": None
                if origin is None
                else {
                    "phase": origin.phase,
                    "op": origin.op.strip("`"),
                    "where": origin.where,
                    "module": origin.module,
                    "source": origin.source,
                    "samples": origin.samples,
                    "cause": origin.cause,
                },
                "on_alert": self.driver.policy.on_alert,
            },
        )

    @override
    def on_batch_end(self, run: Run, batch: Any, batch_idx: int) -> None:
        if self._recheck is not None:
            self._notice_random_draws(self._recheck)
            self._recheck = None
        if self._window and len(self._window) >= run.accumulate_grad_batches:
            self._window = []  # the step is complete: do not keep its batches alive

    def _notice_random_draws(self, rng: tuple[Any, Any]) -> None:
        """Copy RNG states at every batch start from now on if this micro-batch drew random numbers.

        A step without random draws replays exactly without its RNG state; a model whose steps
        start drawing later (an augmentation switched on) is noticed at the next recheck.
        """
        cuda = torch.cuda.get_rng_state_all() if rng[1] is not None else None
        moved = not torch.equal(torch.get_rng_state(), rng[0])
        if cuda is not None:
            moved = moved or any(not torch.equal(a, b) for a, b in zip(cuda, rng[1], strict=False))
        self._draws_random = moved

    @override
    def monitor_state(self) -> dict[str, Any]:
        return {"replays": self.replays, "crash_written": self._crash_written}

    @override
    def load_monitor_state(self, state: dict[str, Any]) -> None:
        self.replays = int(state.get("replays", 0))
        self._crash_written = bool(state.get("crash_written", False))
