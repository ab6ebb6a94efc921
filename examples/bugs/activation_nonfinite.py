"""activation.nonfinite: per-batch standardisation divides by a standard deviation of 0.

The raw digits have pixels that are 0 in every image (the corners). A hand-written input
normalisation layer computes (x - mean) / std per pixel: 0 / 0 = NaN in its output.

    python examples/bugs/activation_nonfinite.py          # NaN out of the `net.0` layer
    python examples/bugs/activation_nonfinite.py --fix    # add an epsilon to the denominator
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from _common import Classifier, fit, loader, mlp, parse
from torch import nn

from healthmon import Alert


class Standardize(nn.Module):
    def __init__(self, eps: float = 0.0) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(0)) / (x.std(0) + self.eps)


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=5)
    eps = 1e-5 if args.fix else 0.0  # the fix
    model = Classifier(nn.Sequential(Standardize(eps), mlp(32)))
    return fit(model, loader(raw=True), args)


if __name__ == "__main__":
    main(sys.argv[1:])
