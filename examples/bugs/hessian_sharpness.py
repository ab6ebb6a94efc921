"""hessian.sharpness: a learning rate above 2 / lambda_max.

Gradient descent is stable along an eigenvector of the Hessian only while lr < 2 / lambda (the
step overshoots the valley's floor by less than it started). Here lr=4 puts 2/lr = 0.5 below the
top eigenvalue (~1): the loss oscillates along the sharpest direction.

    python examples/bugs/hessian_sharpness.py          # lr=4
    python examples/bugs/hessian_sharpness.py --fix    # lr=0.1: 2/lr = 20, far above lambda_max
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _common import Classifier, fit, loader, parse

from healthmon import Alert, HessianEigenMonitor


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=6)
    lr = 0.1 if args.fix else 4.0  # the fix
    hessian = HessianEigenMonitor(every_n_steps=5, negative_curvature=False, max_products=40)
    return fit(Classifier(lr=lr), loader(), args, monitors=[hessian])


if __name__ == "__main__":
    main(sys.argv[1:])
