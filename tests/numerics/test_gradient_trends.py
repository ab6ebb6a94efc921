"""healthmon.numerics.gradient_trends: the trend rules' verdicts on a step, as findings."""

from __future__ import annotations

from healthmon.numerics.findings import Finding
from healthmon.numerics.gradient_trends import RULES, judge_trends, trend_rules
from healthmon.numerics.trends import rule_state


def _rules(warmup: int = 5) -> dict:
    return trend_rules(
        spike_factor=10.0, warmup=warmup, collapse_orders=3.0, blowup=10.0, window=50, rise=0.5
    )


def test_rules_are_built_from_the_monitor_settings() -> None:
    rules = trend_rules(spike_factor=7.0, warmup=3, collapse_orders=2.0, blowup=4.0, window=9, rise=0.25)
    assert tuple(rules) == RULES
    assert (rules["spike"].factor, rules["spike"].warmup) == (7.0, 3)
    assert (rules["collapse"].orders, rules["collapse"].warmup) == (2.0, 3)
    assert (rules["divergence"].blowup, rules["divergence"].window, rules["divergence"].rise) == (
        4.0,
        9,
        0.25,
    )


def test_a_quiet_run_yields_nothing() -> None:
    rules = _rules()
    for i in range(30):
        assert list(judge_trends(rules, 1.0 + 0.01 * (i % 2), 2.0 - 0.001 * i)) == []


def test_an_explosion_is_worded_with_its_ratio_and_reason() -> None:
    rules = _rules()
    for i in range(10):
        list(judge_trends(rules, 1.0 + 0.01 * (i % 2), 2.0))
    found = list(judge_trends(rules, 1e6, 50.0))
    assert found == [
        Finding(
            "grad.explosion",
            "Gradient norm 1e+06 is 9.98e+05x its running level, and 9.9e+05x above the largest norm "
            "seen so far (1.01).",
            value=1e6,
        )
    ]


def test_the_rules_are_fed_lazily_in_order() -> None:
    """A caller that raises on the explosion leaves the later rules as they were."""
    rules = _rules()
    for i in range(10):
        list(judge_trends(rules, 1.0 + 0.01 * (i % 2), 2.0))
    before = {name: rule_state(rules[name]) for name in ("collapse", "divergence", "opposing")}
    findings = judge_trends(rules, 1e6, 50.0)
    assert next(findings).code == "grad.explosion"
    assert {name: rule_state(rules[name]) for name in before} == before
    assert list(findings) == []
    assert rules["collapse"].seen == 11


def test_a_collapse_without_a_loss_feeds_only_the_norm_rules() -> None:
    rules = _rules()
    found: list[Finding] = []
    for i in range(40):
        found += judge_trends(rules, 1.0 if i < 5 else 1e-6, None, "optimizer 1")
    assert found and found[0].code == "grad.vanishing" and found[0].value == 1e-6
    assert found[0].message.startswith("Gradient norm (optimizer 1) 1e-06 collapsed ")
    assert found[0].message.endswith(" orders of magnitude below its peak while the loss is still high.")
    assert rules["divergence"].baseline is None and rules["opposing"].seen == 0


def test_divergence_names_the_optimizer() -> None:
    rules = _rules()
    found: list[Finding] = []
    for i in range(20):
        found += judge_trends(rules, 1.0, 1.0 if i < 12 else 100.0, "optimizer 0")
    assert found[0].code == "loss.divergence" and found[0].value == 100.0
    assert found[0].message.startswith("The loss (optimizer 0) blew up: ")


def test_a_norm_rising_while_the_loss_falls_is_an_opposing_trend() -> None:
    rules = _rules()
    found: list[Finding] = []
    for i in range(200):
        found += judge_trends(rules, 1.01**i, 2.0 - 0.005 * i)
    assert [f.code for f in found] == ["grad.norm_rising"]
    assert found[0].value is None
    assert found[0].message.startswith("Over the last 200 steps the gradient norm rose (correlation 1.00)")
    assert found[0].message.endswith("while the loss fell (-1.00).")
