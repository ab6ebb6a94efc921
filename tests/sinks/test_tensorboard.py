"""TensorBoardSink: the Trainer's TensorBoardLogger, its own writer otherwise, the user's SummaryWriter.

Everything is written through real writers and read back with TensorBoard's ``EventAccumulator``
(the served view of the same files is tests/sinks/test_tensorboard_server.py).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from models import trainer
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from healthmon.sinks.tensorboard import OWN_DIR, TensorBoardSink, is_tensorboard_logger, writer_log_dir


def _events(folder: str) -> EventAccumulator:
    acc = EventAccumulator(folder, size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_is_tensorboard_logger_by_class_name(tmp_path: Path) -> None:
    assert is_tensorboard_logger(TensorBoardLogger(str(tmp_path)))
    assert not is_tensorboard_logger(CSVLogger(str(tmp_path)))
    assert not is_tensorboard_logger(object())


def test_writer_log_dir_of_a_summary_writer_and_of_log_dir_attributes(tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path / "w"))
    assert writer_log_dir(writer) == str(tmp_path / "w")
    writer.close()

    class Holder:
        def __init__(self, **kw: object) -> None:
            self.__dict__.update(kw)

    assert writer_log_dir(Holder(log_dir=tmp_path / "a")) == str(tmp_path / "a")
    assert writer_log_dir(Holder(logdir=str(tmp_path / "b"))) == str(tmp_path / "b")
    with pytest.raises(ValueError, match="expected a SummaryWriter with a log directory"):
        writer_log_dir(Holder())


def test_standalone_into_a_folder_owns_its_writer(tmp_path: Path) -> None:
    sink = TensorBoardSink.standalone(tmp_path / "tb")
    assert sink.owns_writer
    assert sink.log_dir == str(tmp_path / "tb")
    sink.scalars({"a": 1.0, "b": torch.tensor(2.0)}, 3)
    sink.text("t", "hello", 3)
    sink.layout({})  # an empty layout writes nothing
    sink.layout({"cat": {"chart": ["Multiline", ["a", "b"]]}})
    sink.close()
    acc = _events(sink.log_dir)
    assert [(e.step, e.value) for e in acc.Scalars("a")] == [(3, 1.0)]
    assert [(e.step, e.value) for e in acc.Scalars("b")] == [(3, 2.0)]
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


def test_standalone_through_the_users_writer_flushes_and_never_closes_it(tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path / "user"))
    sink = TensorBoardSink.standalone(writer)
    assert not sink.owns_writer
    assert sink.writer is writer
    assert sink.log_dir == str(tmp_path / "user")
    sink.scalars({"healthmon/loss": 0.25}, 1)
    sink.close()
    writer.add_scalar("user/metric", 5.0, 2)  # still open
    writer.close()
    acc = _events(str(tmp_path / "user"))
    assert [e.value for e in acc.Scalars("healthmon/loss")] == [0.25]
    assert [e.value for e in acc.Scalars("user/metric")] == [5.0]


def test_histograms_bin_finite_values_only(tmp_path: Path) -> None:
    sink = TensorBoardSink.standalone(tmp_path / "tb")
    values = torch.tensor([1.0, float("inf"), -2.0, float("nan")], dtype=torch.float16)
    sink.histogram("h", values, 1)
    sink.histogram("nothing", torch.tensor([float("nan"), float("inf")]), 1)
    sink.close()
    acc = _events(sink.log_dir)
    (event,) = acc.Histograms("h")
    assert (event.histogram_value.num, event.histogram_value.min, event.histogram_value.max) == (2, -2, 1)
    assert "nothing" not in acc.Tags()["histograms"]


def test_a_trainer_with_a_tensorboard_logger_shares_its_event_files(tmp_path: Path) -> None:
    fit = trainer(tmp_path, [])
    sink = TensorBoardSink(fit)
    logger = fit.loggers[0]
    assert sink.writer is logger.experiment
    assert sink.log_dir == logger.log_dir
    assert not sink.owns_writer
    assert sink.other_loggers == []
    sink.scalars({"healthmon/loss": 1.0}, 4)
    sink.close()
    assert [e.step for e in _events(logger.log_dir).Scalars("healthmon/loss")] == [4]


def test_a_trainer_without_tensorboard_gets_its_own_writer_and_feeds_the_other_loggers(
    tmp_path: Path,
) -> None:
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    fit = trainer(tmp_path, [], tensorboard=False, logger=csv_logger)
    sink = TensorBoardSink(fit)
    assert sink.owns_writer
    assert sink.log_dir == str(tmp_path / OWN_DIR)
    assert sink.other_loggers == [csv_logger]
    sink.scalars({"healthmon/loss": 0.5}, 2)
    sink.close()
    csv_logger.save()
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], float(r["healthmon/loss"])) for r in rows] == [("2", 0.5)]
    assert [e.value for e in _events(sink.log_dir).Scalars("healthmon/loss")] == [0.5]
