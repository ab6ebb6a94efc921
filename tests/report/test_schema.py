"""Field-by-field validation of reports and alert records (the CLI fuzz is tests/test_cli_malformed.py)."""

from __future__ import annotations

from typing import Any

import pytest

from healthmon.alerts import make_alert
from healthmon.report.schema import SchemaError, alert_from_record, validate_report
from healthmon.sinks.report import SCHEMA, VERSION, build_report


def _report() -> dict[str, Any]:
    alert = make_alert("grad.explosion", 3, "m", where="net.0")
    return build_report(run={"status": "completed"}, config={}, alerts=[alert], dropped=0, last={})


def test_a_written_report_validates() -> None:
    data = validate_report(_report(), schema=SCHEMA, version=VERSION)
    assert data["alerts"][0].code == "grad.explosion" and data["alerts"][0].where == "net.0"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"run": {"status": "sleeping"}}, "run.status"),
        ({"run": {}}, "run.status"),
        ({"counts": {"error": -1}}, "counts.error"),
        ({"last": {"healthmon/loss": "1"}}, "last.healthmon/loss"),
        ({"alerts": {}}, "alerts"),
        ({"dropped_alerts": True}, "dropped_alerts"),
    ],
)
def test_the_first_wrong_field_is_named(change: dict[str, Any], field: str) -> None:
    with pytest.raises(SchemaError) as info:
        validate_report({**_report(), **change}, schema=SCHEMA, version=VERSION)
    assert info.value.field == field and str(info.value).startswith(f"field {field!r}: expected ")


def test_alert_records_check_every_field() -> None:
    record = make_alert("grad.explosion", 3, "m").to_dict()
    assert alert_from_record(record).step == 3
    with pytest.raises(SchemaError, match="'alert.step': expected a non-negative integer, got -1"):
        alert_from_record({**record, "step": -1})
    with pytest.raises(SchemaError, match="the field is missing"):
        alert_from_record({k: v for k, v in record.items() if k != "code"})
