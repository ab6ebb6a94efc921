"""Writer: the protocol RunOutput writes through; TensorBoard's sink satisfies it, other objects do not."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from healthmon.engine.output import RunOutput
from healthmon.engine.run import Run
from healthmon.engine.writer import Writer
from healthmon.sinks.tensorboard import TensorBoardSink


class ListWriter:
    """A writer of the protocol that keeps what it is given in lists (no file format)."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.calls: list[tuple[str, Any]] = []

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.calls.append(("scalars", (dict(values), step)))

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        self.calls.append(("histogram", (tag, values.numel(), step)))

    def text(self, tag: str, text: str, step: int) -> None:
        self.calls.append(("text", (tag, step)))

    def layout(self, layout: Mapping[str, Mapping[str, list[Any]]]) -> None:
        self.calls.append(("layout", dict(layout)))

    def flush(self) -> None:
        self.calls.append(("flush", None))

    def close(self) -> None:
        self.calls.append(("close", None))


class NoFlush:
    log_dir = "x"

    def scalars(self, values: Mapping[str, float], step: int) -> None: ...


def test_the_tensorboard_sink_is_a_writer(tmp_path: Path) -> None:
    sink = TensorBoardSink.standalone(tmp_path)
    assert isinstance(sink, Writer)
    sink.close()


def test_an_object_missing_methods_is_not_a_writer() -> None:
    assert not isinstance(NoFlush(), Writer)
    assert not isinstance(object(), Writer)
    assert isinstance(ListWriter("x"), Writer)


def test_run_output_needs_nothing_beyond_the_protocol(tmp_path: Path) -> None:
    writer = ListWriter(str(tmp_path))

    class ListRun(Run):
        def open_writer(self) -> Writer:
            return writer

    run = ListRun(nn.Linear(2, 2))
    out = RunOutput(print_summary=False)
    out.open(run)
    out.declare_layout("c", {"t": ["a"]})
    out.start()
    out.scalars({"a": 1}, 1)
    out.histogram("h", torch.ones(3), 1)
    out.finish(run, "completed", [], 0)
    out.close()
    assert [name for name, _ in writer.calls] == [
        "layout",
        "text",
        "flush",
        "scalars",
        "histogram",
        "flush",
        "close",
    ]
    assert writer.calls[0][1] == {"c": {"t": ["Multiline", ["a"]]}}
    assert writer.calls[3][1] == ({"a": 1.0}, 1)
    assert (tmp_path / "healthmon_report.json").is_file()
