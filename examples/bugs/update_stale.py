"""update.stale: bfloat16 weights with a small learning rate: w + lr * g == w.

bfloat16 keeps 8 bits of mantissa: a weight of 0.1 moves in steps of ~0.0005, and an update of
1e-6 rounds back to the same weight ("(a + 1e-8) == a in float32", worse in bf16). The loss
never moves.

    python examples/bugs/update_stale.py          # precision="bf16-true"
    python examples/bugs/update_stale.py --fix    # precision="bf16-mixed": float32 master weights
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _common import Classifier, fit, loader, mlp, parse

from healthmon import Alert, GradientUnderflowMonitor


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=4)
    precision = "bf16-mixed" if args.fix else "bf16-true"  # the fix
    return fit(
        Classifier(mlp(64), lr=1e-4),
        loader(),
        args,
        monitors=[GradientUnderflowMonitor(every_n_steps=2)],
        precision=precision,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
