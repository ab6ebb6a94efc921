"""batch.nonfinite: missing values in the data arrive as NaN.

A few pixel values were lost when the data was exported (read back as NaN). The model is fine;
the batch is not: healthmon names the batch tensor (`batch[0]`) and the sample indices, and does
not blame a layer.

    python examples/bugs/batch_nonfinite.py          # NaN in 3 samples of the first batch
    python examples/bugs/batch_nonfinite.py --fix    # impute the missing values (column means)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from _common import Classifier, digits, fit, parse
from torch.utils.data import DataLoader, TensorDataset

from healthmon import Alert


def main(argv: Sequence[str] | None = None) -> list[Alert]:
    args = parse(__doc__, argv, steps=5)
    x, y = digits()
    x = x.clone()
    x[[5, 17, 40], 12] = float("nan")  # the lost values
    if args.fix:
        x = torch.where(torch.isnan(x), x.nanmean(0, keepdim=True), x)  # the fix: impute
    data = DataLoader(TensorDataset(x, y), batch_size=64)
    return fit(Classifier(), data, args)


if __name__ == "__main__":
    main(sys.argv[1:])
