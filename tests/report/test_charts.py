"""Every chart of the HTML report reads tags declared in healthmon.tags, and only those.

A renamed tag must fail here, not silently empty a chart: each chart is drawn from a run that
recorded every tag and family of ``tags.py`` and must (a) draw something and (b) read only what
``tags.REPORT_CHARTS`` declares for it.
"""

from __future__ import annotations

import inspect

import pytest

from healthmon import tags
from healthmon.alerts import make_alert
from healthmon.report import charts
from healthmon.report.events import Series
from healthmon.report.run_data import RunData
from healthmon.tags import Family


def _declared(item: str | Family) -> bool:
    if isinstance(item, Family):
        return item in tags.FAMILIES or item in tags.GROUPS
    return item in tags.ALL_TAGS


def test_every_chart_reads_families_declared_in_tags() -> None:
    keys = [c.key for c in charts.CHARTS if c.key is not None]
    assert sorted(keys) == sorted(tags.REPORT_CHARTS) and len(set(keys)) == len(keys)
    for key, reads in tags.REPORT_CHARTS.items():
        assert reads and all(_declared(r) for r in reads), key
    panel_families = {f for _, families in charts.FRACTIONS for f in families}
    assert panel_families == set(tags.REPORT_CHARTS["fractions"])
    timeline = [c for c in charts.CHARTS if c.key is None]
    assert [c.title for c in timeline] == [charts.TIMELINE_TITLE]  # the only chart drawn from alerts


def test_charts_never_retype_a_tag() -> None:
    source = inspect.getsource(charts)
    assert '"healthmon/' not in source and ".scalars" not in source


class RecordingRun(RunData):
    """A run that remembers which tags and families a chart read."""

    reads: list[str | Family]

    def series(self, tag: str) -> Series | None:
        self.reads.append(tag)
        return super().series(tag)

    def prefixed(self, family: Family) -> dict[str, Series]:
        self.reads.append(family)
        return super().prefixed(family)


def _everything() -> dict[str, Series]:
    """A series for every exact tag and one member of every family."""
    series = [(0, 2.0), (5, 3.0), (10, 4.0)]
    out = {tag: list(series) for tag in tags.ALL_TAGS}
    out.update({family("x"): list(series) for family in tags.FAMILIES})
    return out


@pytest.mark.parametrize("chart", [c for c in charts.CHARTS if c.key is not None], ids=lambda c: c.key)
def test_each_chart_draws_from_the_tags_it_declares(chart: charts.Chart) -> None:
    plt = pytest.importorskip("matplotlib.pyplot", reason="charts need matplotlib (healthmon[report])")
    assert chart.key is not None
    run = RecordingRun("run", [make_alert("grad.explosion", 5, "m")], scalars=_everything())
    run.reads = []
    png = chart.draw(plt, run)
    assert png, f"{chart.title}: empty although every tag of tags.py was recorded"
    declared = set(tags.REPORT_CHARTS[chart.key])
    assert run.reads and set(run.reads) <= declared, (chart.key, set(run.reads) - declared)
    empty = RecordingRun("run", [], scalars={})
    empty.reads = []
    assert chart.draw(plt, empty) is None  # nothing recorded: the page says "not recorded"
