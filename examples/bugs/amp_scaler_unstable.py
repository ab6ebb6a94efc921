"""amp.scaler_unstable: fp16 training whose gradients are NaN at every loss scale.

A "spread" regulariser pushes the hidden features of a batch apart: minus their mean pairwise
distance, written by hand as sqrt(sum((h_i - h_j)**2)). The pairs i == j have distance 0, and
d sqrt(s)/ds is infinite at s = 0, so every step's gradients hold NaN while the loss stays finite.
Under precision="16-mixed" the GradScaler takes the NaN for an fp16 overflow: it skips the step
and halves its scale, step after step. The loss never turns NaN, no step is applied, and the
run silently does not train.

    python examples/bugs/amp_scaler_unstable.py          # every step skipped, the scale collapses
    python examples/bugs/amp_scaler_unstable.py --fix    # torch.cdist: gradient 0 at distance 0
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from _common import Classifier, fit, loader, parse
from pytorch_lightning.plugins.precision import MixedPrecision

from healthmon import Alert


class SpreadRegularised(Classifier):
    fix = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        hidden = self.net[1](self.net[0](x))
        logits = self.net[2](hidden)
        h = hidden.float()
        if self.fix:
            distances = torch.cdist(h, h)  # the fix
        else:
            distances = ((h[:, None] - h[None]) ** 2).sum(-1).sqrt()
        return F.cross_entropy(logits, y) - 1e-3 * distances.mean()


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=25)
    model = SpreadRegularised()
    model.fix = args.fix
    # precision="16-mixed" on a GPU; on CPU Lightning would fall back to bf16, so the fp16
    # autocast plugin and its GradScaler are given explicitly
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    return fit(model, loader(), args, plugins=[fp16])


if __name__ == "__main__":
    main(sys.argv[1:])
