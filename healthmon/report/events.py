"""Read TensorBoard event files back: healthmon's alert records and its scalar series.

Event files are read with TensorBoard's own loaders (imported lazily, on first use). An event
file is accepted only if its records account for every byte of it: a truncated or corrupted file
is an error, not a silently shorter run. No torch import: the CLI stays fast.
"""

from __future__ import annotations

import json
import os
from typing import Any

from healthmon import tags
from healthmon.alerts import Alert
from healthmon.report.errors import ReportError
from healthmon.report.schema import SchemaError, alert_from_record

EVENT_PREFIX = "events.out.tfevents."
RECORD_OVERHEAD = 16  # TFRecord framing: 8-byte length, 4-byte length CRC, 4-byte data CRC

Series = list[tuple[int, float]]


def is_event_file(path: str) -> bool:
    """Whether ``path`` names a TensorBoard event file (by its name)."""
    return os.path.basename(path).startswith(EVENT_PREFIX)


def has_event_files(folder: str) -> bool:
    """Whether ``folder`` is a folder holding at least one event file."""
    return os.path.isdir(folder) and any(f.startswith(EVENT_PREFIX) for f in os.listdir(folder))


def read_alert_records(files: list[str]) -> tuple[list[Alert], bool]:
    """The alerts recorded in event files (tag ``healthmon/alert_records``), in file order.

    Returns:
        The alerts, and whether the files hold any ``healthmon/`` value at all.

    Raises:
        ReportError: a corrupt or truncated event file, or a malformed alert record.
    """
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
                if not value.tag.startswith(tags.ROOT):
                    continue
                seen_healthmon = True
                if value.tag.startswith(tags.ALERT_RECORDS):
                    for item in _record_texts(name, value):
                        alerts.append(_alert_from_text(name, item, len(alerts)))
        if used != size:
            raise ReportError(
                f"{name}: corrupt or truncated event file ({size - used} of {size} bytes unreadable)"
            )
    return alerts, seen_healthmon


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
    field = f"{tags.ALERT_RECORDS}[{index}]"
    try:
        text = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        record = json.loads(text)
    except ValueError as exc:  # not UTF-8, not JSON
        raise ReportError(f"{name}: malformed healthmon alert record {field} (not JSON: {exc})") from None
    try:
        return alert_from_record(record, field)
    except SchemaError as exc:
        raise ReportError(f"{name}: malformed healthmon alert record, {exc}") from None


def read_scalars(folder: str) -> dict[str, Series]:
    """All ``healthmon/`` scalar series in a folder's event files, sorted by step.

    Every event is kept (``size_guidance`` 0); when a step was written twice (a resumed run) the
    last value wins.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder, size_guidance={"scalars": 0, "tensors": 1, "histograms": 1, "images": 1})
    acc.Reload()
    out: dict[str, Series] = {}
    for tag in acc.Tags().get("scalars", []):
        if not tag.startswith(tags.ROOT):
            continue
        by_step = {int(e.step): float(e.value) for e in acc.Scalars(tag)}
        out[tag] = sorted(by_step.items())
    return out
