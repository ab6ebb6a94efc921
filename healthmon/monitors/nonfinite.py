"""NonFiniteMonitor: NaN/Inf in the loss, the gradients, and the first module whose output broke.

Checking every module's output on every step costs a synchronisation per module. Instead the
monitor pays only when something is wrong: the loss and gradients are checked through the shared
per-step statistics (no extra synchronisation), and when one is non-finite the same batch is
replayed once, without gradients and with forward hooks on every module, to name the first module
(in execution order) whose output holds NaN/Inf. The replay runs inside
:func:`~healthmon.monitors.isolation.isolated` (RNGs, buffers, modes, torchmetrics states and
``self.log`` results restored); a model that cannot be replayed safely is not replayed.

Under fp16 mixed precision a ``GradScaler`` turns overflowing gradients into skipped steps: a step
whose loss is finite but whose gradients are not is the scaler working (counted in
``healthmon/amp/skipped_steps``, no alert). Only a scaler that cannot find a working scale is an
alert (``amp.scaler_unstable``, see :mod:`healthmon.numerics.loss_scale`). A non-finite loss is a
fault whatever the scaler does.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from typing_extensions import override

from healthmon import _checks
from healthmon._checks import Cadence
from healthmon.alerts import OnAlert, Severity
from healthmon.monitors.base import Monitor
from healthmon.monitors.hub import GradStep, Hub
from healthmon.monitors.isolation import isolated, replay_blocker
from healthmon.numerics.gradients import nonfinite_indices, tensor_norms
from healthmon.numerics.loss_scale import LossScaleRule

MAX_NAMES = 10
TAG_LOSS_SCALE = "healthmon/amp/loss_scale"
TAG_SKIPPED = "healthmon/amp/skipped_steps"


def _tensors(value: Any) -> list[Tensor]:
    """Floating tensors inside a module output (tensor, tuple/list, dict, dataclass-like)."""
    if isinstance(value, Tensor):
        return [value] if value.is_floating_point() or value.is_complex() else []
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _finite(value: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(value))


class FirstNonFiniteModule:
    """Forward hooks that remember the first module whose output holds NaN/Inf.

    Hooks fire when a module's forward ends, so a child is seen before its parent: the first hit
    is the innermost module that produced the bad value. ``inputs_finite`` tells whether that
    module received finite inputs (if not, the batch itself carried NaN/Inf).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.where: str | None = None
        self.inputs_finite = True
        self._handles = [
            m.register_forward_hook(self._hook(name or "(root)")) for name, m in module.named_modules()
        ]

    def _hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if self.where is None and not _finite(output):
                self.where = f"{name} ({type(module).__name__})"
                self.inputs_finite = _finite(inputs)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class NonFiniteMonitor(Monitor):
    """``loss.nonfinite``, ``grad.nonfinite`` (names the parameters) and ``activation.nonfinite``.

    Checked in ``on_before_optimizer_step``, so under ``on_alert="stop"`` or ``"raise"`` the step
    that would write NaN into the weights is not applied. A crash record (step, batch index,
    offending names) is written beside the report at the first non-finite step.

    With a ``GradScaler`` (``precision="16-mixed"``), non-finite gradients under a finite loss are
    overflow that the scaler handles by skipping the step: they are counted
    (``healthmon/amp/skipped_steps``, beside the scale ``healthmon/amp/loss_scale``), not
    reported. ``amp.scaler_unstable`` is raised when the scaler is in trouble.

    Args:
        every_n_steps: steps at which to check (default every step).
        find_module: replay the batch to name the first module with a non-finite output.
        max_replays: how many replays a run may spend (each costs one forward pass).
        max_consecutive_skips: this many steps in a row skipped by the ``GradScaler`` raise
            ``amp.scaler_unstable`` (default 20: from the default initial scale 2**16 a healthy
            run finds a working scale within 16 halvings).
        min_loss_scale: a loss scale below this raises ``amp.scaler_unstable`` (default 1, the
            floor DeepSpeed and Megatron-LM use: below it gradients overflow float16 unscaled).
        on_alert: see :class:`~healthmon.monitors.base.Monitor`.
        fail_on: see :class:`~healthmon.monitors.base.Monitor`.
        log_every_n_steps: see :class:`~healthmon.monitors.base.Monitor`.
    """

    def __init__(
        self,
        *,
        every_n_steps: Cadence = 1,
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
        if not isinstance(find_module, bool):
            raise TypeError(f"`find_module`: expected True or False, got {find_module!r}.")
        self.find_module = find_module
        self.max_replays = _checks.positive_int(max_replays, "max_replays", minimum=0)
        self.max_consecutive_skips = _checks.positive_int(max_consecutive_skips, "max_consecutive_skips")
        self.min_loss_scale = _checks.positive_float(min_loss_scale, "min_loss_scale")
        self.scaler_rule = LossScaleRule(
            max_consecutive_skips=self.max_consecutive_skips, min_scale=self.min_loss_scale
        )
        self.replays = 0
        self._batch: Any = None
        self._batch_idx = -1
        self._crash_written = False

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
    def declare_layout(self, hub: Hub) -> None:
        hub.declare_layout(
            "healthmon: precision", {"AMP loss scale and skipped steps": [TAG_LOSS_SCALE, TAG_SKIPPED]}
        )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch, self._batch_idx = batch, batch_idx

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.should_run(trainer):
            self._check(trainer, pl_module, optimizer)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def _check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        hub = self.hub
        stats = hub.grad_step(trainer, optimizer)
        loss_bad = stats.loss is not None and not math.isfinite(stats.loss)
        grads_bad = not math.isfinite(stats.norm)
        if hub.scaler is not None:
            self._watch_scaler(trainer, stats)
            if stats.skipped and not loss_bad:
                return  # overflow: the scaler skips this step and lowers its scale
        if not (loss_bad or grads_bad):
            return
        names: list[str] = []
        if grads_bad and hub.params is not None:
            bad = nonfinite_indices(stats.per_tensor_host)
            names = [hub.params.name(stats.params[i]) for i in bad]
        weights = [p for p in pl_module.parameters() if p.is_floating_point() or p.is_complex()]
        weight_norms = tensor_norms([p.detach() for p in weights]).tolist() if weights else []
        corrupted = (
            [hub.params.name(weights[i]) for i in nonfinite_indices(weight_norms)] if hub.params else []
        )
        module, inputs_finite = (None, True) if corrupted else self._replay(trainer, pl_module)
        self._write_crash_record(trainer, stats.loss, names, module)
        if module is not None:
            cause = "" if inputs_finite else " Its inputs were already non-finite: the batch holds NaN/Inf."
            hub.alert(
                trainer,
                "activation.nonfinite",
                f"The output of {module} is the first non-finite activation in the forward pass.{cause}",
                where=module.split(" ")[0],
            )
        if loss_bad:
            hub.alert(trainer, "loss.nonfinite", f"The loss is {stats.loss}.", value=stats.loss)
        if grads_bad:
            shown = ", ".join(names[:MAX_NAMES]) + (
                f" and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else ""
            )
            hub.alert(
                trainer,
                "grad.nonfinite",
                f"{len(names)} parameter gradient(s) hold NaN/Inf: {shown}."
                + (
                    f" {len(corrupted)} weight tensor(s) are already non-finite"
                    " (corrupted by an earlier step)."
                    if corrupted
                    else ""
                ),
                where=names[0] if names else None,
            )

    def _watch_scaler(self, trainer: pl.Trainer, stats: GradStep) -> None:
        """Log the loss scale and the skipped steps; alert when the scaler is in trouble."""
        hub = self.hub
        if stats.logged:
            values = {TAG_SKIPPED: float(hub.amp_skipped_steps)}
            if stats.loss_scale is not None:
                values[TAG_LOSS_SCALE] = stats.loss_scale
            hub.log(trainer, values, stats.step)
        reason = self.scaler_rule.update(stats.skipped, stats.loss_scale)
        if reason is None:
            return
        bad = nonfinite_indices(stats.per_tensor_host) if hub.params is not None else []
        where = hub.params.name(stats.params[bad[0]]) if bad and hub.params is not None else None
        first = f" The first parameter with a non-finite gradient is {where}." if where else ""
        hub.alert(
            trainer,
            "amp.scaler_unstable",
            f"The GradScaler {reason} ({hub.amp_skipped_steps} step(s) skipped so far).{first}",
            where=where,
            value=stats.loss_scale,
        )

    def _replay(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[str | None, bool]:
        """Run this step's batch again under forward hooks; (first bad module, its inputs finite)."""
        if not self.find_module or self.replays >= self.max_replays or self._batch is None:
            return None, True
        blocker = replay_blocker(pl_module)
        if blocker is not None:
            self.hub.alert(
                trainer,
                "monitor.skipped",
                "NonFiniteMonitor: the batch is not replayed to find the first non-finite module "
                f"({blocker}).",
                where="NonFiniteMonitor",
            )
            return None, True
        self.replays += 1
        finder = FirstNonFiniteModule(pl_module)
        try:
            with isolated(pl_module), torch.no_grad(), trainer.precision_plugin.train_step_context():
                pl_module.training_step(self._batch, self._batch_idx)
        except Exception:  # the replay is best effort: the user's step may not be re-entrant
            pass
        finally:
            finder.remove()
        return finder.where, finder.inputs_finite

    def _write_crash_record(
        self, trainer: pl.Trainer, loss: float | None, names: list[str], module: str | None
    ) -> None:
        if self._crash_written:
            return
        self._crash_written = True
        self.hub.write_crash_record(
            trainer,
            {
                "schema": "healthmon.crash",
                "version": 1,
                "time": time.time(),
                "global_step": int(trainer.global_step),
                "epoch": int(trainer.current_epoch),
                "batch_idx": int(self._batch_idx),
                "loss": loss,
                "nonfinite_gradients": names,
                "first_nonfinite_module": module,
                "on_alert": self.hub.policy.on_alert,
            },
        )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch = None  # do not keep the batch alive between steps
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def monitor_state(self) -> dict[str, Any]:
        rule = self.scaler_rule
        return {
            "replays": self.replays,
            "crash_written": self._crash_written,
            "scaler": {"consecutive": rule.consecutive, "below_floor": rule.below_floor},
        }

    @override
    def load_monitor_state(self, state: dict[str, Any]) -> None:
        self.replays = int(state.get("replays", 0))
        self._crash_written = bool(state.get("crash_written", False))
        scaler = state.get("scaler", {})
        self.scaler_rule.consecutive = int(scaler.get("consecutive", 0))
        self.scaler_rule.below_floor = bool(scaler.get("below_floor", False))
