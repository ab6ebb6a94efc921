"""The user's own source line, ``path/file.py:LINE``: the first stack frame outside the libraries.

An alert about a formula is only useful when it names the line that wrote the formula. The code
that notices the problem runs deep inside torch (a ``TorchFunctionMode``, an autograd hook), called
through Lightning and healthmon, so the answer is the first frame, walking outwards, whose file is
not part of torch, Lightning, torchmetrics, healthmon or the standard library (third-party
packages in ``site-packages`` count as the user's: a model library is where the line is).

:class:`SourceLineFinder` holds what it learns (which directories to skip, which files were
already classified, how a file is displayed) as its own state, so two finders never share it and a
test can build one with other packages skipped. There is no module-level finder: each user (the
logits interceptor, the non-finite tracer) holds its own, and a caller that opens many windows
passes one finder to all of them to keep its caches.

This module is pure Python (no torch, no Lightning).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from collections.abc import Iterable
from types import FrameType

#: Packages whose frames are skipped when looking for the user's line.
SKIPPED_PACKAGES: tuple[str, ...] = (
    "torch",
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "lightning_utilities",
    "torchmetrics",
    "healthmon",
)


class SourceLineFinder:
    """Finds and formats the first stack frame that belongs to the user's code.

    Everything is computed lazily and cached on the instance: the directories of the skipped
    packages (located with ``importlib.util.find_spec``, without importing them), the verdict per
    file name, and the displayed path per (working directory, file name).

    Args:
        skipped_packages: top-level package names whose files are never the user's.
    """

    def __init__(self, skipped_packages: Iterable[str] = SKIPPED_PACKAGES) -> None:
        packages = tuple(skipped_packages)
        bad = [p for p in packages if not isinstance(p, str) or not p]
        if bad:
            raise ValueError(f"`skipped_packages`: expected non-empty package names, got {bad!r}.")
        self.skipped_packages = packages
        self._package_dirs: tuple[str, ...] | None = None
        self._stdlib_dir = ""
        self._site_dirs: tuple[str, ...] = ()
        self._verdicts: dict[str, bool] = {}
        self._display: dict[tuple[str, str], str] = {}

    # ---- which files are the user's -----------------------------------------------------------
    def _locate(self) -> tuple[str, ...]:
        if self._package_dirs is None:
            dirs: list[str] = []
            for name in self.skipped_packages:
                try:
                    spec = importlib.util.find_spec(name)  # locates the package without importing it
                except (ImportError, ValueError):
                    spec = None
                for loc in (spec.submodule_search_locations or []) if spec is not None else []:
                    dirs.append(os.path.realpath(loc) + os.sep)
            paths = sysconfig.get_paths()
            self._stdlib_dir = os.path.realpath(paths["stdlib"]) + os.sep
            self._site_dirs = tuple({os.path.realpath(paths[k]) + os.sep for k in ("purelib", "platlib")})
            self._package_dirs = tuple(dirs)
        return self._package_dirs

    def is_skipped(self, filename: str) -> bool:
        """Whether frames of ``filename`` are library frames (skipped packages, stdlib, ``<string>``)."""
        known = self._verdicts.get(filename)
        if known is not None:
            return known
        if filename.startswith("<"):
            skipped = True
        else:
            path = os.path.realpath(filename)
            package_dirs = self._locate()
            skipped = any(path.startswith(d) for d in package_dirs) or (
                path.startswith(self._stdlib_dir) and not any(path.startswith(k) for k in self._site_dirs)
            )
        self._verdicts[filename] = skipped
        return skipped

    # ---- how a line is shown ------------------------------------------------------------------
    def display_path(self, filename: str) -> str:
        """``filename`` relative to the working directory when inside it, else its real absolute path."""
        cwd = os.getcwd()
        key = (cwd, filename)
        path = self._display.get(key)
        if path is None:
            path = os.path.realpath(filename)
            root = os.path.realpath(cwd) + os.sep
            if path.startswith(root):
                path = path[len(root) :]
            self._display[key] = path
        return path

    def format(self, filename: str, lineno: int) -> str:
        """``path/file.py:LINE`` as alerts show it."""
        return f"{self.display_path(filename)}:{lineno}"

    # ---- finding the line ---------------------------------------------------------------------
    def from_frame(self, frame: FrameType | None) -> str | None:
        """The user's line, walking outwards from ``frame`` (inclusive); None when all are skipped."""
        while frame is not None:
            filename = frame.f_code.co_filename
            if not self.is_skipped(filename):
                return self.format(filename, frame.f_lineno)
            frame = frame.f_back
        return None

    def caller(self, depth: int = 1) -> str | None:
        """The user's line of the current stack, starting ``depth`` frames above this call.

        ``depth=1`` starts at the function that called :meth:`caller`.
        """
        return self.from_frame(sys._getframe(depth))

    def from_entries(self, entries: Iterable[tuple[str, int]]) -> str | None:
        """The user's line from a recorded stack of ``(filename, lineno)`` pairs, innermost first.

        For stacks kept for later (for example ``traceback.extract_stack()`` reversed, whose
        ``FrameSummary`` entries unpack as pairs via ``(s.filename, s.lineno)``).
        """
        for filename, lineno in entries:
            if not self.is_skipped(filename):
                return self.format(filename, lineno)
        return None
