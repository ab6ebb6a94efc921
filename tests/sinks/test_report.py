"""The JSON report writer: atomic writes, a report that reads back (reading: tests/report)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from healthmon.alerts import make_alert
from healthmon.report.reader import read_report
from healthmon.sinks.report import build_report, write_json_atomic


class Explodes:
    """A value whose serialisation fails half-way through the file."""

    def item(self) -> float:
        raise RuntimeError("disk full, or a bug")


def _report() -> dict[str, Any]:
    return build_report(
        run={"status": "completed"},
        config={},
        alerts=[make_alert("grad.explosion", 3, "m", where="net.0")],
        dropped=0,
        last={"healthmon/loss": 1.5},
    )


def test_round_trip(tmp_path: Any) -> None:
    path = str(tmp_path / "r.json")
    write_json_atomic(path, _report())
    data = read_report(path)
    assert data["alerts"][0].code == "grad.explosion" and data["counts"] == {
        "info": 0,
        "warning": 1,
        "error": 0,
    }


def test_a_failed_write_leaves_the_previous_report_intact(tmp_path: Any) -> None:
    path = str(tmp_path / "r.json")
    write_json_atomic(path, _report())
    before = Path(path).read_text()
    with pytest.raises(RuntimeError, match="disk full"):
        write_json_atomic(path, {**_report(), "last": {"x": Explodes()}})
    assert Path(path).read_text() == before
    assert os.listdir(tmp_path) == ["r.json"]  # no temp file left behind
    json.loads(before)
