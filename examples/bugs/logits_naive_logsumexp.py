"""logits.naive_logsumexp: cross-entropy written as log(sum(exp(z))) - z_y.

exp overflows to inf once a logit passes ~88 (float32); subtracting the max first, as
torch.logsumexp does, never overflows.

    python examples/bugs/logits_naive_logsumexp.py          # log(sum(exp(z)))
    python examples/bugs/logits_naive_logsumexp.py --fix    # torch.logsumexp
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from _common import Classifier, fit, loader, parse

from healthmon import Alert, LogitsCheck


class HandWrittenCE(Classifier):
    fix = False

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.fix:
            lse = torch.logsumexp(logits, dim=-1)  # the fix
        else:
            lse = torch.log(torch.exp(logits).sum(dim=-1))
        return (lse - logits.gather(1, y[:, None]).squeeze(1)).mean()


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=4)
    model = HandWrittenCE()
    model.fix = args.fix
    return fit(model, loader(), args, monitors=[LogitsCheck(every_n_steps=2)])


if __name__ == "__main__":
    main(sys.argv[1:])
