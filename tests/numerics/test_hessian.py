"""healthmon.numerics.hessian (the re-exporting facade) stays free of Lightning."""

from __future__ import annotations

import subprocess
import sys

from numerics.hessian_cases import Case, double_case, exact_hessian, rel  # noqa: F401


def test_numerics_do_not_import_lightning() -> None:
    code = (
        "import sys, healthmon.numerics.hessian; "
        "heavy = ('pytorch_lightning', 'lightning', 'tensorboard'); "
        "bad = [m for m in sys.modules if m.split('.')[0] in heavy]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
