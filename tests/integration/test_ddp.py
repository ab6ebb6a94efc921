"""DDP on CPU (2 processes, gloo): same norms as one process, alerts reach rank 0, policies agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from models import trainer
from tensorboard.backend.event_processing import event_accumulator as ea

from healthmon import HealthMonitor

pytestmark = pytest.mark.slow
SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_script.py")


def _launch(out: str, mode: str) -> dict[int, dict[str, Any]]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # timeout guards against a hang (the failure this test exists to catch), it is not a speed limit
    proc = subprocess.run(
        [sys.executable, SCRIPT, out, mode], capture_output=True, text=True, timeout=600, env=env
    )
    results = {}
    for rank in (0, 1):
        path = os.path.join(out, f"rank{rank}.json")
        assert os.path.exists(path), (
            f"rank {rank} wrote no result; rc={proc.returncode}\n{proc.stderr[-3000:]}"
        )
        results[rank] = json.loads(Path(path).read_text())
    return results


def _norms(log_dir: str) -> dict[int, float]:
    acc = ea.EventAccumulator(log_dir, size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("healthmon/grad/norm")}


def test_ddp_norms_equal_one_process_on_the_global_batch(tmp_path: Any) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from ddp_script import GLOBAL_BATCH, ShardedClassifier, shard

    results = _launch(str(tmp_path / "ddp"), "norms")
    assert results[0]["report_path"] and results[1]["report_path"] is None  # only rank 0 writes
    ddp = _norms(os.path.dirname(results[0]["report_path"]))

    class Single(ShardedClassifier):
        def train_dataloader(self) -> Any:
            loader = shard(0, 1)
            assert loader.batch_size == GLOBAL_BATCH
            return loader

    torch.manual_seed(0)
    mon = HealthMonitor(summary=False)
    t = trainer(tmp_path / "single", [mon], max_steps=8)
    t.fit(Single())
    single = _norms(t.logger.log_dir)
    assert sorted(ddp) == sorted(single) == list(range(8))
    for step in single:
        assert ddp[step] == pytest.approx(single[step], rel=1e-5)


def test_alert_on_one_rank_stops_every_rank_and_reaches_rank_0(tmp_path: Any) -> None:
    results = _launch(str(tmp_path), "stop")
    assert results[0]["global_step"] == results[1]["global_step"] <= 4
    assert all(r["weights_finite"] for r in results.values())
    rank0 = {a["code"]: a for a in results[0]["alerts"]}
    assert "loss.nonfinite" in rank0 and "[rank 1]" in rank0["loss.nonfinite"]["message"]
    report = json.loads(Path(results[0]["report_path"]).read_text())
    assert "loss.nonfinite" in {a["code"] for a in report["alerts"]}
    assert report["run"]["status"] == "stopped" and report["run"]["world_size"] == 2


def test_raise_on_one_rank_raises_on_every_rank_without_a_hang(tmp_path: Any) -> None:
    results = _launch(str(tmp_path), "raise")
    assert results[1]["raised"] == "activation.nonfinite"  # the origin: the NaN literal of ddp_script.py
    assert results[0]["raised"] is not None
    assert all(r["weights_finite"] for r in results.values())
