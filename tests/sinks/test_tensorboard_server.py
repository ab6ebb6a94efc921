"""What a user sees: a real TensorBoard server on 127.0.0.1 serves healthmon's scalars and layout."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from models import DigitsClassifier, digits_loader, trainer
from tensorboard.backend.event_processing import event_accumulator as ea

from healthmon import HealthMonitor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read().decode())


@pytest.fixture(scope="module")
def served_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    root = tmp_path_factory.mktemp("tb")
    mon = HealthMonitor(summary=False)
    t = trainer(root, [mon], max_steps=20, gradient_clip_val=0.5)
    t.fit(DigitsClassifier(), digits_loader())
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(root),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast",
            "false",
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(120):  # bounded wait for the server to start and load the run
            try:
                if _get(port, "/data/runs"):
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        else:
            pytest.fail("tensorboard did not serve the run in time")
        yield port, t.logger.log_dir
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_server_serves_healthmon_scalars_with_the_logged_values(served_run: tuple[int, str]) -> None:
    port, log_dir = served_run
    tags = _get(port, "/data/plugin/scalars/tags")
    run = next(iter(tags))
    for tag in ("healthmon/loss", "healthmon/grad/norm", "healthmon/grad/norm_clipped"):
        assert tag in tags[run], tag
    served = {
        step: value
        for _, step, value in _get(port, "/data/plugin/scalars/scalars", run=run, tag="healthmon/grad/norm")
    }
    acc = ea.EventAccumulator(log_dir, size_guidance={ea.SCALARS: 0})
    acc.Reload()
    written = {e.step: e.value for e in acc.Scalars("healthmon/grad/norm")}
    assert served == pytest.approx(written) and len(served) == 20


def test_server_serves_the_gradient_norm_vs_loss_chart(served_run: tuple[int, str]) -> None:
    port, _ = served_run
    layout = _get(port, "/data/plugin/custom_scalars/layout")
    charts = {c["title"]: c["multiline"]["tag"] for cat in layout["category"] for c in cat["chart"]}
    assert charts["gradient norm vs loss"] == ["healthmon/grad/norm", "healthmon/loss"]
