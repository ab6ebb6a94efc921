"""logits.clamped_scores: a ReLU after the last layer, then F.cross_entropy on its output.

The class scores cannot go below 0, and every score that the ReLU holds at exactly 0 passes no
gradient: on these digits about half of them at any step. Measured (SGD lr 0.1, batch 64): 69%
accuracy at step 50 and 81% at step 100, against 87% and 94% without the ReLU.

    python examples/bugs/logits_clamped_scores.py          # nn.ReLU on the scores
    python examples/bugs/logits_clamped_scores.py --fix    # drop it
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _common import Classifier, fit, loader, mlp, parse
from torch import nn

from healthmon import Alert, LogitsCheck


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=4)
    net = mlp(32) if args.fix else nn.Sequential(mlp(32), nn.ReLU())  # the fix: no ReLU on the scores
    return fit(Classifier(net), loader(), args, monitors=[LogitsCheck(every_n_steps=2)])


if __name__ == "__main__":
    main(sys.argv[1:])
