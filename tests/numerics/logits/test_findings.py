"""healthmon.numerics.logits.findings: one finding per code and line, counted, handed out once."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from healthmon.numerics.logits import LogitsInterceptor
from healthmon.numerics.source_lines import SourceLineFinder


def _data() -> tuple[torch.Tensor, torch.Tensor, None]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 5, generator=g) * 2, torch.randint(0, 5, (16,), generator=g), None


def test_same_call_site_is_one_finding_with_a_count() -> None:
    x, y, _ = _data()
    mode = LogitsInterceptor()
    with mode:
        for _ in range(3):
            F.cross_entropy(F.softmax(x, -1), y)
    findings = mode.findings()
    assert len(findings) == 1 and findings[0].count == 3
    assert mode.findings() == []  # findings are handed out once


def test_the_callers_finder_names_the_line() -> None:
    x, y, _ = _data()
    finder = SourceLineFinder()
    mode = LogitsInterceptor(source_lines=finder)
    with mode:
        line = inspect.currentframe().f_lineno + 1
        F.cross_entropy(F.softmax(x, -1), y)
    (finding,) = mode.findings()
    assert mode.source_lines is finder
    assert finding.where is not None and finding.where.endswith(f"test_findings.py:{line}")
