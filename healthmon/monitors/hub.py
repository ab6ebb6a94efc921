"""The hub a set of monitors shares: alert book and policy, sinks, parameter names, step statistics.

``HealthMonitor`` owns one hub and hands it to its monitors; a monitor used on its own makes its
own. The hub computes the per-step gradient statistics once (one fused kernel, one host
synchronisation) so that several monitors reading them cost no more than one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor

from healthmon.alerts import Alert, AlertBook, AlertPolicy, NumericalHealthError, make_alert
from healthmon.numerics.gradients import (
    combined_norm,
    combined_norms_by_group,
    reduce_sharded_norms,
    tensor_norms,
)
from healthmon.sinks.console import print_summary
from healthmon.sinks.report import CRASH_NAME, REPORT_NAME, build_report, write_json_atomic
from healthmon.sinks.tensorboard import TensorBoardSink
from healthmon.tags import ALERT_RECORDS as ALERT_RECORD_TAG

ALERT_TEXT_TAG = "healthmon/alerts"
CONFIG_TAG = "healthmon/config"


def layer_of(param_name: str) -> str:
    """The module path that owns a parameter ("net.0.weight" -> "net.0"; "scale" -> "(root)")."""
    head, _, _ = param_name.rpartition(".")
    return head or "(root)"


class ParamIndex:
    """Names of a module's parameters and the layer each belongs to, in registration order."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.names: dict[int, str] = {}
        self.layers: list[str] = []
        self.layer_of: dict[int, int] = {}
        layer_ids: dict[str, int] = {}
        for name, param in module.named_parameters():
            self.names[id(param)] = name
            layer = layer_of(name)
            if layer not in layer_ids:
                layer_ids[layer] = len(self.layers)
                self.layers.append(layer)
            self.layer_of[id(param)] = layer_ids[layer]

    def name(self, param: Tensor) -> str:
        return self.names.get(id(param), f"<unnamed {tuple(param.shape)}>")


@dataclass
class GradStep:
    """Gradient statistics of one optimizer step, shared by the monitors.

    ``per_tensor`` stays on the device (``per_tensor_host`` is its copy); the floats were fetched
    with one host synchronisation.
    Norms are measured after AMP unscaling and before gradient clipping. ``loss`` is the loss
    handed to backward since the previous optimizer step (the user's loss: AMP scaling undone),
    summed over accumulated micro-batches, which Lightning divides by their number: their mean.
    ``skipped``: a ``GradScaler`` is active and the
    gradients are non-finite, so the scaler will skip this step (``loss_scale`` is the scale it
    used). ``optimizer_index`` is the optimizer's position in ``trainer.optimizers``; ``logged``
    says whether scalars are written at this step (``layer_norms``/``group_norms`` are then set).
    """

    step: int
    params: list[Tensor]
    per_tensor: Tensor
    per_tensor_host: list[float]
    norm: float
    loss: float | None
    layer_norms: dict[str, float] | None
    group_norms: list[float] | None
    optimizer_index: int = 0
    logged: bool = False
    skipped: bool = False
    loss_scale: float | None = None


def active_scaler(trainer: Any) -> Any:
    """The enabled ``GradScaler`` of the run's precision plugin (fp16 mixed precision), or None."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    return scaler


def optimizer_params_with_grad(optimizer: Any) -> tuple[list[Tensor], list[int]]:
    """The optimizer's parameters that have a gradient this step, and each one's group index."""
    params, groups = [], []
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if p.grad is not None:
                params.append(p)
                groups.append(gi)
    return params, groups


def optimizer_index(trainer: Any, optimizer: Any) -> int:
    """The position of ``optimizer`` in ``trainer.optimizers`` (0 when it is not found there)."""
    for i, candidate in enumerate(getattr(trainer, "optimizers", ()) or ()):
        if candidate is optimizer or getattr(candidate, "optimizer", None) is optimizer:
            return i
    return 0


try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = None

SHARDING_STRATEGIES = ("FSDPStrategy",)  # each rank's optimizer holds shards of flat parameters


def local_gradients(grads: list[Tensor], strategy: Any) -> tuple[list[Tensor], bool]:
    """This rank's part of each gradient, and whether the parts are shards of a larger gradient.

    Plain DDP gradients are replicated (every rank has the whole, averaged gradient): their norms
    are local. FSDP gradients and sharded ``DTensor`` gradients (``ModelParallelStrategy``) are
    split across ranks: their norms need one all-reduce of squared local norms
    (:func:`~healthmon.numerics.gradients.reduce_sharded_norms`).
    """
    sharded = type(strategy).__name__ in SHARDING_STRATEGIES
    if DTensor is None or not any(isinstance(g, DTensor) for g in grads):
        return grads, sharded
    local = []
    for g in grads:
        if isinstance(g, DTensor):
            sharded = sharded or any(p.is_shard() for p in g.placements)
            g = g.to_local()
        local.append(g)
    return local, sharded


class Hub:
    """Shared alerting, logging and step statistics for a set of monitors."""

    def __init__(
        self,
        policy: AlertPolicy,
        *,
        log_every_n_steps: int | None = None,
        write_report: bool = True,
        print_summary: bool = True,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.policy = policy
        self.log_every_n_steps = log_every_n_steps
        self.write_report = write_report
        self.print_summary = print_summary
        self.config: dict[str, Any] = dict(config or {})
        self.book = AlertBook()
        self.sink: TensorBoardSink | None = None
        self.log_dir: str | None = None
        self.report_path: str | None = None
        self.crash_path: str | None = None
        self.params: ParamIndex | None = None
        self.scaler: Any = None
        self.amp_skipped_steps = 0
        self.layout: dict[str, dict[str, list[Any]]] = {}
        self.last: dict[str, float] = {}
        self.stop_requested = False
        self._escalation: Alert | None = None
        self._unsent: list[Alert] = []
        self._loss_sum: Tensor | None = None
        self._grad_cache: dict[int, GradStep] = {}
        self._deferred: list[tuple[Tensor, Callable[[list[float]], None]]] = []
        self._cache_step = -1
        self._last_logged: dict[int, int] = {}
        self.step_now: int | None = None
        self._started_at = 0.0
        self._finished = False

    # ---- lifecycle -------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        """Resolve where to write and index the parameters; called once per fit/validate run."""
        self.params = ParamIndex(pl_module)
        self.scaler = active_scaler(trainer)
        self._loss_sum = None
        self._last_logged.clear()
        self._finished = False
        self.stop_requested = False
        self._started_at = time.time()
        if trainer.is_global_zero and self.sink is None:
            self.sink = TensorBoardSink(trainer)
            self.log_dir = self.sink.log_dir
            self.report_path = os.path.join(self.log_dir, REPORT_NAME)

    def start(self, trainer: Any) -> None:
        """Write the custom-scalars layout and the configuration (TEXT tab), once per fit."""
        if self.sink is not None:
            self.sink.layout(self.layout)
            config = json.dumps(self.config, indent=2, default=str)
            self.sink.text(CONFIG_TAG, "healthmon configuration:\n\n    " + config.replace("\n", "\n    "), 0)
            self.sink.flush()

    def finish(self, trainer: Any, status: str, error: BaseException | None = None) -> None:
        """Write the report and print the summary (rank zero), once per fit."""
        if self._finished:
            return
        self._finished = True
        self.flush_deferred()
        if self.sink is None:
            return
        self.sink.flush()
        if self.write_report and self.report_path is not None:
            write_json_atomic(self.report_path, self._report(trainer, status, error))
        if self.print_summary:
            print_summary(self.book.alerts, log_dir=self.log_dir, report_path=self.report_path)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None

    def _report(self, trainer: Any, status: str, error: BaseException | None) -> dict[str, Any]:
        import healthmon

        run = {
            "status": status,
            "global_step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "started": self._started_at,
            "finished": time.time(),
            "precision": str(getattr(trainer, "precision", "")),
            "world_size": int(trainer.world_size),
            "strategy": type(trainer.strategy).__name__,
            "log_dir": self.log_dir,
            "versions": {
                "healthmon": healthmon.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
        if error is not None:
            run["error"] = f"{type(error).__name__}: {error}"
        return build_report(
            run=run, config=self.config, alerts=self.book.alerts, dropped=self.book.dropped, last=self.last
        )

    # ---- per-step state --------------------------------------------------------------------
    def global_step(self, trainer: Any) -> int:
        """The trainer's global step; read once per hook while a bundle dispatches one.

        Lightning's ``global_step`` walks five objects; the monitors ask for it a dozen times a
        step, so ``HealthMonitor`` sets :attr:`step_now` for the duration of each per-step hook.
        """
        step = self.step_now
        return int(trainer.global_step) if step is None else step

    def is_log_step(self, trainer: Any, optimizer_index: int | None = None) -> bool:
        """Whether scalars are written at this step.

        Every ``log_every_n_steps`` global steps; with ``optimizer_index``, also when that
        optimizer has not logged for that many steps (under manual optimisation each optimizer
        step is a global step, so a second optimizer may never step on a multiple).
        """
        every = self.log_every_n_steps or max(int(getattr(trainer, "log_every_n_steps", 50)), 1)
        step = self.global_step(trainer)
        if optimizer_index is None:
            return step % every == 0
        last = self._last_logged.get(optimizer_index)
        if step % every == 0 or last is None or step - last >= every:
            self._last_logged[optimizer_index] = step
            return True
        return False

    def add_loss(self, loss: Tensor) -> None:
        """Accumulate the (accumulation-normalised) loss handed to backward; no host sync.

        Lightning calls ``on_before_backward`` with the loss already multiplied by the
        ``GradScaler``'s scale (fp16 mixed precision); dividing by the scale tensor on the device
        gives back the loss ``training_step`` returned (exactly: the scale is a power of two).
        """
        loss = loss.detach().float()
        scale = getattr(self.scaler, "_scale", None) if self.scaler is not None else None
        if isinstance(scale, Tensor):
            loss = loss / scale.to(loss.device)
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def grad_step(self, trainer: Any, optimizer: Any) -> GradStep:
        """Gradient statistics of this optimizer step, computed once and shared.

        One fused norm kernel and one host synchronisation, which fetches the per-tensor norms,
        the loss and any deferred values together; the global, per-layer and per-group norms
        are then sums of squares on the host (no further kernels).
        """
        step = self.global_step(trainer)
        if step != self._cache_step:
            self._grad_cache.clear()
            self._cache_step = step
        cached = self._grad_cache.get(id(optimizer))
        if cached is not None:
            return cached
        params, groups = optimizer_params_with_grad(optimizer)
        grads, sharded = local_gradients([p.grad for p in params], trainer.strategy)
        per_tensor = tensor_norms(grads)
        if sharded:
            per_tensor = reduce_sharded_norms(per_tensor)
        device, dtype = per_tensor.device, per_tensor.dtype
        loss = self._loss_sum
        parts = [per_tensor] if loss is None else [per_tensor, loss.to(device=device, dtype=dtype).reshape(1)]
        scale = getattr(self.scaler, "_scale", None) if self.scaler is not None else None
        if isinstance(scale, Tensor):
            parts.append(scale.detach().to(device=device, dtype=dtype).reshape(1))
        deferred, self._deferred = self._deferred, []
        parts.extend(t.detach().reshape(-1).to(device=device, dtype=dtype) for t, _ in deferred)
        host = (torch.cat(parts) if len(parts) > 1 else parts[0]).tolist()  # the one host sync
        end = len(host)
        for t, callback in reversed(deferred):
            start = end - t.numel()
            callback(host[start:end])
            end = start
        norms = host[: len(params)]
        index = optimizer_index(trainer, optimizer)
        norm = combined_norm(norms)  # = the norm of the concatenated gradient
        # The scaler skips the step exactly when the unscaled gradients hold NaN/Inf.
        skipped = self.scaler is not None and not math.isfinite(norm)
        self.amp_skipped_steps += int(skipped)
        layer_norms = group_norms = None
        logged = self.is_log_step(trainer, index)
        if logged and self.params is not None and params:
            layers = [self.params.layers[self.params.layer_of.get(id(p), 0)] for p in params]
            layer_norms = combined_norms_by_group(norms, layers)  # type: ignore[assignment]
            by_group = combined_norms_by_group(norms, groups)
            group_norms = [by_group.get(g, 0.0) for g in range(len(optimizer.param_groups))]
        result = GradStep(
            step=step,
            params=params,
            per_tensor=per_tensor,
            per_tensor_host=norms,
            norm=norm,
            loss=None if loss is None else host[len(params)],
            layer_norms=layer_norms,
            group_norms=group_norms,
            optimizer_index=index,
            logged=logged,
            skipped=skipped,
            loss_scale=host[len(params) + (loss is not None)] if isinstance(scale, Tensor) else None,
        )
        self._grad_cache[id(optimizer)] = result
        return result

    def defer(self, values: Tensor, callback: Callable[[list[float]], None]) -> None:
        """Fetch device ``values`` with the next step's synchronisation and hand them to ``callback``.

        Lets a monitor log numbers computed after the optimizer step (update ratios, clipped norms)
        without a synchronisation of its own.
        """
        self._deferred.append((values, callback))

    def flush_deferred(self) -> None:
        """Fetch what is still deferred (end of training)."""
        deferred, self._deferred = self._deferred, []
        for values, callback in deferred:
            callback(values.detach().reshape(-1).float().tolist())

    def end_step(self) -> None:
        """Forget the accumulated loss: called by the driving callback once every monitor has
        seen this optimizer step (end of ``on_before_optimizer_step``), so that the next
        optimizer step, of the same or of another optimizer, gets only its own loss."""
        self._loss_sum = None

    # ---- output ----------------------------------------------------------------------------
    def log(self, trainer: Any, values: Mapping[str, float], step: int | None = None) -> None:
        """Write scalars (rank zero) and remember the last value of each tag for the report."""
        if not values:
            return
        clean = {k: float(v) for k, v in values.items()}
        self.last.update(clean)
        if self.sink is not None:
            self.sink.scalars(clean, trainer.global_step if step is None else step)

    def declare_layout(self, category: str, charts: Mapping[str, list[str]]) -> None:
        """Add charts to the custom-scalars layout: {title: [tags on one chart]}."""
        section = self.layout.setdefault(category, {})
        for title, tags in charts.items():
            section[title] = ["Multiline", list(tags)]

    def alert(
        self,
        trainer: Any,
        code: str,
        message: str,
        *,
        where: str | None = None,
        hint: str | None = None,
        severity: str | None = None,
        value: float | None = None,
        step: int | None = None,
    ) -> Alert:
        """Record an alert; warn on the first occurrence; raise or stop as the policy says.

        ``step`` is the step the alert is about when it is judged later (deferred values).
        """
        alert = make_alert(
            code,
            int(trainer.global_step) if step is None else step,
            message,
            where=where,
            hint=hint,
            severity=severity,
            value=value,  # type: ignore[arg-type]
        )
        return self._record(alert)

    def _record(self, alert: Alert) -> Alert:
        new = self.book.record(alert)
        if new is not None:
            self._unsent.append(new)
            rank_zero_warn(f"healthmon: {alert.line()} Hint: {alert.hint}", category=HealthWarning)
            if self.sink is not None:
                self.sink.text(ALERT_TEXT_TAG, _alert_markdown(alert), alert.step)
                self.sink.text(ALERT_RECORD_TAG, json.dumps(alert.to_dict()), alert.step)
        if self._escalation is None and self.policy.escalates(alert):
            self._escalation = new or alert
        return new or alert

    def enforce_policy(self, trainer: Any, optimizer: Any = None) -> None:
        """Act on an alert that the policy escalates: raise, or stop without applying the step.

        Called at fixed points of every step (end of ``on_before_optimizer_step`` and of
        ``on_train_batch_end``) so that, under DDP, all ranks agree through one boolean
        all-reduce and stop or raise together instead of hanging in the next collective.
        Under ``stop`` the gradients of ``optimizer`` are dropped (set to None): torch optimizers
        skip parameters without a gradient, so the weights keep their last healthy values.
        """
        if self.policy.on_alert == "warn":
            return
        decision = self._escalation is not None
        if trainer.world_size > 1:
            decision = bool(trainer.strategy.reduce_boolean_decision(decision, all=False))
        if not decision:
            return
        alert = self._escalation or make_alert(
            "monitor.skipped",
            int(trainer.global_step),
            "Another rank raised an alert that stops the run.",
            severity=self.policy.fail_on,  # type: ignore[arg-type]
        )
        if self.policy.on_alert == "raise":
            self._escalation = None
            raise NumericalHealthError(alert)
        self.stop_requested = True
        trainer.should_stop = True
        if optimizer is not None:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def gather_alerts(self, trainer: Any) -> None:
        """Bring alerts first seen on other ranks to rank zero (call on every rank, same step)."""
        if trainer.world_size <= 1:
            self._unsent.clear()
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        mine = [a.to_dict() for a in self._unsent]
        self._unsent.clear()
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if not trainer.is_global_zero:
            return
        for rank, alerts in enumerate(gathered):
            if rank == dist.get_rank():
                continue
            for data in alerts or []:
                remote = Alert.from_dict(data)
                remote.message = f"{remote.message} [rank {rank}]"
                self._record(remote)
        self._unsent.clear()

    def write_crash_record(self, trainer: Any, record: Mapping[str, Any]) -> str | None:
        """A small JSON file beside the report to reproduce a failure (rank zero)."""
        if self.log_dir is None:
            return None
        self.crash_path = os.path.join(self.log_dir, CRASH_NAME)
        write_json_atomic(self.crash_path, dict(record))
        return self.crash_path

    # ---- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "alerts": self.book.state_dict(),
            "last": dict(self.last),
            "amp_skipped_steps": self.amp_skipped_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.book.load_state_dict(state.get("alerts", {}))
        self.last.update(state.get("last", {}))
        self.amp_skipped_steps = int(state.get("amp_skipped_steps", 0))


class HealthWarning(UserWarning):
    """The warning category of healthmon alerts (filter it with ``warnings.filterwarnings``)."""


def _alert_markdown(alert: Alert) -> str:
    where = f" at `{alert.where}`" if alert.where else ""
    head = f"**{alert.severity}** `{alert.code}` step {alert.step}{where}"
    return f"{head}: {alert.message}  \n*Fix:* {alert.hint}"
