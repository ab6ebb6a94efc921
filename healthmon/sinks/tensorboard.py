"""Write scalars, histograms, text and the custom-scalars layout to TensorBoard.

healthmon writes into the Trainer's own event files when it has a ``TensorBoardLogger`` (so its
charts sit beside the user's metrics), else into its own ``SummaryWriter`` under
``default_root_dir/healthmon``. Other loggers (CSV, W&B, MLflow...) receive the scalars through
their ``log_metrics``. Outside Lightning (:func:`healthmon.watch`), :meth:`TensorBoardSink.standalone`
writes through the user's ``SummaryWriter`` or into a folder. Only global rank zero writes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter as TorchSummaryWriter

OWN_DIR = "healthmon"


def is_tensorboard_logger(logger: Any) -> bool:
    """True for Lightning's TensorBoardLogger from either `pytorch_lightning` or `lightning`."""
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__)


def writer_log_dir(writer: Any) -> str:
    """The folder a ``SummaryWriter`` (torch's or tensorboardX's) writes its event files into."""
    get = getattr(writer, "get_logdir", None)
    folder = get() if callable(get) else getattr(writer, "log_dir", None) or getattr(writer, "logdir", None)
    if not folder:
        raise ValueError(f"`writer`: expected a SummaryWriter with a log directory, got {writer!r}.")
    return os.fspath(folder)


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
            self.log_dir = os.path.join(trainer.default_root_dir, OWN_DIR)
            self.writer = TorchSummaryWriter(log_dir=self.log_dir)
            self.owns_writer = True
        os.makedirs(self.log_dir, exist_ok=True)

    @classmethod
    def standalone(cls, target: Any) -> TensorBoardSink:
        """A sink without a Trainer, through or into ``target``.

        ``target`` is a ``SummaryWriter`` the user holds (flushed, never closed, by healthmon), or the
        folder a new ``SummaryWriter`` writes to.
        """
        sink = cls.__new__(cls)
        sink.other_loggers = []
        if isinstance(target, (str, os.PathLike)):
            sink.log_dir = os.fspath(target)
            sink.writer = TorchSummaryWriter(log_dir=sink.log_dir)
            sink.owns_writer = True
        else:
            sink.writer = target
            sink.owns_writer = False
            sink.log_dir = writer_log_dir(target)
        os.makedirs(sink.log_dir, exist_ok=True)
        return sink

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """All values as one event (one protobuf, one queue put): ~10x cheaper than add_scalar per tag."""
        file_writer = self._file_writer()
        if file_writer is not None:
            summary = Summary(value=[Summary.Value(tag=t, simple_value=float(v)) for t, v in values.items()])
            file_writer.add_summary(summary, step)
        else:  # another writer implementation (tensorboardX): the public per-tag API
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        for logger in self.other_loggers:
            logger.log_metrics(dict(values), step)

    def _file_writer(self) -> Any:
        """Return the event writer of torch's SummaryWriter (it accepts tensorboard's own Summary protos)."""
        if not isinstance(self.writer, TorchSummaryWriter):
            return None
        return self.writer._get_file_writer()

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        """Finite values only: NaN/Inf cannot be binned (and would make TensorBoard raise)."""
        values = values.detach().float().cpu()
        values = values[values.isfinite()]
        if values.numel():
            self.writer.add_histogram(tag, values, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Write a text entry (markdown, in TensorBoard's TEXT tab)."""
        self.writer.add_text(tag, text, step)

    def layout(self, layout: Mapping[str, Mapping[str, list[Any]]]) -> None:
        """Custom-scalars layout: {category: {chart title: ["Multiline", [tags...]]}}."""
        if layout:
            self.writer.add_custom_scalars({k: dict(v) for k, v in layout.items()})

    def flush(self) -> None:
        """Write pending events to disk."""
        self.writer.flush()

    def close(self) -> None:
        """Flush, and close the writer if this sink opened it."""
        self.flush()
        if self.owns_writer:
            self.writer.close()
