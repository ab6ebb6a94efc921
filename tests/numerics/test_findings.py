"""Finding: a frozen value object with an optional place and value (its rules are tested elsewhere)."""

from __future__ import annotations

import dataclasses

import pytest

from healthmon.numerics.findings import Finding


def test_a_finding_defaults_to_no_place_and_no_value() -> None:
    finding = Finding("grad.zero", "all gradients are zero")
    assert (finding.code, finding.message, finding.where, finding.value) == (
        "grad.zero",
        "all gradients are zero",
        None,
        None,
    )


def test_findings_are_frozen_and_compare_by_value() -> None:
    finding = Finding("grad.underflow", "m", where="net.0", value=0.5)
    assert finding == Finding("grad.underflow", "m", "net.0", 0.5)
    assert finding != Finding("grad.underflow", "m", "net.0", 0.25)
    assert hash(finding) == hash(Finding("grad.underflow", "m", "net.0", 0.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        finding.value = 1.0  # type: ignore[misc]
