"""logits.unnormalized_log_probs: F.nll_loss on the raw scores of the model, without log_softmax.

nll_loss expects log-probabilities and returns -input[y]. Fed raw scores, nothing normalises the
rows, so the loss is unbounded below: it falls forever by inflating the target's score. Measured
on these digits (SGD lr 0.1, batch 64): at step 300 the loss is -7.5e13 and the accuracy 24%
(it peaked at 63% near step 50), against a loss of 0.10 and 98% accuracy with the fix.

    python examples/bugs/logits_unnormalized_log_probs.py          # nll_loss on raw scores
    python examples/bugs/logits_unnormalized_log_probs.py --fix    # F.log_softmax first
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from _common import Classifier, fit, loader, parse

from healthmon import Alert, LogitsCheck


class NLLClassifier(Classifier):
    fix = False

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.fix:
            return F.nll_loss(F.log_softmax(logits, dim=1), y)  # the fix
        return F.nll_loss(logits, y)


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=4)
    model = NLLClassifier()
    model.fix = args.fix
    return fit(model, loader(), args, monitors=[LogitsCheck(every_n_steps=2)])


if __name__ == "__main__":
    main(sys.argv[1:])
