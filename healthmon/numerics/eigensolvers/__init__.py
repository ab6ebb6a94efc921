"""Extreme eigenpairs of a symmetric operator given only ``v -> A v`` (pure torch).

Lanczos with full reorthogonalisation and thick restarts, and block power (subspace) iteration,
both with Rayleigh-Ritz. Every eigenvalue reported is a Rayleigh-Ritz value of an orthonormal
basis, so it lies inside ``[lambda_min, lambda_max]`` whether or not it converged: an unconverged
top value is a lower bound on ``lambda_max`` and an unconverged bottom value an upper bound on
``lambda_min``. The ``converged`` flag is computed from the true residual
``||A y - theta y|| / |theta|`` of the returned pair (products are stored, so no extra product is
spent on it): it never claims more than was measured.

One idea per module:

* :mod:`~healthmon.numerics.eigensolvers.operators` - the operator in the working dtype, start
  vectors, argument checks, :data:`SOLVERS`.
* :mod:`~healthmon.numerics.eigensolvers.ritz` - :class:`EigenResult` and the Rayleigh-Ritz step.
* :mod:`~healthmon.numerics.eigensolvers.lanczos` - :func:`lanczos` and its memory budget.
* :mod:`~healthmon.numerics.eigensolvers.power` - :func:`power_iteration`.
* :mod:`~healthmon.numerics.eigensolvers.negative_curvature` - :func:`most_negative_eigenvalue`.
"""

from __future__ import annotations

from healthmon.numerics.eigensolvers.lanczos import basis_capacity, lanczos, minimum_memory_factor
from healthmon.numerics.eigensolvers.negative_curvature import most_negative_eigenvalue
from healthmon.numerics.eigensolvers.operators import (
    SOLVERS,
    MatVec,
    Solver,
    Which,
    operator_facts,
    vector_ratio,
    working_dtype,
)
from healthmon.numerics.eigensolvers.power import power_iteration
from healthmon.numerics.eigensolvers.ritz import EigenResult

__all__ = [
    "SOLVERS",
    "EigenResult",
    "MatVec",
    "Solver",
    "Which",
    "basis_capacity",
    "lanczos",
    "minimum_memory_factor",
    "most_negative_eigenvalue",
    "operator_facts",
    "power_iteration",
    "vector_ratio",
    "working_dtype",
]
