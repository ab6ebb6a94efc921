"""healthmon in a Lightning Fabric loop: three added lines, marked ``# healthmon``.

    python examples/fabric.py                     # healthy run
    python examples/fabric.py --lr 10             # a learning rate 100x too high: see the alerts
    python examples/fabric.py --devices 2         # DDP on two CPU processes (gloo)

Trains a small MLP on scikit-learn's digits (bundled, no download) on the CPU in a few seconds,
with ``fabric.backward`` and ``fabric.clip_gradients`` (healthmon checks the gradients inside it,
before clipping). Writes TensorBoard event files and the JSON report under ./runs/fabric and
prints healthmon's summary with the commands to see the charts and the HTML report.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import healthmon


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--log-dir", default="runs/fabric")
    args = parser.parse_args()
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto")
    fabric.launch()
    fabric.seed_everything(0)
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    loader = fabric.setup_dataloaders(
        DataLoader(TensorDataset(x, torch.tensor(data.target)), batch_size=64, shuffle=True)
    )
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)

    def compute_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    with healthmon.watch(model, optimizer, fabric=fabric, log_dir=args.log_dir) as hm:  # healthmon
        for _ in range(args.epochs):
            for batch in loader:
                loss = hm.step(compute_loss, batch)  # healthmon: was `loss = compute_loss(batch)`
                fabric.backward(loss)
                fabric.clip_gradients(model, optimizer, max_norm=5.0)
                optimizer.step()
                optimizer.zero_grad()
            if hm.should_stop:  # only with on_alert="stop"
                break
    if fabric.is_global_zero:
        print(f"{hm.global_step} steps; report: {hm.report_path}")


if __name__ == "__main__":
    main()
