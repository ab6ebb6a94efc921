"""grad.vanishing: a deep stack of sigmoids with the default initialisation.

Each sigmoid multiplies the backward signal by at most 1/4: after ten of them the first layers
get gradients orders of magnitude smaller than the last and stop learning.

    python examples/bugs/grad_vanishing.py          # 10 x (Linear, Sigmoid)
    python examples/bugs/grad_vanishing.py --fix    # ReLU activations with He (Kaiming) init
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _common import Classifier, fit, loader, mlp, parse
from torch import nn

from healthmon import Alert, GradientUnderflowMonitor


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=4)
    net = mlp(*[32] * 10, activation=nn.ReLU if args.fix else nn.Sigmoid)  # the fix: ReLU ...
    if args.fix:  # ... with He initialisation, which keeps the signal's scale through depth
        for m in net:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
    return fit(Classifier(net), loader(), args, monitors=[GradientUnderflowMonitor(every_n_steps=2)])


if __name__ == "__main__":
    main(sys.argv[1:])
