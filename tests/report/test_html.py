"""The HTML report: charts from the recorded tags, alert rows, escaping, self-containment, a browser."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from models import DigitsClassifier, digits_loader, trainer

from healthmon import GradientNormMonitor, HealthMonitor, NonFiniteMonitor
from healthmon.report.events import read_scalars
from healthmon.report.html import NOT_RECORDED, load_run_data, render_html, write_html_report

pytest.importorskip("matplotlib", reason="the HTML report needs matplotlib (healthmon[report])")

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A healthy and a sick (lr 100x too high) run with the gradient-norm and non-finite monitors."""
    import torch

    out: dict[str, Any] = {}
    for name, lr in (("healthy", 0.05), ("sick", 10.0)):
        torch.manual_seed(0)
        root = tmp_path_factory.mktemp(name)
        mon = HealthMonitor(monitors=[NonFiniteMonitor(), GradientNormMonitor()], summary=False)
        t = trainer(root, [mon], max_steps=40)
        t.fit(DigitsClassifier(lr=lr), digits_loader())
        out[name] = str(root)
        out[name + "_report"] = mon.report_path
        out[name + "_logdir"] = t.logger.log_dir
        out[name + "_alerts"] = list(mon.alerts)
    return out


def _images(doc: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', doc)]


def test_scalars_are_the_values_logged(runs: dict[str, Any]) -> None:
    scalars = read_scalars(runs["healthy_logdir"])
    last = json.loads(Path(runs["healthy_report"]).read_text())["last"]
    assert {"healthmon/loss", "healthmon/grad/norm"} <= set(scalars)
    for tag in ("healthmon/loss", "healthmon/grad/norm", "healthmon/grad/layer/net.0"):
        steps = [s for s, _ in scalars[tag]]
        assert steps == sorted(steps) and len(steps) == 40
        assert scalars[tag][-1][1] == pytest.approx(last[tag], rel=1e-6, nan_ok=True)


def test_sick_report_has_charts_and_one_row_per_alert(runs: dict[str, Any]) -> None:
    data = load_run_data(runs["sick"])
    doc = render_html(data)
    alerts = runs["sick_alerts"]
    assert alerts and len(data) == 1 and [a.code for a in data[0].alerts] == [a.code for a in alerts]
    rows = re.findall(r'<tr class="alert-row" data-code="([^"]+)"', doc)
    assert sorted(rows) == sorted(a.code for a in alerts)
    for a in alerts:  # the explanation and the fix of every alert are in the page
        assert a.hint.replace("'", "&#x27;") in doc or a.hint in doc
    # norm vs loss, per-layer norms, update ratios and the timeline are drawn; all are real PNGs
    images = _images(doc)
    assert len(images) == 4 and all(img.startswith(b"\x89PNG\r\n\x1a\n") for img in images)
    assert 'id="run0-chart0"' in doc and 'id="run0-chart6"' in doc  # norm vs loss, timeline
    # tags this run did not record say so instead of drawing an empty chart
    assert f"Zero, underflow and stale fractions: {NOT_RECORDED}" in doc
    assert f"Sharpness: lambda_max against 2/lr: {NOT_RECORDED}" in doc
    assert "Not healthy" in doc


def test_healthy_report_says_healthy(runs: dict[str, Any]) -> None:
    doc = render_html(load_run_data(runs["healthy"]))
    assert runs["healthy_alerts"] == []
    assert "Healthy: no numerical problems detected." in doc and "alert-row" not in doc
    assert len(_images(doc)) == 3  # no timeline without alerts
    assert "No alerts fired." in doc


def test_report_is_self_contained(runs: dict[str, Any]) -> None:
    doc = render_html(load_run_data(runs["sick"]))
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", doc)
    assert "<script" not in doc and "@import" not in doc and "url(" not in doc


def test_user_text_is_escaped(tmp_path: Any, runs: dict[str, Any]) -> None:
    report = json.loads(Path(runs["sick_report"]).read_text())
    evil = "<script>alert('x')</script>&"
    report["alerts"][0]["where"] = evil
    report["alerts"][0]["message"] = evil
    path = tmp_path / "r.json"  # a report copied away from its event files: found via run.log_dir
    path.write_text(json.dumps(report))
    doc = render_html(load_run_data(str(path)))
    assert "<script>" not in doc and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;" in doc
    assert len(_images(doc)) == 4
    report["run"]["log_dir"] = None  # no event files anywhere: every chart but the timeline is missing
    path.write_text(json.dumps(report))
    doc = render_html(load_run_data(str(path)))
    assert doc.count(NOT_RECORDED) == 6 and len(_images(doc)) == 1
    assert "no event files found" in doc


def test_write_is_atomic_and_readable(runs: dict[str, Any], tmp_path: Any) -> None:
    out = tmp_path / "sub" / "report.html"
    runs_data = write_html_report(runs["sick"], str(out))
    assert out.exists() and len(runs_data) == 1
    assert os.stat(out).st_mode & 0o044  # an artifact others can read, not mkstemp's 0600
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left


def test_missing_matplotlib_is_one_clear_line(runs: dict[str, Any], tmp_path: Any) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None; from healthmon.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    out = tmp_path / "r.html"
    proc = subprocess.run(
        [sys.executable, "-c", code, "report", runs["sick"], "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and not out.exists()
    assert len(proc.stderr.strip().splitlines()) == 1 and "healthmon[report]" in proc.stderr


def _browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def _chromium(browser: str, *args: str) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(
    _browser() is None, reason="no headless Chromium/Chrome on PATH (apt-get install chromium)"
)
def test_renders_in_a_real_browser(runs: dict[str, Any], tmp_path: Any) -> None:
    """Chromium decodes every chart (naturalWidth > 0), shows the alert rows, paints a non-blank page."""
    from matplotlib.image import imread

    browser = _browser()
    assert browser is not None
    page = tmp_path / "report.html"
    write_html_report(runs["sick"], str(page))
    # A probe copy: an inline script records, after load, how many images the browser decoded.
    probe = tmp_path / "probe.html"
    script = (
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "document.body.setAttribute('data-decoded',i.filter(x=>x.complete&&x.naturalWidth>0).length);"
        "document.body.setAttribute('data-images',i.length);"
        "document.body.setAttribute('data-rows',document.querySelectorAll('tr.alert-row').length);});</script>"
    )
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    dom = _chromium(browser, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()).stdout
    n_alerts = len(runs["sick_alerts"])
    assert re.search(r'data-images="4"', dom) and re.search(r'data-decoded="4"', dom), dom[:300]
    assert f'data-rows="{n_alerts}"' in dom and dom.count('class="alert-row"') == n_alerts

    shot = tmp_path / "shot.png"
    _chromium(browser, "--window-size=1200,2600", f"--screenshot={shot}", page.as_uri())
    pixels = imread(str(shot))[..., :3]
    assert pixels.std() > 0.05  # not a blank page
    # the charts' blue (gradient norm) and red (loss) lines were painted
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    blue = ((b > 0.55) & (r < 0.3) & (g > 0.35) & (g < 0.6)).sum()
    red = ((r > 0.7) & (g < 0.3) & (b < 0.3)).sum()
    assert blue > 200 and red > 200, (blue, red)
