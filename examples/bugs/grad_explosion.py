"""grad.explosion: a learning-rate schedule with gamma=10 where 0.1 was meant.

StepLR multiplies the learning rate by gamma every `step_size` steps. A typo turns the decay
into growth: after a few jumps the step is far too large and the gradient norm spikes.

    python examples/bugs/grad_explosion.py          # the norm spikes after the lr jumps
    python examples/bugs/grad_explosion.py --fix    # gamma=0.1
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from _common import Classifier, fit, loader, parse

from healthmon import Alert


class Scheduled(Classifier):
    gamma = 10.0

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=25, gamma=self.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=70)
    model = Scheduled()
    model.gamma = 0.1 if args.fix else 10.0  # the fix
    return fit(model, loader(), args)


if __name__ == "__main__":
    main(sys.argv[1:])
