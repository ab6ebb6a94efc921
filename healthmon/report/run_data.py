"""What the HTML report shows for one run: its alerts, scalar series and run metadata.

Each run's report is read once (:func:`healthmon.report.reader.load_runs` keeps its ``run``
metadata); the scalars come from the event files beside the report, else from the report's
``log_dir``. Charts read the series only through :meth:`RunData.series` and
:meth:`RunData.prefixed`, with tags and families from :mod:`healthmon.tags`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from healthmon.alerts import Alert
from healthmon.report.events import Series, has_event_files, read_scalars
from healthmon.report.reader import load_runs
from healthmon.tags import Family


@dataclass
class RunData:
    """What the report shows for one run: its alerts, scalar series and run metadata."""

    source: str
    alerts: list[Alert]
    status: str | None = None
    scalars: dict[str, Series] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    event_dir: str | None = None

    def series(self, tag: str) -> Series | None:
        """The series of one exact tag, ``None`` when the run did not record it."""
        return self.scalars.get(tag)

    def prefixed(self, family: Family) -> dict[str, Series]:
        """The non-empty series of a family (or group), keyed by member name, sorted by tag."""
        prefix = family.prefix
        return {t[len(prefix) :]: s for t, s in sorted(self.scalars.items()) if t.startswith(prefix) and s}

    def last_step(self) -> int:
        """The last step any series recorded (0 without scalars)."""
        return max([s for ser in self.scalars.values() for s, _ in ser[-1:]] + [0])


def event_dir(source: str, run: dict[str, Any]) -> str | None:
    """The folder holding a run's event files: beside the report, else the report's ``log_dir``."""
    folder = source if os.path.isdir(source) else os.path.dirname(source) or "."
    candidates = [folder]
    if run.get("log_dir"):
        candidates.append(str(run["log_dir"]))
    for c in candidates:
        if has_event_files(c):
            return c
    return None


def load_run_data(path: str) -> list[RunData]:
    """Alerts, scalars and metadata of every run under ``path`` (see ``load_runs``).

    Raises:
        ReportError: missing, unreadable or corrupt input, or no healthmon data.
    """
    runs = []
    for r in load_runs(path):
        folder = event_dir(r.source, r.run)
        scalars = read_scalars(folder) if folder else {}
        runs.append(RunData(r.source, list(r.alerts), r.status, scalars, dict(r.run), folder))
    return runs
