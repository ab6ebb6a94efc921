"""logits.naive_softmax: a confidence penalty computes softmax as exp(z) / exp(z).sum().

The entropy bonus needs the predicted probabilities; the hand-written softmax overflows for large
logits (inf / inf = NaN), torch.softmax subtracts the max first.

    python examples/bugs/logits_naive_softmax.py          # exp(z) / exp(z).sum()
    python examples/bugs/logits_naive_softmax.py --fix    # torch.softmax
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from _common import Classifier, fit, loader, parse

from healthmon import Alert, LogitsCheck


class ConfidencePenalty(Classifier):
    fix = False

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.fix:
            probs = torch.softmax(logits, dim=-1)  # the fix
        else:
            probs = torch.exp(logits) / torch.exp(logits).sum(dim=-1, keepdim=True)
        entropy = -(probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        return F.cross_entropy(logits, y) - 0.1 * entropy


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=4)
    model = ConfidencePenalty()
    model.fix = args.fix
    return fit(model, loader(), args, monitors=[LogitsCheck(every_n_steps=2)])


if __name__ == "__main__":
    main(sys.argv[1:])
