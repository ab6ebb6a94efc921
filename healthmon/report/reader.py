"""Read healthmon's runs back from a report JSON, a run folder or a folder of runs.

Each report is read (and validated, :mod:`healthmon.report.schema`) once: a :class:`RunAlerts`
carries its alerts, status and ``run`` metadata to ``healthmon check`` and to the HTML report.
A run folder without a report (a run that died before writing one) is read from its event files
(:mod:`healthmon.report.events`). No torch import: the CLI stays fast.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from healthmon.alerts import Alert
from healthmon.report.errors import ReportError
from healthmon.report.events import EVENT_PREFIX, is_event_file, read_alert_records
from healthmon.report.schema import SchemaError, validate_report
from healthmon.sinks.report import REPORT_NAME, SCHEMA, VERSION


@dataclass
class RunAlerts:
    """The alerts of one run (one report, or one folder of event files).

    Attributes:
        source: the report file, or the folder of event files, the run was read from.
        alerts: its alerts.
        status: the report's ``run.status`` (``None`` when read from event files).
        run: the report's ``run`` metadata (empty when read from event files).
    """

    source: str
    alerts: list[Alert] = field(default_factory=list)
    status: str | None = None
    run: dict[str, Any] = field(default_factory=dict)


def read_report(path: str) -> dict[str, Any]:
    """Load and validate a report; raises :class:`ReportError` with a one-line reason."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ReportError(f'{path}: not a healthmon report (missing "schema": "{SCHEMA}")')
    if (
        not isinstance(data.get("version"), int)
        or isinstance(data["version"], bool)
        or data["version"] > VERSION
    ):
        raise ReportError(
            f"{path}: unsupported report version {data.get('version')!r} (this healthmon reads <= {VERSION})"
        )
    try:
        return validate_report(data, schema=SCHEMA, version=VERSION)
    except SchemaError as exc:
        raise ReportError(f"{path}: malformed report, {exc}") from None


def _from_report(path: str) -> RunAlerts:
    data = read_report(path)
    return RunAlerts(path, data["alerts"], data["run"]["status"], dict(data["run"]))


def load_runs(path: str) -> list[RunAlerts]:
    """All runs under ``path`` (a report JSON, a run folder, or a folder of runs).

    A folder's reports are preferred; folders with event files but no report (a run that died
    before writing one) are read from their event files.

    Raises:
        ReportError: missing path, unreadable or corrupt input, or no healthmon data at all.
    """
    if not os.path.exists(path):
        raise ReportError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if is_event_file(path):
            run = _from_event_files(os.path.dirname(path) or ".", [path])
            if run is None:
                raise ReportError(f"{path}: no healthmon data in its event files")
            return [run]
        return [_from_report(path)]
    runs: list[RunAlerts] = []
    saw_events = False
    for folder, _dirs, files in sorted(os.walk(path)):
        events = sorted(os.path.join(folder, f) for f in files if f.startswith(EVENT_PREFIX))
        saw_events = saw_events or bool(events)
        if REPORT_NAME in files:
            runs.append(_from_report(os.path.join(folder, REPORT_NAME)))
        elif events:
            run = _from_event_files(folder, events)
            if run is not None:
                runs.append(run)
    if not runs:
        what = "healthmon data in its event files" if saw_events else "event files or healthmon report"
        raise ReportError(f"{path}: no {what}")
    return runs


def _from_event_files(folder: str, files: list[str]) -> RunAlerts | None:
    alerts, seen_healthmon = read_alert_records(files)
    return RunAlerts(folder, alerts) if seen_healthmon else None
