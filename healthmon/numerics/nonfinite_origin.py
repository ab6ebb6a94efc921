"""The old path of the NaN/Inf origin finder, kept for importers: see :mod:`healthmon.numerics.nonfinite`."""

from healthmon.numerics.nonfinite import (
    NonFiniteTracer,
    Origin,
    OriginTrace,
    batch_names,
    nonfinite_kinds,
    trace_nonfinite,
)

__all__ = ["NonFiniteTracer", "Origin", "OriginTrace", "batch_names", "nonfinite_kinds", "trace_nonfinite"]
