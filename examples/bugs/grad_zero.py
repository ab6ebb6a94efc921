"""grad.zero: activations quantised with torch.round in the forward pass.

round() is flat almost everywhere: its derivative is exactly 0, so every layer before it gets an
all-zero gradient and never learns ("you are probably rounding your gradient to zero somewhere").

    python examples/bugs/grad_zero.py          # the first layer's gradient is exactly zero
    python examples/bugs/grad_zero.py --fix    # straight-through estimator
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from _common import Classifier, fit, loader, parse
from torch import nn

from healthmon import Alert, GradientUnderflowMonitor


class Quantize(nn.Module):
    straight_through = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.round(x * 4) / 4
        if self.straight_through:
            return x + (q - x).detach()  # the fix: forward rounds, backward passes through
        return q


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=4)
    quant = Quantize()
    quant.straight_through = args.fix
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), quant, nn.Linear(32, 10))
    return fit(Classifier(net), loader(), args, monitors=[GradientUnderflowMonitor(every_n_steps=2)])


if __name__ == "__main__":
    main(sys.argv[1:])
