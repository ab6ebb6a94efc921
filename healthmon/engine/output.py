"""Output: the run's scalars, texts, layout, JSON report and crash record, through one writer.

Only global rank zero has a writer; on other ranks every call here is a no-op except remembering
the last value of each tag (which the report lists).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from healthmon.alerts import Alert
from healthmon.engine.run import Run
from healthmon.engine.writer import Writer
from healthmon.sinks.console import print_summary
from healthmon.sinks.report import CRASH_NAME, REPORT_NAME, build_report, write_json_atomic
from healthmon.tags import CONFIG_TEXT


class RunOutput:
    """Everything a run writes: scalars and texts through a :class:`Writer`, and the JSON files."""

    def __init__(self, *, write_report: bool = True, print_summary: bool = True) -> None:
        self.write_report = write_report
        self.print_summary = print_summary
        self.config: dict[str, Any] = {}
        self.writer: Writer | None = None
        self.log_dir: str | None = None
        self.report_path: str | None = None
        self.crash_path: str | None = None
        self.layout: dict[str, dict[str, list[Any]]] = {}
        self.last: dict[str, float] = {}
        self.facts: dict[str, Any] = {}  # more of the report's ``run`` record, set by the driver
        self._started_at = 0.0
        self._finished = False

    def open(self, run: Run) -> None:
        """Open the writer (rank zero, once per fit) and decide where the report goes."""
        self._started_at = time.time()
        self._finished = False
        if run.is_global_zero and self.writer is None:
            self.writer = run.open_writer()
            if self.writer is not None:
                self.log_dir = self.writer.log_dir
                self.report_path = os.path.join(self.log_dir, REPORT_NAME)

    def start(self) -> None:
        """Write the custom-scalars layout and the configuration (TEXT tab), once per fit."""
        if self.writer is None:
            return
        self.writer.layout(self.layout)
        config = json.dumps(self.config, indent=2, default=str)
        self.writer.text(CONFIG_TEXT, "healthmon configuration:\n\n    " + config.replace("\n", "\n    "), 0)
        self.writer.flush()

    def declare_layout(self, category: str, charts: Mapping[str, list[str]]) -> None:
        """Add charts to the custom-scalars layout: {title: [tags on one chart]}."""
        section = self.layout.setdefault(category, {})
        for title, tags in charts.items():
            section[title] = ["Multiline", list(tags)]

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Write scalars (rank zero) and remember the last value of each tag for the report."""
        if not values:
            return
        clean = {k: float(v) for k, v in values.items()}
        self.last.update(clean)
        if self.writer is not None:
            self.writer.scalars(clean, step)

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        """Write a histogram of ``values`` (rank zero: elsewhere there is no writer)."""
        if self.writer is not None:
            self.writer.histogram(tag, values, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Write a text entry (rank zero: elsewhere there is no writer)."""
        if self.writer is not None:
            self.writer.text(tag, text, step)

    def crash_record(self, record: Mapping[str, Any]) -> str | None:
        """A small JSON file beside the report to reproduce a failure (rank zero)."""
        if self.log_dir is None:
            return None
        self.crash_path = os.path.join(self.log_dir, CRASH_NAME)
        write_json_atomic(self.crash_path, dict(record))
        return self.crash_path

    def finish(
        self, run: Run, status: str, alerts: list[Alert], dropped: int, error: BaseException | None = None
    ) -> None:
        """Write the report and print the summary (rank zero), once per fit."""
        if self._finished:
            return
        self._finished = True
        if self.writer is None:
            return
        self.writer.flush()
        if self.write_report and self.report_path is not None:
            write_json_atomic(self.report_path, self._report(run, status, alerts, dropped, error))
        if self.print_summary:
            print_summary(alerts, log_dir=self.log_dir, report_path=self.report_path)

    def close(self) -> None:
        """Close the writer; later writes are dropped until the next :meth:`open`."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _report(
        self, run: Run, status: str, alerts: list[Alert], dropped: int, error: BaseException | None
    ) -> dict[str, Any]:
        import healthmon

        facts: dict[str, Any] = {
            "status": status,
            "global_step": int(run.global_step),
            "epoch": int(run.current_epoch),
            "started": self._started_at,
            "finished": time.time(),
            "precision": str(run.precision),
            "world_size": int(run.world_size),
            "strategy": run.strategy,
            "log_dir": self.log_dir,
            "versions": {
                "healthmon": healthmon.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
        facts.update(self.facts)
        if error is not None:
            facts["error"] = f"{type(error).__name__}: {error}"
        return build_report(run=facts, config=self.config, alerts=alerts, dropped=dropped, last=self.last)
