"""grad.explosion at step 0: a tanh RNN whose recurrent weights have a gain far above 1.

Pixel-by-pixel digits (64 steps of one pixel) through a tanh RNN. The recurrent weights were
scaled up ("to remember longer"): backpropagation through 64 steps multiplies the gradient by
them at each step, and the very first gradient is astronomically large. No running level exists
yet, so the spike rule cannot see it; the first-step rule judges each layer's update against its
weights and reports the RNN at step 0 (afterwards the saturated RNN passes no gradient at all).

    python examples/bugs/grad_explosion_first_step.py          # grad.explosion at step 0, at `rnn`
    python examples/bugs/grad_explosion_first_step.py --fix    # orthogonal recurrent weights
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from _common import Classifier, fit, loader, parse
from torch import nn

from healthmon import Alert


class PixelRNN(Classifier):
    def __init__(self, gain: float) -> None:
        super().__init__(nn.Identity(), lr=0.01)
        self.rnn = nn.RNN(1, 64, batch_first=True, nonlinearity="tanh")
        self.head = nn.Linear(64, 10)
        with torch.no_grad():
            if gain == 1.0:
                nn.init.orthogonal_(self.rnn.weight_hh_l0)
            else:
                self.rnn.weight_hh_l0.mul_(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x.reshape(x.shape[0], -1, 1))  # one pixel per time step
        return self.head(h[:, -1])


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=20)
    model = PixelRNN(gain=1.0 if args.fix else 10.0)  # the fix: orthogonal init, gain 1
    return fit(model, loader(), args)


if __name__ == "__main__":
    main(sys.argv[1:])
