"""healthmon in a plain PyTorch loop: three added lines, marked ``# healthmon``.

The third, ``hm.gradients_ready()``, is only needed because this loop clips gradients.

    python examples/plain_pytorch.py                # healthy run
    python examples/plain_pytorch.py --lr 10        # a learning rate 100x too high: see the alerts
    python examples/plain_pytorch.py --amp          # fp16 autocast with a GradScaler and clipping

Trains a small MLP on scikit-learn's digits (bundled, no download) on the CPU in a few seconds,
writes TensorBoard event files and the JSON report under ./runs/plain_pytorch, and prints
healthmon's summary with the commands to see the charts and the HTML report.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import healthmon


def loader(batch_size: int = 64) -> DataLoader:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return DataLoader(TensorDataset(x, torch.tensor(data.target)), batch_size=batch_size, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--amp", action="store_true", help="float16 autocast, a GradScaler, clipping")
    parser.add_argument("--log-dir", default="runs/plain_pytorch")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=args.amp)

    def compute_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        with torch.autocast("cpu", dtype=torch.float16, enabled=args.amp):
            return F.cross_entropy(model(x), y)

    data = loader()
    with healthmon.watch(model, optimizer, scaler=scaler, log_dir=args.log_dir) as hm:  # healthmon
        for _ in range(args.epochs):
            for batch in data:
                loss = hm.step(compute_loss, batch)  # healthmon: was `loss = compute_loss(batch)`
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                hm.gradients_ready()  # healthmon: check before clipping (done already if the scaler is on)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
            if hm.should_stop:  # only with on_alert="stop"
                break
    print(f"{hm.global_step} steps; report: {hm.report_path}")


if __name__ == "__main__":
    main()
