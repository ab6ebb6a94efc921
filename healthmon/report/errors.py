"""The errors of the offline side: each is one line for the CLI to print (exit status 2)."""

from __future__ import annotations


class ReportError(ValueError):
    """Input that cannot be read: missing, not JSON, not a healthmon report, or corrupt."""


class MissingDependencyError(ReportError):
    """The HTML report needs matplotlib (the ``healthmon[report]`` extra)."""
