"""logits.probabilities: a Softmax at the end of the model, then F.cross_entropy on its output.

cross_entropy applies log_softmax itself; fed probabilities it computes log_softmax(softmax(z)):
the loss saturates near log(10) and the gradient is squashed, so training crawls.

    python examples/bugs/logits_probabilities.py          # probabilities reach cross_entropy
    python examples/bugs/logits_probabilities.py --fix    # drop the nn.Softmax layer
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _common import Classifier, fit, loader, mlp, parse
from torch import nn

from healthmon import Alert, LogitsCheck


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=4)
    net = mlp(32) if args.fix else nn.Sequential(mlp(32), nn.Softmax(dim=-1))  # the fix
    return fit(Classifier(net), loader(), args, monitors=[LogitsCheck(every_n_steps=2)])


if __name__ == "__main__":
    main(sys.argv[1:])
