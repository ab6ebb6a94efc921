"""The JSON report written beside the event files at the end of fit (and on exception).

Schema ``healthmon.report`` version 1::

    {"schema": "healthmon.report", "version": 1,
     "run": {"status": "completed" | "stopped" | "exception", "global_step": int, ...},
     "config": {...}, "alerts": [Alert.to_dict(), ...], "dropped_alerts": int,
     "counts": {"info": n, "warning": n, "error": n}, "last": {tag: value}}

This module writes it; :mod:`healthmon.report.reader` reads it back (and validates it field by
field, :mod:`healthmon.report.schema`). The atomic writers serve the CLI's outputs too.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from healthmon.alerts import SEVERITIES, Alert

SCHEMA = "healthmon.report"
VERSION = 1
REPORT_NAME = "healthmon_report.json"
CRASH_NAME = "healthmon_crash.json"


def _readable_like_a_new_file(path: str) -> None:
    """Give ``path`` the permissions a plain open() would (mkstemp creates 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json_atomic(path: str, data: Mapping[str, Any]) -> None:
    """Write JSON atomically (see :func:`write_text_atomic`); serialised before any file is touched."""
    write_text_atomic(path, json.dumps(data, indent=2, default=_jsonable))


def write_text_atomic(path: str, text: str) -> None:
    """Write text through a temp file in the same folder, fsync, and an atomic rename.

    A crash mid-write leaves the previous file intact, never a truncated one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".healthmon-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _readable_like_a_new_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if callable(value):
        return getattr(value, "__name__", repr(value))
    return repr(value)


def build_report(
    *,
    run: Mapping[str, Any],
    config: Mapping[str, Any],
    alerts: Iterable[Alert],
    dropped: int,
    last: Mapping[str, float],
) -> dict[str, Any]:
    """The report of one run as a JSON-ready dict (schema above); counts are per severity."""
    alerts = list(alerts)
    counts = {s: sum(1 for a in alerts if a.severity == s) for s in SEVERITIES}
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "run": dict(run),
        "config": dict(config),
        "alerts": [a.to_dict() for a in alerts],
        "dropped_alerts": dropped,
        "counts": counts,
        "last": {k: float(v) for k, v in last.items()},
    }
