"""Runs shared by the engine tests: a single-process loop writing real TensorBoard files to a folder."""

from __future__ import annotations

from typing import Any

import torch

from healthmon.engine.run import Run
from healthmon.sinks.tensorboard import TensorBoardSink


class FolderRun(Run):
    """A single-process loop that writes TensorBoard files into one folder, logging every step."""

    def __init__(self, model: torch.nn.Module, optimizers: list[Any], folder: str) -> None:
        super().__init__(model, optimizers)
        self.folder = folder
        self.log_every_n_steps = 1

    def open_writer(self) -> Any:
        return TensorBoardSink.standalone(self.folder)
