"""Run by tests/integrations/test_fabric.py: healthmon.watch in a 2-process CPU (gloo) Fabric DDP loop.

Usage: python fabric_ddp_script.py OUT_DIR
One launch runs three loops in turn (a launch costs seconds): "norms" (healthy), "stop" and "raise"
(the loss turns NaN on rank 1 only from step 3; gradients stay finite). Rank r trains on rows
[64k + 32r, 64k + 32r + 32) of global batch k, so the averaged gradient is that of one process on
the whole global batch. Each rank writes OUT_DIR/<mode>_rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loop_models import mlp
from models import digits

import healthmon
from healthmon import NumericalHealthError

GLOBAL_BATCH = 64
STEPS = 8


def shard(rank: int, world: int) -> DataLoader:
    x, y = digits()
    per = GLOBAL_BATCH // world
    idx = torch.cat(
        [torch.arange(k * GLOBAL_BATCH + rank * per, k * GLOBAL_BATCH + (rank + 1) * per) for k in range(10)]
    )
    return DataLoader(TensorDataset(x[idx], y[idx]), batch_size=per, shuffle=False)


def fit(fabric: Any, out: str, mode: str) -> dict[str, Any]:
    """One watched loop; returns what the test checks."""
    torch.manual_seed(0)
    model = mlp()
    model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    rank = fabric.global_rank
    watch: dict[str, Any] = {}

    def loss_fn(batch: Any) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        if mode != "norms" and rank == 1 and watch["hm"].global_step >= 3:
            loss = loss + torch.tensor(float("nan"))  # NaN loss on this rank only
        return loss

    policy = {"norms": "warn", "stop": "stop", "raise": "raise"}[mode]
    raised = None
    hm = healthmon.watch(
        model,
        opt,
        fabric=fabric,
        log_dir=os.path.join(out, mode),
        on_alert=policy,
        summary=False,
        log_every_n_steps=1,
    )
    watch["hm"] = hm
    try:
        with hm:
            for _, batch in zip(range(STEPS), shard(rank, fabric.world_size), strict=False):
                loss = hm.step(loss_fn, batch)
                fabric.backward(loss)
                fabric.clip_gradients(model, opt, max_norm=100.0)
                opt.step()
                opt.zero_grad()
                if hm.should_stop:
                    break
    except NumericalHealthError as e:
        raised = e.alert.code
    return {
        "report_path": hm.report_path,
        "global_step": hm.global_step,
        "alerts": [a.to_dict() for a in hm.alerts],
        "raised": raised,
        "weights_finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "names": sorted(hm.driver.params.names.values()) if hm.driver.params else [],
        "clipping": hm.run.clipping,
        "world_size": hm.run.world_size,
    }


def main(out: str) -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    for mode in ("norms", "stop", "raise"):
        result = fit(fabric, out, mode)
        with open(os.path.join(out, f"{mode}_rank{fabric.global_rank}.json"), "w") as f:
            json.dump(result, f)
        fabric.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
