"""Under DDP (2 CPU processes, gloo) every rank gets the lambda_max of one process on the global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import pytorch_lightning as pl
    import torch
    from healthmon.monitors.hessian import HessianEigenMonitor
    from torch.utils.data import DataLoader, TensorDataset
    from tests.models import DigitsClassifier, digits

    def main(out, mode):
        torch.manual_seed(0)
        model = DigitsClassifier(hidden=(16,), activation=torch.nn.Tanh)
        mon = HessianEigenMonitor(every_n_steps=1, top_k=2, tol=1e-4)
        devices = dict(strategy="ddp", devices=2) if mode == "ddp" else dict(devices=1)
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[mon],
            use_distributed_sampler=False, **devices,
        )
        # the global batches are rows 0..127 and 128..255; rank r gets rows r, r+2, ... of each
        x, y = digits()
        rank, world = trainer.global_rank, trainer.world_size
        data = TensorDataset(x[:256][rank::world], y[:256][rank::world])
        trainer.fit(model, DataLoader(data, batch_size=128 // world, shuffle=False))
        est = mon.last_estimate
        with open(f"{out}/{mode}_{trainer.global_rank}.json", "w") as f:
            json.dump({
                "top": list(est.top.eigenvalues), "min": est.lambda_min, "converged": est.top.all_converged,
                "world": trainer.world_size, "logged": mon.driver.log_dir is not None,
                "estimates": mon.estimates,
            }, f)

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_lambda_max_matches_single_process(tmp_path: Path) -> None:
    script = tmp_path / "run_hessian.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["MASTER_ADDR"], env["MASTER_PORT"] = "127.0.0.1", str(_free_port())
    for mode in ("single", "ddp"):
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path), mode], cwd=tmp_path, env=env,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = json.loads((tmp_path / "single_0.json").read_text())
    ranks = [json.loads((tmp_path / f"ddp_{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    assert [r["logged"] for r in ranks] == [True, False]  # only rank zero writes
    assert ranks[0]["top"] == ranks[1]["top"] and ranks[0]["min"] == ranks[1]["min"]  # same on every rank
    assert all(r["converged"] for r in ranks) and single["converged"]
    assert ranks[0]["estimates"] == single["estimates"] == 2
    for got, want in zip(ranks[0]["top"], single["top"], strict=True):
        assert got == pytest.approx(want, rel=1e-4)
    assert ranks[0]["min"] == pytest.approx(single["min"], rel=1e-3)
