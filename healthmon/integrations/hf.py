"""Hugging Face ``Trainer``: a ``TrainerCallback`` that drives healthmon's one driver.

``Trainer(..., callbacks=[HFHealthCallback()])`` and nothing else changed. The callback reads the
run from the ``Trainer``'s state and arguments (:class:`HFRun`) and maps its events onto the
driver's hook sequence; the monitors are the very ones ``HealthMonitor`` runs under Lightning.

How the Trainer's events become the driver's points (transformers 5.x):

* ``on_train_begin`` -> ``setup`` + ``start``;
* each micro-batch: the model's first training forward after the previous micro-batch ended
  (a forward pre-hook, which also keeps the inputs so that replays can run ``model(**inputs)``)
  -> ``batch_start``; the loss the model returns (``outputs.loss``, a forward hook), divided by
  the micro-batches of the step as the Trainer does before ``backward`` -> ``before_backward``;
  ``on_substep_end`` (every micro-batch but the last) -> ``batch_end``;
* ``on_pre_optimizer_step`` -> ``before_optimizer_step``, then ``on_step_end`` -> ``batch_end``;
* ``on_train_end`` -> ``train_end``, ``end``, ``teardown``.

Clipping: the Trainer clips (``max_grad_norm``) *before* ``on_pre_optimizer_step``. So that the
monitors measure the gradient before clipping, as they do everywhere else, the callback clips in
the Trainer's place: it sets ``args.max_grad_norm`` to 0 for the fit (the Trainer then only
unscales and measures the norm it logs as ``grad_norm``) and calls the same
``torch.nn.utils.clip_grad_norm_`` right after the monitors, so the weights are bit-identical.
Under DeepSpeed, FSDP or XLA, which clip in their own way, it leaves clipping alone: the monitors
then see clipped gradients and the Trainer's pre-clip ``grad_norm`` is logged as
``healthmon/grad/norm_preclip``.

The Trainer has no exception event: an error healthmon raises itself (``on_alert="raise"``)
writes the report before it propagates; for any other exception the report is written, with
status "exception", when the same callback starts its next fit or at interpreter exit.

``transformers`` is imported here only: ``import healthmon`` never loads it.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback

from healthmon import tags
from healthmon.alerts import OnAlert, Severity
from healthmon.engine.driver import Driver
from healthmon.engine.isolation import isolated
from healthmon.engine.run import Run, loss_of
from healthmon.engine.step_stats import scale_tensor
from healthmon.engine.writer import Writer
from healthmon.monitors.base import Monitor
from healthmon.monitors.bundle import BundleResults, bundle_config, bundle_driver
from healthmon.schedules import DEFAULT_OVERHEAD_BUDGET

#: The Trainer's pre-clip gradient norm (from its logs), when the monitors see clipped gradients.
TAG_NORM_PRECLIP = tags.GRAD_NORM_PRECLIP
#: Accelerate's distributed types that clip gradients their own way (the callback leaves them).
OWN_CLIPPING = ("DEEPSPEED", "FSDP", "XLA", "MEGATRON_LM")
#: A model input the Trainer adds for the loss normalisation; not part of the batch.
NUM_ITEMS = "num_items_in_batch"


def distributed_type() -> str:
    """Accelerate's distributed type of this process ("NO" when accelerate has no state)."""
    try:
        from accelerate.state import AcceleratorState

        return str(getattr(AcceleratorState().distributed_type, "name", "NO"))
    except Exception:  # accelerate missing or not initialised
        return "NO"


def precision_of(args: Any) -> str:
    """The precision setting in Lightning's words, for the report."""
    if getattr(args, "fp16", False):
        return "16-mixed"
    if getattr(args, "bf16", False):
        return "bf16-mixed"
    return "32-true"


class HFRun(Run):
    """A :class:`Run` read from the Hugging Face ``Trainer``'s arguments, state and callback kwargs.

    Args:
        args: the ``TrainingArguments``.
        state: the ``TrainerState`` (step, planned steps, logging cadence).
        control: the ``TrainerControl`` (``should_training_stop`` for the stop policy).
        model: the model being trained.
        optimizer: the Trainer's optimizer (accelerate's wrapper: its ``optimizer`` and ``scaler``).
        train_dataloader: the training dataloader (its length: micro-batches per epoch).
        log_dir: where the TensorBoard events and the report go.
    """

    def __init__(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: torch.nn.Module,
        optimizer: Any,
        train_dataloader: Any,
        log_dir: str,
    ) -> None:
        super().__init__(model, [getattr(optimizer, "optimizer", optimizer)] if optimizer is not None else [])
        self.control = control
        self.log_dir = log_dir
        self.world_size = max(int(getattr(args, "world_size", 1)), 1)
        self.is_global_zero = bool(getattr(state, "is_world_process_zero", True))
        self.accumulate_grad_batches = max(int(args.gradient_accumulation_steps), 1)
        self.log_every_n_steps = max(int(getattr(state, "logging_steps", 0) or args.logging_steps or 50), 1)
        try:
            self.batches_per_epoch = float(len(train_dataloader))
        except TypeError:  # streamed
            self.batches_per_epoch = math.inf
        self.total_steps = float(state.max_steps) if getattr(state, "max_steps", 0) > 0 else math.inf
        scaler = getattr(optimizer, "scaler", None)
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.precision = precision_of(args)
        kind = distributed_type()
        self.strategy = "single_device" if kind == "NO" else kind.lower()
        self.clips_gradients = float(args.max_grad_norm or 0) > 0
        self.inputs_seen = False  # a training forward was observed (replays need its inputs)
        self.positional_inputs = False  # ... called with positional arguments (not kept)
        self.model_loss = True  # the model returned the loss (replays compute it the same way)
        self.refresh(state, control)

    def refresh(self, state: Any, control: Any) -> None:
        """Read the step and epoch, and keep the latest ``control`` (the Trainer may replace it)."""
        self.global_step = int(state.global_step)
        self.current_epoch = int(state.epoch or 0)
        if control is not None:
            self.control = control

    def request_stop(self) -> None:
        """Ask the Trainer to end after this step (``control.should_training_stop``)."""
        super().request_stop()
        self.control.should_training_stop = True

    def loss_on(self, batch: Any, batch_idx: int) -> Tensor | None:
        """The model's own loss on ``batch`` (the inputs of a training forward): ``model(**batch).loss``."""
        loss = loss_of(self.model(**batch))
        return loss if isinstance(loss, Tensor) else None

    def replay_blocker(self) -> str | None:
        """Why the loss cannot be computed again from the kept keyword inputs, or None."""
        if self.positional_inputs:
            return "the model was called with positional inputs (healthmon keeps keyword inputs only)"
        if not self.inputs_seen:
            return "no training forward pass of the model was observed (its inputs are unknown)"
        if not self.model_loss:
            return (
                "the model returns no loss (the Trainer computes it outside the model: "
                "compute_loss_func, a compute_loss override or label smoothing)"
            )
        return None

    @contextlib.contextmanager
    def replay_context(self) -> Iterator[None]:
        """Replays run with RNGs, module state, gradients and logging restored (:func:`isolated`).

        accelerate wraps the model's forward in the run's autocast: ``model(**batch)`` uses it.
        """
        with isolated(self.model):
            yield

    def open_writer(self) -> Writer | None:
        """A TensorBoard writer into this run's ``log_dir``."""
        from healthmon.sinks.tensorboard import TensorBoardSink

        return TensorBoardSink.standalone(self.log_dir)


class HFHealthCallback(BundleResults, TrainerCallback):
    """Watch a Hugging Face ``Trainer`` run's numerical health with healthmon's default monitors.

    ``Trainer(..., callbacks=[HFHealthCallback()])``. The arguments are ``HealthMonitor``'s.

    Args:
        on_alert: "warn" records and warns; "raise" raises ``NumericalHealthError`` out of
            ``trainer.train()`` at the first alert at or above ``fail_on``; "stop" drops the
            offending optimizer step and sets ``control.should_training_stop``.
        fail_on: lowest severity that raises or stops ("info", "warning" or "error").
        monitors: the monitors to run; default ``default_monitors()``.
        log_every_n_steps: how often scalars are written; None follows ``logging_steps``.
        overhead_budget: the share of the step time the checks may take (default 0.01); see
            :class:`~healthmon.monitors.health.HealthMonitor`.
        report: write the JSON report beside the event files at the end of training.
        summary: print the end-of-training summary on the main process.
        log_dir: where healthmon's TensorBoard events and report go; default
            ``$TENSORBOARD_LOGGING_DIR`` when set (the Trainer's TensorBoard folder), else
            ``<output_dir>/healthmon``.
    """

    def __init__(
        self,
        *,
        on_alert: OnAlert = "warn",
        fail_on: Severity = "warning",
        monitors: Sequence[Monitor] | None = None,
        log_every_n_steps: int | None = None,
        overhead_budget: float | None = DEFAULT_OVERHEAD_BUDGET,
        report: bool = True,
        summary: bool = True,
        log_dir: str | None = None,
    ) -> None:
        self.driver: Driver = bundle_driver(
            on_alert=on_alert,
            fail_on=fail_on,
            monitors=monitors,
            log_every_n_steps=log_every_n_steps,
            overhead_budget=overhead_budget,
            report=report,
            summary=summary,
        )
        self.log_dir_arg = log_dir
        self.run: HFRun | None = None
        self._handles: list[Any] = []
        self._busy = False  # inside a driver call: forwards there are healthmon's replays
        self._in_step = False
        self._micro_open = False  # a micro-batch began (its forward was seen) and has not ended
        self._awaiting_loss = False
        self._batch: Any = None
        self._batch_idx = -1
        self._epoch_batch = 0  # micro-batches seen in this epoch
        self._loss_normalised = False  # the Trainer passed num_items_in_batch: the loss is already /GA
        self._saved_max_grad_norm: float | None = None
        self._clip_norm = 0.0
        self._args: Any = None
        atexit.register(_finish_at_exit, weakref.ref(self))

    # ---- public --------------------------------------------------------------------------

    # ---- driver calls -------------------------------------------------------------------------
    def _call(self, point: Callable[..., None], *args: Any) -> None:
        """Call one point of the driver; an exception (the raise policy) finishes the run first."""
        self._busy = True
        try:
            point(*args)
        except BaseException as error:
            self._busy = False
            self._finish(error)
            raise
        finally:
            self._busy = False

    def _refresh(self, state: Any, control: Any) -> HFRun | None:
        if self.run is not None:
            self.run.refresh(state, control)
        return self.run

    # ---- Trainer events -----------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """A fit begins: build the run, hook the model's forward and set up the driver."""
        if self.run is not None:  # the previous fit ended by an exception the Trainer has no event for
            self._finish(RuntimeError("training ended by an exception (the Trainer reported no end)"))
        import os

        model = kwargs.get("model")
        if model is None:
            return control
        log_dir = (
            self.log_dir_arg
            or os.environ.get("TENSORBOARD_LOGGING_DIR")
            or os.path.join(args.output_dir, "healthmon")
        )
        self._args = args
        run = HFRun(
            args, state, control, model, kwargs.get("optimizer"), kwargs.get("train_dataloader"), log_dir
        )
        self.run = run
        self._take_over_clipping(args)
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]
        self._epoch_batch, self._in_step, self._micro_open, self._awaiting_loss = 0, False, False, False
        self.driver.config.update(bundle_config(self.driver))
        self._call(self.driver.setup, run)
        self._call(self.driver.start, run)
        return control

    def _take_over_clipping(self, args: Any) -> None:
        """Clip after the monitors instead of before them (see the module docstring)."""
        assert self.run is not None
        max_norm = float(args.max_grad_norm or 0)
        self.run.clip_norm = max_norm if max_norm > 0 else None  # the sharpness test scales by it
        if max_norm > 0 and distributed_type() not in OWN_CLIPPING:
            self._saved_max_grad_norm, self._clip_norm = args.max_grad_norm, max_norm
            args.max_grad_norm = 0.0
        else:  # the Trainer clips before on_pre_optimizer_step: nothing clips after the monitors
            self._clip_norm = 0.0
            self.run.clips_gradients = False

    def _restore_clipping(self) -> None:
        if self._saved_max_grad_norm is not None and self._args is not None:
            self._args.max_grad_norm = self._saved_max_grad_norm
        self._saved_max_grad_norm = None

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """A new epoch: micro-batches are counted from zero again."""
        self._epoch_batch = 0
        return control

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """The micro-batches of an optimizer step begin."""
        if self._refresh(state, control) is not None:
            self._in_step = True
        return control

    def _micro_batches(self) -> int:
        """Micro-batches of this optimizer step: the Trainer's divisor (fewer at an epoch's end)."""
        assert self.run is not None
        every = self.run.accumulate_grad_batches
        start = self._batch_idx - self._batch_idx % every
        remaining = self.run.batches_per_epoch - start
        return int(min(every, remaining)) if remaining > 0 else every

    def _before_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        run = self.run
        if run is None or self._busy or not self._in_step or self._micro_open:
            return
        if not module.training or not torch.is_grad_enabled():
            return
        self._micro_open, self._awaiting_loss = True, True
        self._loss_normalised = kwargs.get(NUM_ITEMS) is not None
        self._batch = {k: v for k, v in kwargs.items() if k != NUM_ITEMS}
        run.inputs_seen = True
        run.positional_inputs = run.positional_inputs or bool(args)
        self._batch_idx = self._epoch_batch
        self._epoch_batch += 1
        self._call(self.driver.batch_start, run, self._batch, self._batch_idx)

    def _after_forward(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        run = self.run
        if run is None or self._busy or not self._awaiting_loss:
            return
        self._awaiting_loss = False
        loss = loss_of(output) if not isinstance(output, tuple) else None
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            run.model_loss = False
            return
        handed = loss.detach().float()
        if not self._loss_normalised and (micro_batches := self._micro_batches()) > 1:
            handed = handed / micro_batches  # (a division by one, exact, would cost a tensor op)
        scale = scale_tensor(run.scaler)
        if scale is not None:  # the loss reaching backward is scaled under fp16 AMP
            handed = handed * scale.to(handed.device)
        self._call(self.driver.before_backward, run, handed)

    def _end_micro_batch(self) -> None:
        run = self.run
        if run is None or not self._micro_open:
            return
        self._micro_open, self._awaiting_loss = False, False
        batch, self._batch = self._batch, None
        self._call(self.driver.batch_end, run, batch, self._batch_idx)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """A micro-batch that accumulates gradients (no optimizer step) ended."""
        if self._refresh(state, control) is not None:
            self._end_micro_batch()
        return control

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Gradients are complete: the monitors' main check, then the clipping healthmon took over."""
        run = self._refresh(state, control)
        if run is None:
            return control
        for optimizer in run.optimizers:
            self._call(self.driver.before_optimizer_step, run, optimizer)
        if self._clip_norm > 0:  # the Trainer's own clipping, after the monitors measured
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), self._clip_norm)
        return run.control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """The optimizer step ended: close its last micro-batch."""
        run = self._refresh(state, control)
        if run is None:
            return control
        self._end_micro_batch()
        self._in_step = False
        return run.control

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
        """Keep the Trainer's pre-clip gradient norm when the monitors saw clipped gradients."""
        run = self._refresh(state, control)
        norm = (logs or {}).get("grad_norm")
        # the monitors saw clipped gradients (clipping left to the Trainer): keep its pre-clip norm,
        # at the step whose gradients it measured (the Trainer logs after counting the step)
        if (
            run is not None
            and not run.clips_gradients
            and float(args.max_grad_norm or 0) > 0
            and isinstance(norm, (int, float))
        ):
            step = max(int(state.global_step) - 1, 0)
            self.driver.log(run, {TAG_NORM_PRECLIP: float(norm)}, step=step)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Training ended: the monitors conclude, the report is written and the hooks are removed."""
        run = self._refresh(state, control)
        if run is None:
            return control
        self._in_step = False
        self._call(self.driver.train_end, run)
        self._finish(None)
        return control

    # ---- the end of a fit -----------------------------------------------------------------------
    def _finish(self, error: BaseException | None) -> None:
        """Write the report and release hooks, writer and the clipping setting (once per fit)."""
        run, self.run = self.run, None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._restore_clipping()
        if run is None:
            return
        self._busy = True
        try:
            self.driver.end(run, error)
        finally:
            self.driver.teardown(run)
            self._busy = False

    def close(self, error: BaseException | None = None) -> None:
        """End the current fit by hand (after an exception out of ``trainer.train()``)."""
        self._finish(error)


def _finish_at_exit(ref: weakref.ReferenceType[HFHealthCallback]) -> None:
    """At interpreter exit, write the report of a fit that an exception ended."""
    callback = ref()
    if callback is not None and callback.run is not None:
        error = getattr(sys, "last_value", None) or RuntimeError("the process exited during training")
        with contextlib.suppress(Exception):
            callback.close(error)
