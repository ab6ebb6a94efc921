"""loss.nonfinite: a class-balanced loss divides by the number of positives, which can be 0.

Task: "is this digit a zero?" (10% positives). The loss averages positives and negatives
separately so each class weighs the same; a batch with no zero in it divides 0 by 0 -> NaN.

    python examples/bugs/loss_nonfinite.py          # NaN loss, training destroyed
    python examples/bugs/loss_nonfinite.py --fix    # clamp the count to at least 1
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from _common import Classifier, fit, loader, parse

from healthmon import Alert


class ZeroDetector(Classifier):
    fix = False

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = (y == 0).float()
        bce = F.binary_cross_entropy_with_logits(logits[:, 0], target, reduction="none")
        n_pos, n_neg = target.sum(), (1 - target).sum()
        if self.fix:
            n_pos, n_neg = n_pos.clamp_min(1), n_neg.clamp_min(1)  # the fix
        return (bce * target).sum() / n_pos + (bce * (1 - target)).sum() / n_neg


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=30)
    model = ZeroDetector()
    model.fix = args.fix
    return fit(model, loader(batch_size=8), args)


if __name__ == "__main__":
    main(sys.argv[1:])
