"""grad.nonfinite: the torch.where trap, torch.where(h > 0, torch.sqrt(h), 0).

A "safe" square-root feature: the where keeps only h > 0, so the forward pass is finite. But the
backward of sqrt is evaluated for every entry: at h <= 0 it is inf or NaN, and the zero gradient
where sends to the discarded branch gives 0 * inf = NaN. healthmon names the sqrt's line.

    python examples/bugs/grad_nonfinite_where.py          # NaN gradients, finite loss
    python examples/bugs/grad_nonfinite_where.py --fix    # the safe-where pattern
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from _common import Classifier, fit, loader, parse
from torch import nn

from healthmon import Alert


class SqrtFeature(nn.Module):
    fix = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.fix:
            return torch.where(h > 0, torch.sqrt(torch.where(h > 0, h, 1.0)), 0.0)  # the fix
        return torch.where(h > 0, torch.sqrt(h), 0.0)


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=5)
    feature = SqrtFeature()
    feature.fix = args.fix
    net = nn.Sequential(nn.Linear(64, 32), feature, nn.Linear(32, 10))
    return fit(Classifier(net), loader(), args)


if __name__ == "__main__":
    main(sys.argv[1:])
