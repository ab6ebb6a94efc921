"""grad.dead_units: raw pixel values (0..16) and a large learning rate kill the ReLUs.

Unscaled inputs make the first steps huge; many hidden units are pushed to a negative bias for
every input, output 0, pass no gradient, and never recover (dying ReLU).

    python examples/bugs/grad_dead_units.py          # raw pixels
    python examples/bugs/grad_dead_units.py --fix    # standardised inputs
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _common import Classifier, fit, loader, mlp, parse

from healthmon import Alert, GradientUnderflowMonitor


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=20)
    data = loader(raw=not args.fix)  # the fix: standardise the inputs
    return fit(Classifier(mlp(64), lr=0.5), data, args, monitors=[GradientUnderflowMonitor(every_n_steps=5)])


if __name__ == "__main__":
    main(sys.argv[1:])
