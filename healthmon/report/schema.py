"""Field-by-field validation of what the CLI reads back: report JSON and alert records.

A report or event file edited by hand, written by another tool or damaged in transit must never
reach the CLI's verdict code with a wrong type: ``healthmon check`` would print a traceback and exit
1, the status of a sick run. Every field is checked here and the first wrong one is named
(``run.status``, ``alerts[3].step``) with its value and what is allowed. Unknown fields are
ignored (reports from a newer healthmon stay readable). No torch import: the CLI stays fast.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from healthmon.alerts import SEVERITIES, Alert

STATUSES = ("completed", "stopped", "exception")


class SchemaError(ValueError):
    """A field of a report or alert record with a wrong type or value; the message is one line."""

    def __init__(self, field: str, value: Any, expected: str, *, missing: bool = False) -> None:
        got = "the field is missing" if missing else f"got {_show(value)}"
        super().__init__(f"field {field!r}: expected {expected}, {got}")
        self.field = field


def _show(value: Any, limit: int = 60) -> str:
    """A value as JSON (``null``, ``"text"``, ``[1, 2]``), cut to one short line."""
    try:
        text = json.dumps(value, allow_nan=True, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


Check = Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite_number(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


def _is_count(v: Any) -> bool:
    return _is_int(v) and v >= 0


def _is_text(v: Any) -> bool:
    return isinstance(v, str)


def _optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


COUNT = (_is_count, "a non-negative integer")
TEXT = (_is_text, "a string")
OPTIONAL_TEXT = (_optional(_is_text), "a string or null")
OPTIONAL_TIME = (_optional(_is_finite_number), "a number (seconds since the epoch) or null")

#: Alert record fields: (check, what is allowed, required).
ALERT_FIELDS: dict[str, tuple[Check, str, bool]] = {
    "code": (lambda v: isinstance(v, str) and bool(v), "a non-empty string", True),
    "severity": (lambda v: v in SEVERITIES and isinstance(v, str), f"one of {', '.join(SEVERITIES)}", True),
    "step": (*COUNT, True),
    "message": (*TEXT, True),
    "hint": (*TEXT, True),
    "where": (*OPTIONAL_TEXT, False),
    "count": (lambda v: _is_int(v) and v >= 1, "a positive integer", False),
    "last_step": (lambda v: _is_int(v) and v >= -1, "an integer >= -1", False),
    "value": (_optional(_is_number), "a number or null", False),
}

#: ``run`` fields of a report (the driver writes all of them; only ``status`` is required).
RUN_FIELDS: dict[str, tuple[Check, str, bool]] = {
    "status": (lambda v: v in STATUSES and isinstance(v, str), f"one of {', '.join(STATUSES)}", True),
    "global_step": (*COUNT, False),
    "epoch": (*COUNT, False),
    "started": (*OPTIONAL_TIME, False),
    "finished": (*OPTIONAL_TIME, False),
    "precision": (*TEXT, False),
    "world_size": (lambda v: _is_int(v) and v >= 1, "a positive integer", False),
    "strategy": (*TEXT, False),
    "log_dir": (*OPTIONAL_TEXT, False),
    "versions": (
        lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
        "an object of strings",
        False,
    ),
    "error": (*TEXT, False),
    "gradient_checks": (lambda v: isinstance(v, dict), "an object", False),
}


def _check_fields(data: Any, prefix: str, fields: dict[str, tuple[Check, str, bool]]) -> None:
    if not isinstance(data, dict):
        raise SchemaError(prefix, data, "an object")
    for name, (check, expected, required) in fields.items():
        field = f"{prefix}.{name}"
        if name not in data:
            if required:
                raise SchemaError(field, None, expected, missing=True)
            continue
        if not check(data[name]):
            raise SchemaError(field, data[name], expected)


def alert_from_record(record: Any, field: str = "alert") -> Alert:
    """An :class:`Alert` from a decoded JSON record, every field checked; raises :class:`SchemaError`."""
    _check_fields(record, field, ALERT_FIELDS)
    return Alert.from_dict(record)


def _check_header(data: Any, schema: str, version: int) -> None:
    """A JSON object with this ``schema``, a version this healthmon reads, and a ``run``."""
    if not isinstance(data, dict):
        raise SchemaError("(top level)", data, "a JSON object")
    if data.get("schema") != schema:
        raise SchemaError("schema", data.get("schema"), f'"{schema}" (not a healthmon report)')
    if not (_is_int(data.get("version")) and 1 <= data["version"] <= version):
        raise SchemaError("version", data.get("version"), f"a report version from 1 to {version}")
    if "run" not in data:
        raise SchemaError("run", None, "an object", missing=True)


def _check_values(data: dict[str, Any], name: str, check: Check, expected: str) -> None:
    """``data[name]`` (absent: empty) is an object whose every value passes ``check``."""
    values = data.get(name, {})
    if not isinstance(values, dict):
        raise SchemaError(name, values, "an object")
    for key, value in values.items():
        if not check(value):
            raise SchemaError(f"{name}.{key}", value, expected)


def validate_report(data: Any, *, schema: str, version: int) -> dict[str, Any]:
    """Check a decoded report field by field; returns it with ``alerts`` as :class:`Alert` objects.

    ``schema`` and ``version`` are what this healthmon reads (a newer version is refused).
    """
    _check_header(data, schema, version)
    _check_fields(data["run"], "run", RUN_FIELDS)
    if "config" in data and not isinstance(data["config"], dict):
        raise SchemaError("config", data["config"], "an object")
    if "dropped_alerts" in data and not _is_count(data["dropped_alerts"]):
        raise SchemaError("dropped_alerts", data["dropped_alerts"], COUNT[1])
    _check_values(data, "counts", _is_count, COUNT[1])
    _check_values(data, "last", _is_number, "a number")
    if "alerts" not in data:
        raise SchemaError("alerts", None, "a list of alert records", missing=True)
    alerts = data["alerts"]
    if not isinstance(alerts, list):
        raise SchemaError("alerts", alerts, "a list of alert records")
    return {**data, "alerts": [alert_from_record(a, f"alerts[{i}]") for i, a in enumerate(alerts)]}
