"""The ``>>>`` examples in the numerics, the schedules, the argument checks and the alert registry run.

Every module of :mod:`healthmon.numerics` (found with ``pkgutil``, packages included) is run
through ``doctest.testmod``; a failing example fails its module's test. The examples are small
and deterministic (seeded generators, exact small-integer results), so they stay fast.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import healthmon.numerics

EXTRA_MODULES = ("healthmon.schedules", "healthmon._checks", "healthmon.alerts")

#: Modules whose examples this test guarantees, with the least number of examples each holds.
EXPECTED = {
    "healthmon.numerics.gradients": 8,
    "healthmon.numerics.precision": 4,
    "healthmon.numerics.stability": 3,
    "healthmon.numerics.eigensolvers.lanczos": 4,
    "healthmon.numerics.eigensolvers.power": 4,
    "healthmon.numerics.eigensolvers.ritz": 4,
    "healthmon.numerics.eigensolvers.operators": 3,
    "healthmon.numerics.eigensolvers.negative_curvature": 4,
    "healthmon.numerics.logits.kinds": 4,
    "healthmon.numerics.logits.values": 2,
    "healthmon.numerics.views": 1,
    "healthmon.schedules": 5,
    "healthmon._checks": 5,
    "healthmon.alerts": 2,
}


def _modules() -> list[str]:
    found = [m.name for m in pkgutil.walk_packages(healthmon.numerics.__path__, prefix="healthmon.numerics.")]
    return sorted(found) + list(EXTRA_MODULES)


MODULES = _modules()


def _run(name: str) -> doctest.TestResults:
    module = importlib.import_module(name)
    return doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=True, verbose=False)


@pytest.mark.parametrize("name", MODULES)
def test_module_examples_pass(name: str) -> None:
    result = _run(name)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see output)"
    assert result.attempted >= EXPECTED.get(name, 0), f"{name}: only {result.attempted} examples ran"


def test_every_expected_module_is_collected() -> None:
    missing = sorted(set(EXPECTED) - set(MODULES))
    assert missing == []
    assert sum(EXPECTED.values()) >= 50
