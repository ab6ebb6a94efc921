"""Escalation: alerts recorded once, warned once, and the policy's raise/stop at the step's end."""

from __future__ import annotations

import warnings

import pytest
import torch

from healthmon.alerts import AlertPolicy, NumericalHealthError, make_alert
from healthmon.engine.escalation import Escalation, HealthWarning, alert_markdown
from healthmon.engine.run import Run


def _run() -> tuple[Run, torch.optim.Optimizer]:
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(2, 3)).sum().backward()
    return Run(model, [opt]), opt


def test_an_alert_is_recorded_once_and_warned_once() -> None:
    esc = Escalation(AlertPolicy("warn"))
    texts: list[tuple[str, str, int]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (3, 4):
            esc.record(make_alert("grad.zero", step, "zero", where="w"), lambda *a: texts.append(a))
    assert len(esc.book.alerts) == 1 and esc.book.alerts[0].count == 2
    assert [w.category for w in caught] == [HealthWarning]
    assert [t[0] for t in texts] == ["healthmon/alerts", "healthmon/alert_records"]
    assert "`grad.zero` step 3 at `w`" in alert_markdown(esc.book.alerts[0])


def test_raise_at_the_end_of_the_step() -> None:
    run, opt = _run()
    esc = Escalation(AlertPolicy("raise", "error"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        esc.record(make_alert("grad.zero", 0, "only a warning"))
        esc.enforce(run, opt)  # below fail_on: nothing happens
        esc.record(make_alert("loss.nonfinite", 1, "nan"))
    with pytest.raises(NumericalHealthError) as err:
        esc.enforce(run, opt)
    assert err.value.alert.code == "loss.nonfinite"


def test_stop_drops_the_step_and_asks_the_loop_to_stop() -> None:
    run, opt = _run()
    esc = Escalation(AlertPolicy("stop"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        esc.record(make_alert("loss.nonfinite", 1, "nan"))
    before = [p.detach().clone() for p in run.model.parameters()]
    esc.enforce(run, opt)
    opt.step()
    assert run.stop_requested and esc.stop_requested
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters(), strict=True))
