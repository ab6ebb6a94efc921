"""activation.nonfinite: self-attention with a hand-written softmax, exp(scores) / sum.

Attention over the 8 rows of each digit, with the softmax written as torch.exp(scores) divided
by its sum. Raw pixel counts (0..16) make scores of several hundred: exp overflows float32 above
88.7, inf / inf = NaN. healthmon names the exp's line and shows the largest score; the batch is
clean and is not blamed.

    python examples/bugs/activation_nonfinite_overflow.py          # exp overflows
    python examples/bugs/activation_nonfinite_overflow.py --fix    # torch.softmax (subtracts the max)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from _common import Classifier, fit, loader, parse
from torch import nn

from healthmon import Alert


class RowAttention(nn.Module):
    fix = False

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.view(-1, 8, 8)
        q = self.q(rows)
        scores = q @ q.transpose(1, 2)
        if self.fix:
            attn = torch.softmax(scores, dim=-1)  # the fix
        else:
            w = torch.exp(scores)
            attn = w / w.sum(-1, keepdim=True)
        return self.head((attn @ rows).flatten(1))


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=5)
    model = RowAttention()
    model.fix = args.fix
    return fit(Classifier(model, lr=0.01), loader(raw=True), args)


if __name__ == "__main__":
    main(sys.argv[1:])
