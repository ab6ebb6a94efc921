"""Read healthmon's alerts back from a report JSON or a TensorBoard log dir.

Event files are read with TensorBoard's own event-file loader; an event file is accepted only if
its records account for every byte of it (a truncated or corrupted file is an error, not a
silently shorter run). No torch import: the CLI stays fast.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from healthmon.alerts import Alert
from healthmon.sinks.report import REPORT_NAME, ReportError, read_report
from healthmon.sinks.schema import SchemaError, alert_from_record

ALERT_RECORD_TAG = "healthmon/alert_records"  # one JSON alert per text event (written by the hub)
EVENT_PREFIX = "events.out.tfevents."
RECORD_OVERHEAD = 16  # TFRecord framing: 8-byte length, 4-byte length CRC, 4-byte data CRC


@dataclass
class RunAlerts:
    """The alerts of one run (one report, or one folder of event files)."""

    source: str
    alerts: list[Alert] = field(default_factory=list)
    status: str | None = None


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
        if os.path.basename(path).startswith(EVENT_PREFIX):
            return [_from_event_files(os.path.dirname(path) or ".", [path])]
        data = read_report(path)
        return [RunAlerts(path, data["alerts"], data["run"]["status"])]
    runs: list[RunAlerts] = []
    saw_events = False
    for folder, _dirs, files in sorted(os.walk(path)):
        events = sorted(os.path.join(folder, f) for f in files if f.startswith(EVENT_PREFIX))
        saw_events = saw_events or bool(events)
        if REPORT_NAME in files:
            report = os.path.join(folder, REPORT_NAME)
            data = read_report(report)
            runs.append(RunAlerts(report, data["alerts"], data["run"]["status"]))
        elif events:
            run = _from_event_files(folder, events)
            if run is not None:
                runs.append(run)
    if not runs:
        what = "healthmon data in its event files" if saw_events else "event files or healthmon report"
        raise ReportError(f"{path}: no {what}")
    return runs


def _from_event_files(folder: str, files: list[str]) -> RunAlerts | None:
    from google.protobuf.message import DecodeError
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    alerts: list[Alert] = []
    seen_healthmon = False
    for name in files:
        size = os.path.getsize(name)
        used = 0
        for raw in RawEventFileLoader(name).Load():
            used += len(raw) + RECORD_OVERHEAD
            try:
                event = event_pb2.Event.FromString(raw)
            except DecodeError as exc:
                raise ReportError(f"{name}: corrupt event file (a record is not an event: {exc})") from None
            for value in event.summary.value:
                if not value.tag.startswith("healthmon/"):
                    continue
                seen_healthmon = True
                if value.tag.startswith(ALERT_RECORD_TAG):
                    for item in _record_texts(name, value):
                        alerts.append(_alert_from_text(name, item, len(alerts)))
        if used != size:
            raise ReportError(
                f"{name}: corrupt or truncated event file ({size - used} of {size} bytes unreadable)"
            )
    return RunAlerts(folder, alerts) if seen_healthmon else None


def _record_texts(name: str, value: Any) -> list[object]:
    """The strings of an alert-record summary value (a string tensor); anything else is malformed."""
    from tensorboard.util import tensor_util

    try:
        array = tensor_util.make_ndarray(value.tensor)
    except (ValueError, TypeError) as exc:
        raise ReportError(f"{name}: malformed healthmon alert record {value.tag!r} ({exc})") from None
    if array.dtype.kind not in "SUO":
        raise ReportError(
            f"{name}: malformed healthmon alert record {value.tag!r}: "
            f"expected text, got a {array.dtype} tensor"
        )
    return list(array.reshape(-1))


def _alert_from_text(name: str, item: object, index: int) -> Alert:
    """One alert record (JSON text) of an event file, every field checked."""
    field = f"{ALERT_RECORD_TAG}[{index}]"
    try:
        text = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        record = json.loads(text)
    except ValueError as exc:  # not UTF-8, not JSON
        raise ReportError(f"{name}: malformed healthmon alert record {field} (not JSON: {exc})") from None
    try:
        return alert_from_record(record, field)
    except SchemaError as exc:
        raise ReportError(f"{name}: malformed healthmon alert record, {exc}") from None
