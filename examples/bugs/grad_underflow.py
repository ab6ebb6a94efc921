"""grad.underflow: training in pure float16 ("16-true") without loss scaling.

float16's smallest normal number is 6.1e-5; many gradient entries of a small network are below
it, fall into the subnormal range (lost precision) or flush to zero.

    python examples/bugs/grad_underflow.py          # precision="16-true"
    python examples/bugs/grad_underflow.py --fix    # precision="bf16-mixed" (float32 weights and grads)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _common import Classifier, fit, loader, mlp, parse

from healthmon import Alert, GradientUnderflowMonitor


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=4)
    precision = "bf16-mixed" if args.fix else "16-true"  # the fix
    return fit(
        Classifier(mlp(64, 64), lr=0.01),
        loader(),
        args,
        monitors=[GradientUnderflowMonitor(every_n_steps=2)],
        precision=precision,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
