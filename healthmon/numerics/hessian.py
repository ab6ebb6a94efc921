"""The Hessian toolkit in one import: products, eigen-solvers, trace, spectrum, stability limits.

Each idea lives in its own module; this one re-exports them so that
``from healthmon.numerics.hessian import ...`` keeps working:

* :mod:`healthmon.numerics.hvp` - :class:`HessianOperator` (``v -> H v``), :func:`mean_over_ranks`.
* :mod:`healthmon.numerics.eigensolvers` - :func:`lanczos`, :func:`power_iteration`,
  :func:`most_negative_eigenvalue` on any matvec.
* :mod:`healthmon.numerics.trace` - :func:`hutchinson_trace`.
* :mod:`healthmon.numerics.spectrum` - :func:`estimate_spectrum` (top-k, ``lambda_min``, trace).
* :mod:`healthmon.numerics.stability` - :func:`stability_limit`, :func:`adam_preconditioner`.
* :mod:`healthmon.numerics.batches` - probe-batch slicing and chunks.
"""

from __future__ import annotations

from healthmon.numerics.batches import batch_size, slice_batch, split_batch
from healthmon.numerics.eigensolvers import (
    SOLVERS,
    EigenResult,
    MatVec,
    Solver,
    Which,
    basis_capacity,
    lanczos,
    minimum_memory_factor,
    most_negative_eigenvalue,
    power_iteration,
)
from healthmon.numerics.hvp import (
    HVP_METHODS,
    HessianOperator,
    HVPMethod,
    LossFn,
    choose_hvp_method,
    mean_over_ranks,
    time_hvp_methods,
)
from healthmon.numerics.spectrum import SpectrumEstimate, estimate_spectrum
from healthmon.numerics.stability import StabilityLimit, adam_preconditioner, preconditioned, stability_limit
from healthmon.numerics.trace import TraceEstimate, hutchinson_trace

__all__ = [
    "HVP_METHODS",
    "SOLVERS",
    "EigenResult",
    "HVPMethod",
    "HessianOperator",
    "LossFn",
    "MatVec",
    "Solver",
    "SpectrumEstimate",
    "StabilityLimit",
    "TraceEstimate",
    "Which",
    "adam_preconditioner",
    "basis_capacity",
    "batch_size",
    "choose_hvp_method",
    "estimate_spectrum",
    "hutchinson_trace",
    "lanczos",
    "minimum_memory_factor",
    "mean_over_ranks",
    "most_negative_eigenvalue",
    "power_iteration",
    "preconditioned",
    "slice_batch",
    "split_batch",
    "stability_limit",
    "time_hvp_methods",
]
