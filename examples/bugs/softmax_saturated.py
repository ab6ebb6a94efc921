"""softmax.saturated: a sharpened sigmoid (temperature 0.02) saturates to exactly 1.0 before the loss.

sigmoid(z / T) is exactly 1.0 in float32 once z / T > ~17: BCE sees a probability of 1, its log
is clamped and the gradient through that example is lost.

    python examples/bugs/softmax_saturated.py          # probabilities exactly 0 or 1 reach the loss
    python examples/bugs/softmax_saturated.py --fix    # the logits form of the loss
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from _common import Classifier, fit, loader, parse

from healthmon import Alert, LogitsCheck

TEMPERATURE = 0.02


class Sharpened(Classifier):
    fix = False

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = F.one_hot(y, 10).float()
        if self.fix:
            return F.binary_cross_entropy_with_logits(logits / TEMPERATURE, target)  # the fix
        return F.binary_cross_entropy(torch.sigmoid(logits / TEMPERATURE), target)


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=4)
    model = Sharpened(lr=0.01)
    model.fix = args.fix
    return fit(model, loader(), args, monitors=[LogitsCheck(every_n_steps=2)])


if __name__ == "__main__":
    main(sys.argv[1:])
