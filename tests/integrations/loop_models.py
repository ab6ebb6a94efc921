"""Models and a hand-written training loop shared by the plain-PyTorch and Fabric tests.

``train`` is the loop a user writes, with healthmon's lines marked; ``hm=None`` runs the very same
loop without healthmon (the observer-effect twin).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tensorboard.backend.event_processing import event_accumulator as ea
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/models.py
from models import digits_loader


def mlp(*widths: int, softmax: bool = False, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """64 -> widths (default 32) -> 10 on the digits, ReLU between (a final softmax is the logits bug)."""
    sizes = [64, *(widths or (32,))]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], 10))
    if softmax:
        layers.append(nn.Softmax(dim=-1))
    return nn.Sequential(*layers).to(dtype)


def batches(batch_size: int = 64, seed: int = 0) -> Iterator[Any]:
    """Digits batches, epoch after epoch (a fixed shuffle per seed)."""
    loader = digits_loader(batch_size, seed=seed)
    while True:
        yield from loader


def train(
    hm: Any,
    optimizer: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    steps: int,
    *,
    data: Iterator[Any] | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    scaler: Any = None,
    clip: Callable[[], Any] | None = None,
    gradients_ready: bool = False,
    accumulate: int = 1,
) -> list[float]:
    """``steps`` optimizer steps of a plain loop; returns the micro-batch losses.

    ``clip`` clips between backward and the step; ``gradients_ready`` calls ``hm.gradients_ready()``
    before it (after ``scaler.unscale_`` with a scaler); stops early when ``hm.should_stop``.
    """
    data = data if data is not None else batches()
    backward = backward or (lambda loss: loss.backward())
    losses: list[float] = []
    for _step in range(steps):
        for _ in range(accumulate):
            batch = next(data)
            loss = hm.step(loss_fn, batch) if hm is not None else loss_fn(batch)  # healthmon line 2
            losses.append(float(loss.detach()))
            loss = loss / accumulate
            backward(scaler.scale(loss) if scaler is not None else loss)
        if clip is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if gradients_ready and hm is not None:
                hm.gradients_ready()
            clip()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()
        if hm is not None and hm.should_stop:
            break
    return losses


def scalars(log_dir: str) -> dict[str, dict[int, float]]:
    acc = ea.EventAccumulator(log_dir, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def line_of(path: str, marker: str) -> str:
    """``relpath:LINE`` of the line of ``path`` that ends with ``# BUG: marker``."""
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.rstrip().endswith(f"# BUG: {marker}"):
                return f"{os.path.relpath(path)}:{i}"
    raise AssertionError(marker)


class BatchNormDropout(nn.Module):
    """BatchNorm buffers and dropout draws: what a replay must leave exactly as it found them."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
