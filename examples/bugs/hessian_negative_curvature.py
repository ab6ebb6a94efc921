"""hessian.negative_curvature (info): all weights initialised to zero put the run on a saddle point.

With every weight 0 the hidden units are identical and the loss surface at the origin curves up
in some directions and down in others: a saddle, not a minimum. Gradient descent leaves it
slowly; random initialisation breaks the symmetry. Note: healthy runs also show some negative
curvature early in training; the info alert says where you are, not that something is broken.

    python examples/bugs/hessian_negative_curvature.py          # zero initialisation (tanh MLP)
    python examples/bugs/hessian_negative_curvature.py --fix    # the default random initialisation
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _common import Classifier, fit, loader, mlp, parse
from torch import nn

from healthmon import Alert, HessianEigenMonitor


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=2)
    net = mlp(32, activation=nn.Tanh)
    if not args.fix:  # the fix: delete these two lines
        for p in net.parameters():
            nn.init.zeros_(p)
    hessian = HessianEigenMonitor(every_n_steps=5, max_products=40)
    return fit(Classifier(net), loader(), args, monitors=[hessian])


if __name__ == "__main__":
    main(sys.argv[1:])
