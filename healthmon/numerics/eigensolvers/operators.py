"""The operator as the solvers see it: ``v -> H v`` in a working dtype, its size, and start vectors.

A solver accepts a Hessian operator (anything callable with ``n``, ``dtype`` and ``device``
attributes) or a dense symmetric matrix. Whatever the operator's dtype, the solvers compute in
:func:`working_dtype` (float32 or float64): a bf16 Krylov basis loses orthogonality within a few
vectors.

>>> import torch
>>> product, n, work, device, op_dtype = operator_facts(torch.diag(torch.tensor([3.0, 1.0])), None)
>>> n, work, product(torch.tensor([1.0, 1.0])).tolist()
(2, torch.float32, [3.0, 1.0])
>>> working_dtype(torch.bfloat16), vector_ratio(torch.bfloat16)
(torch.float32, 2.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from healthmon._checks import positive_int

Which = Literal["largest", "smallest", "magnitude"]
Solver = Literal["lanczos", "power"]
MatVec = Callable[[Tensor], Tensor]

SOLVERS: tuple[str, ...] = ("lanczos", "power")


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the solvers compute in: float64 stays, anything else (bf16, fp16, fp32) is float32.

    Products of a low-precision model are rounded to its dtype, but the Krylov basis, its
    orthogonalisation and the projected problem must not be: a bf16 basis loses orthogonality
    within a few vectors and its Ritz values leave the spectrum.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def vector_ratio(dtype: torch.dtype) -> float:
    """Memory of one working-dtype vector over one parameter-dtype vector (bf16: 2, float32: 1)."""
    return working_dtype(dtype).itemsize / dtype.itemsize


def start_block(
    v0: Tensor | None,
    n: int,
    cols: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    """The start vectors: ``v0`` (``(n,)`` or ``(n, j)``) padded with Gaussian columns to ``cols``."""
    parts = []
    if v0 is not None:
        v0 = v0.reshape(n, -1).to(dtype=dtype, device=device)
        if torch.isfinite(v0).all():
            parts.append(v0)
    have = sum(p.shape[1] for p in parts)
    if have < cols:
        parts.append(torch.randn(n, cols - have, generator=generator, dtype=dtype).to(device))
    return torch.cat(parts, 1)


def check_solver_args(k: int, tol: float, max_products: int) -> None:
    """Validate the arguments every solver takes, with errors that name them."""
    positive_int(k, "k")
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"`tol`: expected a number in (0, 1), got {tol!r}.")
    if isinstance(max_products, bool) or not isinstance(max_products, int) or max_products < k:
        raise ValueError(f"`max_products`: expected an integer >= k = {k}, got {max_products!r}.")


def operator_facts(
    matvec: MatVec | Tensor, n: int | None
) -> tuple[MatVec, int, torch.dtype, torch.device, torch.dtype]:
    """The product in the working dtype, the dimension, the working dtype, device and operator dtype.

    A dense symmetric matrix works too. Products of a low-precision operator are cast to
    :func:`working_dtype` (float32), so the solvers never compute in bf16/fp16.
    """
    if isinstance(matvec, Tensor):
        dense = matvec
        n, op_dtype, device = dense.shape[0], dense.dtype, dense.device
        work = working_dtype(op_dtype)
        return (lambda v: (dense @ v.to(op_dtype)).to(work)), n, work, device, op_dtype
    n = getattr(matvec, "n", n)
    if n is None:
        raise ValueError("`n`: expected the operator's dimension (the operator has no `.n`), got None.")
    op_dtype = getattr(matvec, "dtype", torch.float32)
    work = working_dtype(op_dtype)
    inner = matvec

    def product(v: Tensor) -> Tensor:
        out = inner(v if op_dtype == work else v.to(op_dtype))
        return out if out.dtype == work else out.to(work)

    return product, int(n), work, getattr(matvec, "device", torch.device("cpu")), op_dtype
