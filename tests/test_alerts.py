"""The alert record, the code registry, de-duplication and the policy."""

from __future__ import annotations

import pytest

from healthmon.alerts import CODES, Alert, AlertBook, AlertPolicy, NumericalHealthError, make_alert

# The contract table of DESIGN.md: code -> default severity.
CONTRACT = {
    "loss.nonfinite": "error",
    "grad.nonfinite": "error",
    "activation.nonfinite": "error",
    "grad.zero": "warning",
    "grad.underflow": "warning",
    "update.stale": "warning",
    "grad.vanishing": "warning",
    "grad.explosion": "warning",
    "loss.divergence": "error",
    "logits.probabilities": "error",
    "logits.naive_log_softmax": "warning",
    "logits.naive_logsumexp": "warning",
    "softmax.saturated": "warning",
    "hessian.sharpness": "warning",
    "hessian.negative_curvature": "info",
}


def test_registry_holds_the_contract_codes_with_their_severities() -> None:
    for code, severity in CONTRACT.items():
        assert CODES[code].severity == severity, code


@pytest.mark.parametrize("code", sorted(CODES))
def test_every_code_explains_and_hints(code: str) -> None:
    info = CODES[code]
    assert info.explanation.endswith(".") and len(info.explanation) > 20
    assert len(info.hint) > 20


def test_make_alert_fills_registry_defaults() -> None:
    a = make_alert("grad.explosion", 7, "Gradient norm spiked.", where="net.0")
    assert (a.severity, a.step, a.last_step, a.count) == ("warning", 7, 7, 1)
    assert a.hint == CODES["grad.explosion"].hint
    assert a.line() == "WARNING grad.explosion step 7 at net.0: Gradient norm spiked."


def test_unknown_code_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="`code`: expected a registered alert code, got 'grad.nope'"):
        make_alert("grad.nope", 0, "x")


def test_book_deduplicates_by_code_and_place_and_counts() -> None:
    book = AlertBook()
    assert book.record(make_alert("grad.nonfinite", 3, "m", where="a")) is not None
    assert book.record(make_alert("grad.nonfinite", 9, "m", where="a")) is None
    assert book.record(make_alert("grad.nonfinite", 4, "m", where="b")) is not None
    assert [(a.where, a.count, a.step, a.last_step) for a in book.alerts] == [("a", 2, 3, 9), ("b", 1, 4, 4)]


def test_book_is_bounded() -> None:
    book = AlertBook(max_distinct=3)
    for i in range(10):
        book.record(make_alert("grad.nonfinite", i, "m", where=str(i)))
    assert len(book) == 3 and book.dropped == 7


def test_book_state_round_trip() -> None:
    book = AlertBook()
    book.record(make_alert("loss.divergence", 1, "m"))
    book.record(make_alert("loss.divergence", 5, "m"))
    other = AlertBook()
    other.load_state_dict(book.state_dict())
    assert [a.to_dict() for a in other.alerts] == [a.to_dict() for a in book.alerts]
    assert other.record(make_alert("loss.divergence", 6, "m")) is None and other.alerts[0].count == 3


def test_alert_from_dict_rejects_missing_fields_and_ignores_unknown_ones() -> None:
    a = make_alert("grad.zero", 2, "m")
    assert Alert.from_dict({**a.to_dict(), "future_field": 1}) == a
    with pytest.raises(ValueError, match="missing field"):
        Alert.from_dict({"code": "grad.zero"})


@pytest.mark.parametrize(
    ("on_alert", "fail_on", "severity", "escalates"),
    [
        ("warn", "info", "error", False),
        ("raise", "warning", "info", False),
        ("raise", "warning", "warning", True),
        ("stop", "error", "warning", False),
        ("stop", "error", "error", True),
    ],
)
def test_policy_escalation(on_alert: str, fail_on: str, severity: str, escalates: bool) -> None:
    alert = make_alert("grad.explosion", 0, "m", severity=severity)  # type: ignore[arg-type]
    assert AlertPolicy(on_alert, fail_on).escalates(alert) is escalates  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"on_alert": "panic"}, "`on_alert`"), ({"fail_on": "fatal"}, "`fail_on`")]
)
def test_policy_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AlertPolicy(**kwargs)


def test_error_carries_the_alert() -> None:
    a = make_alert("loss.nonfinite", 3, "The loss is nan.")
    err = NumericalHealthError(a)
    assert err.alert is a and "loss.nonfinite" in str(err) and a.hint in str(err)


def test_call_hints_refine_registered_codes_and_fall_back_to_the_registry() -> None:
    from healthmon.alerts import CALL_HINTS, call_hint

    for code, forms in CALL_HINTS.items():
        assert code in CODES
        for form, hint in forms.items():
            assert call_hint(code, form) == hint and len(hint) > 20
    assert call_hint("logits.probabilities", "no such form") == CODES["logits.probabilities"].hint
    assert call_hint("softmax.saturated") == CODES["softmax.saturated"].hint
    with pytest.raises(ValueError, match="registered alert code"):
        call_hint("no.such_code")
