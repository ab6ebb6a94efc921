"""Write scalars, histograms, text and the custom-scalars layout to TensorBoard.

healthmon writes into the Trainer's own event files when it has a ``TensorBoardLogger`` (so its
charts sit beside the user's metrics), else into its own ``SummaryWriter`` under
``default_root_dir/healthmon``. Other loggers (CSV, W&B, MLflow...) receive the scalars through
their ``log_metrics``. Only global rank zero writes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor

OWN_DIR = "healthmon"


def is_tensorboard_logger(logger: Any) -> bool:
    """True for Lightning's TensorBoardLogger from either `pytorch_lightning` or `lightning`."""
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__)


class TensorBoardSink:
    """The writer for one fit. Create it on global rank zero only."""

    def __init__(self, trainer: Any) -> None:
        self.writer: Any = None
        self.owns_writer = False
        self.other_loggers: list[Any] = []
        self.log_dir: str
        for logger in trainer.loggers:
            if self.writer is None and is_tensorboard_logger(logger):
                self.writer = logger.experiment
                self.log_dir = logger.log_dir
            else:
                self.other_loggers.append(logger)
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir = os.path.join(trainer.default_root_dir, OWN_DIR)
            self.writer = SummaryWriter(log_dir=self.log_dir)
            self.owns_writer = True
        os.makedirs(self.log_dir, exist_ok=True)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        for logger in self.other_loggers:
            logger.log_metrics(dict(values), step)

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def layout(self, layout: Mapping[str, Mapping[str, list[Any]]]) -> None:
        """Custom-scalars layout: {category: {chart title: ["Multiline", [tags...]]}}."""
        if layout:
            self.writer.add_custom_scalars({k: dict(v) for k, v in layout.items()})

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.flush()
        if self.owns_writer:
            self.writer.close()
