"""grad.nonfinite: a hand-written L2-norm penalty, sqrt(sum(w**2)), at a weight that is exactly 0.

A group-lasso penalty on every parameter tensor; the biases are initialised to zero. The loss is
finite, but d sqrt(s)/ds is infinite at s = 0 and inf * 0 = NaN in every bias gradient.

    python examples/bugs/grad_nonfinite.py          # NaN gradients from the first step
    python examples/bugs/grad_nonfinite.py --fix    # torch.linalg.vector_norm: subgradient 0 at 0
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from _common import Classifier, fit, loader, parse
from torch import nn

from healthmon import Alert


class GroupLasso(Classifier):
    fix = False

    def __init__(self) -> None:
        super().__init__()
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.fix:
            penalty = sum(torch.linalg.vector_norm(p) for p in self.parameters())  # the fix
        else:
            penalty = sum(torch.sqrt((p**2).sum()) for p in self.parameters())
        return F.cross_entropy(logits, y) + 1e-3 * penalty


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=5)
    model = GroupLasso()
    model.fix = args.fix
    return fit(model, loader(), args)


if __name__ == "__main__":
    main(sys.argv[1:])
