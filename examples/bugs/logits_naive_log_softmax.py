"""logits.naive_log_softmax: torch.log(F.softmax(z)) instead of F.log_softmax(z).

softmax rounds small probabilities to 0 and log(0) = -inf; log_softmax computes z - logsumexp(z)
without ever forming the probability.

    python examples/bugs/logits_naive_log_softmax.py          # log of a softmax
    python examples/bugs/logits_naive_log_softmax.py --fix    # F.log_softmax
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
            log_probs = F.log_softmax(logits, dim=-1)  # the fix
        else:
            log_probs = torch.log(F.softmax(logits, dim=-1))
        return F.nll_loss(log_probs, y)


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=4)
    model = NLLClassifier()
    model.fix = args.fix
    return fit(model, loader(), args, monitors=[LogitsCheck(every_n_steps=2)])


if __name__ == "__main__":
    main(sys.argv[1:])
