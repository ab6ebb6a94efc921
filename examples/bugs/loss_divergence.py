"""loss.divergence: lr=1e1 where 1e-1 was meant.

A learning rate 100x too large: every step overshoots and the loss climbs instead of falling.

    python examples/bugs/loss_divergence.py          # the loss blows up
    python examples/bugs/loss_divergence.py --fix    # lr=1e-1
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _common import Classifier, fit, loader, parse

from healthmon import Alert


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=40)
    lr = 1e-1 if args.fix else 1e1  # the fix
    return fit(Classifier(lr=lr), loader(), args)


if __name__ == "__main__":
    main(sys.argv[1:])
