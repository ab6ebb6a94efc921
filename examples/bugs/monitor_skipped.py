"""monitor.skipped (info): HessianEigenMonitor has no stability limit for RMSprop.

The sharpness test compares lambda_max with the optimizer's stability limit, known for SGD
(2/lr, with momentum (2 + 2 beta)/lr) and Adam-type optimizers. For others the check is skipped
and says so once, instead of staying silent.

    python examples/bugs/monitor_skipped.py          # RMSprop: the sharpness test is skipped
    python examples/bugs/monitor_skipped.py --fix    # SGD: the test runs
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _common import Classifier, fit, loader, parse

from healthmon import Alert, HessianEigenMonitor


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=2)
    optimizer = "sgd" if args.fix else "rmsprop"  # the fix (for the check, not for the run)
    model = Classifier(lr=0.01, optimizer=optimizer)
    hessian = HessianEigenMonitor(every_n_steps=5, negative_curvature=False, max_products=40)
    return fit(model, loader(), args, monitors=[hessian])


if __name__ == "__main__":
    main(sys.argv[1:])
