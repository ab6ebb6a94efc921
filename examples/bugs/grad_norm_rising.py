"""grad.norm_rising (info): the seed's figure, gradient norm rising while the loss falls.

Not a bug. Goodfellow's chapter 4 shows the gradient norm of a successful run *growing* over
training while the classification error falls: gradient descent is not approaching a critical
point. Starting from a small initialisation makes it plain: the weights grow, and with them the
gradient, while the loss goes down. healthmon reports it as an info so that a rising norm is not
mistaken for an explosion.

    python examples/bugs/grad_norm_rising.py          # weights initialised at half the default scale
    python examples/bugs/grad_norm_rising.py --fix    # the default scale (the norm often rises too)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from _common import Classifier, fit, loader, mlp, parse

from healthmon import Alert
from healthmon.monitors import GradientNormMonitor


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=400)  # the rule looks at a 200-step window
    torch.manual_seed(0)
    net = mlp(64, 64, 64)
    if not args.fix:
        with torch.no_grad():
            for layer in net:
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.mul_(0.5)  # a small initialisation
                    layer.bias.zero_()
    return fit(Classifier(net), loader(), args, monitors=[GradientNormMonitor()])


if __name__ == "__main__":
    main(sys.argv[1:])
