"""Lightning: the Trainer's callback hooks drive healthmon's driver.

:class:`LightningRun` reads what monitors need from the ``Trainer`` (step, optimizers, ranks, the
``GradScaler`` of fp16 mixed precision, the logger) and replays ``training_step`` for the monitors
that need the loss of a batch again. :class:`LightningHooks` maps each callback hook to one point of
the driver's hook sequence; ``HealthMonitor`` and every monitor used on its own are such callbacks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from healthmon.engine.driver import Driver
from healthmon.engine.isolation import isolated, replay_blocker
from healthmon.engine.run import Run, loss_of
from healthmon.engine.writer import Writer

#: Strategies whose optimizers hold shards of flat parameters: norms need an all-reduce.
SHARDING_STRATEGIES = ("FSDPStrategy",)


def active_scaler(trainer: Any) -> Any:
    """The enabled ``GradScaler`` of the run's precision plugin (fp16 mixed precision), or None."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    return scaler


def step_counter(trainer: Any, pl_module: torch.nn.Module) -> Any | None:
    """The fit loop's progress record whose ``completed`` is ``trainer.global_step``, or None.

    ``trainer.global_step`` walks five objects and a property at each read; the record is updated
    in place (also when a checkpoint restores the loop), so reading it is the same number at a
    fraction of the cost. None where this Lightning keeps the count elsewhere.
    """
    try:
        loop = trainer.fit_loop.epoch_loop
        if getattr(pl_module, "automatic_optimization", True):
            counter = loop.automatic_optimization.optim_progress.optimizer.step.total
        else:
            counter = loop.manual_optimization.optim_step_progress.total
        if int(counter.completed) == int(trainer.global_step):
            return counter
    except (AttributeError, TypeError, ValueError):
        pass
    return None


class LightningRun(Run):
    """A :class:`Run` read from a Lightning ``Trainer`` and ``LightningModule``."""

    def __init__(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        super().__init__(pl_module)
        self.trainer = trainer
        self.world_size = int(trainer.world_size)
        self.is_global_zero = bool(trainer.is_global_zero)
        self.accumulate_grad_batches = max(int(getattr(trainer, "accumulate_grad_batches", 1)), 1)
        self.log_every_n_steps = max(int(getattr(trainer, "log_every_n_steps", 50)), 1)
        self.batches_per_epoch = float(getattr(trainer, "num_training_batches", math.inf))
        self.scaler = active_scaler(trainer)
        self.precision = str(getattr(trainer, "precision", ""))
        self.strategy = type(trainer.strategy).__name__
        self.automatic_optimization = bool(getattr(pl_module, "automatic_optimization", True))
        self.clips_gradients = bool(trainer.gradient_clip_val) if self.automatic_optimization else False
        by_norm = getattr(trainer, "gradient_clip_algorithm", "norm") in (None, "norm")
        self.clip_norm = float(trainer.gradient_clip_val) if self.clips_gradients and by_norm else None
        self._counter = step_counter(trainer, pl_module)
        self.refresh()

    def refresh(self) -> None:
        """Read the step, once per hook (one attribute of the fit loop's progress record)."""
        counter = self._counter
        self.global_step = int(counter.completed if counter is not None else self.trainer.global_step)

    @property  # read when needed (report, crash record), not at every hook
    def current_epoch(self) -> int:
        """The trainer's epoch."""
        return int(self.trainer.current_epoch)

    @current_epoch.setter
    def current_epoch(self, value: int) -> None:
        pass  # read from the trainer

    @property
    def optimizers(self) -> list[Any]:
        """The trainer's optimizers, read from the trainer at each access."""
        return list(getattr(self.trainer, "optimizers", None) or [])

    @optimizers.setter
    def optimizers(self, value: list[Any]) -> None:
        pass  # read from the trainer

    @property
    def total_steps(self) -> float:
        """The trainer's estimate of the fit's optimizer steps (inf when it has none)."""
        try:
            return float(self.trainer.estimated_stepping_batches)
        except Exception:  # not available outside fit
            return math.inf

    @total_steps.setter
    def total_steps(self, value: float) -> None:
        pass  # read from the trainer

    @override
    def request_stop(self) -> None:
        super().request_stop()
        self.trainer.should_stop = True

    @property
    @override
    def root_device(self) -> torch.device:
        return self.trainer.strategy.root_device

    @override
    def any_rank(self, flag: bool) -> bool:
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=False))

    @override
    def max_over_ranks(self, value: int) -> int:
        if self.world_size <= 1:
            return value
        proposal = torch.tensor([float(value)], device=self.root_device)
        return int(self.trainer.strategy.reduce(proposal, reduce_op="max").item())

    @override
    def local_gradients(self, grads: list[Tensor]) -> tuple[list[Tensor], bool]:
        local, sharded = super().local_gradients(grads)
        return local, sharded or self.strategy in SHARDING_STRATEGIES

    @override
    def loss_on(self, batch: Any, batch_idx: int) -> Tensor | None:
        # the model is the LightningModule; Run types it as a plain nn.Module
        return loss_of(self.model.training_step(batch, batch_idx))  # type: ignore[operator]

    @override
    def replay_blocker(self) -> str | None:
        return replay_blocker(self.model)

    @contextlib.contextmanager
    @override
    def replay_context(self) -> Iterator[None]:
        with isolated(self.model), self.trainer.precision_plugin.train_step_context():
            yield

    @override
    def open_writer(self) -> Writer | None:
        from healthmon.sinks.tensorboard import TensorBoardSink

        return TensorBoardSink(self.trainer)


class LightningHooks(Callback):
    """Lightning hooks that drive a :class:`Driver`; subclasses say which one, in :meth:`attach`.

    ``attach`` returns the driver this callback drives, or None when another callback drives it
    (the monitors of one Trainer share one driver, so that a run has one report).
    """

    _lightning_driver: Driver | None = None
    _lightning_run: LightningRun | None = None

    @property
    def drives(self) -> bool:
        """Whether this callback drives its driver for the current fit."""
        return self._lightning_driver is not None

    def attach(self, trainer: pl.Trainer) -> Driver | None:
        """The driver this callback drives for ``trainer`` (None: another callback drives it)."""
        raise NotImplementedError

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._lightning_driver = self.attach(trainer)
        if self._lightning_driver is not None:
            self._lightning_run = LightningRun(trainer, pl_module)
            self._lightning_driver.setup(self._lightning_run)

    def _step(self) -> tuple[Driver, LightningRun] | None:
        if self._lightning_driver is None or self._lightning_run is None:
            return None
        self._lightning_run.refresh()
        return self._lightning_driver, self._lightning_run

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (ctx := self._step()) is not None:
            ctx[0].start(ctx[1])

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        driver, run = self._lightning_driver, self._lightning_run  # the per-step hooks: inline
        if driver is not None and run is not None:
            run.refresh()
            driver.batch_start(run, batch, batch_idx)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        driver, run = self._lightning_driver, self._lightning_run
        if driver is not None and run is not None:
            run.refresh()
            driver.before_backward(run, loss)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        driver, run = self._lightning_driver, self._lightning_run
        if driver is not None and run is not None:
            run.refresh()
            driver.before_optimizer_step(run, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        driver, run = self._lightning_driver, self._lightning_run
        if driver is not None and run is not None:
            run.refresh()
            driver.batch_end(run, batch, batch_idx)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (ctx := self._step()) is not None:
            ctx[0].train_end(ctx[1])

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (ctx := self._step()) is not None:
            ctx[0].end(ctx[1])

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if (ctx := self._step()) is not None:
            ctx[0].end(ctx[1], exception)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if (ctx := self._step()) is not None:
            ctx[0].teardown(ctx[1])
        self._lightning_run = None
