"""logits.sigmoid_bce (info): one-vs-rest training with nn.BCELoss on torch.sigmoid outputs.

Legal, but BCELoss has to clamp log(0) at -100 once sigmoid saturates; BCEWithLogitsLoss works
on the logits with the log-sum-exp trick and keeps the exact gradient.

    python examples/bugs/logits_sigmoid_bce.py          # BCELoss(sigmoid(z), y)
    python examples/bugs/logits_sigmoid_bce.py --fix    # BCEWithLogitsLoss(z, y)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from _common import Classifier, fit, loader, parse
from torch import nn

from healthmon import Alert, LogitsCheck


class OneVsRest(Classifier):
    fix = False

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = F.one_hot(y, 10).float()
        if self.fix:
            return nn.BCEWithLogitsLoss()(logits, target)  # the fix
        return nn.BCELoss()(torch.sigmoid(logits), target)


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=4)
    model = OneVsRest()
    model.fix = args.fix
    return fit(model, loader(), args, monitors=[LogitsCheck(every_n_steps=2)])


if __name__ == "__main__":
    main(sys.argv[1:])
