"""Runs shared by the engine tests: a single-process loop writing real TensorBoard files to a folder."""

from __future__ import annotations

from typing import Any

import torch

from healthmon.engine.run import Run
from healthmon.monitors.base import Monitor
from healthmon.sinks.tensorboard import TensorBoardSink


class FolderRun(Run):
    """A single-process loop that writes TensorBoard files into one folder, logging every step."""

    def __init__(self, model: torch.nn.Module, optimizers: list[Any], folder: str) -> None:
        super().__init__(model, optimizers)
        self.folder = folder
        self.log_every_n_steps = 1

    def open_writer(self) -> Any:
        return TensorBoardSink.standalone(self.folder)


class PointRecorder(Monitor):
    """A monitor that records the points of the hook sequence the driver calls it at, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def on_setup(self, run: Run) -> None:
        self.calls.append("setup")

    def on_start(self, run: Run) -> None:
        self.calls.append("start")

    def on_batch_start(self, run: Run, batch: Any, batch_idx: int) -> None:
        self.calls.append("batch_start")

    def on_loss(self, run: Run, loss: torch.Tensor) -> None:
        self.calls.append("loss")

    def on_optimizer_step(self, run: Run, optimizer: Any) -> None:
        self.calls.append(f"optimizer_step@{run.global_step}")

    def on_batch_end(self, run: Run, batch: Any, batch_idx: int) -> None:
        self.calls.append("batch_end")

    def on_training_end(self, run: Run) -> None:
        self.calls.append("training_end")

    def on_end(self, run: Run, error: BaseException | None) -> None:
        self.calls.append("end" if error is None else "end:error")

    def on_teardown(self, run: Run) -> None:
        self.calls.append("teardown")
