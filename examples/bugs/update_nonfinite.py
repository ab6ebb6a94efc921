"""update.nonfinite: Adam's default eps=1e-8 on float16 weights ("16-true").

1e-8 is below half the smallest float16 subnormal (5.96e-8), so it rounds to 0 and sqrt(v) + eps
no longer protects the division: wherever the second-moment estimate v of a small gradient
underflows to 0, the update m / sqrt(v) divides by zero and writes inf/NaN into the weights. The
gradients were finite: the optimizer step is the culprit (the seed's (a + 1e-8) == a).

    python examples/bugs/update_nonfinite.py          # Adam(eps=1e-8) on float16 weights
    python examples/bugs/update_nonfinite.py --fix    # an eps float16 can represent: 1e-4
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from _common import Classifier, fit, loader, parse

from healthmon import Alert


class Fp16Adam(Classifier):
    eps = 1e-8

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3, eps=self.eps)


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=10)
    model = Fp16Adam()
    model.eps = 1e-4 if args.fix else 1e-8  # the fix
    return fit(model, loader(), args, precision="16-true")


if __name__ == "__main__":
    main(sys.argv[1:])
