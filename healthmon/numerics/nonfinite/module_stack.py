"""Which module's forward is running, so an origin names the module around the user's line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class ModuleStack:
    """Forward pre/post hooks that track which module's forward is running (innermost)."""

    def __init__(self, module: torch.nn.Module | None) -> None:
        self.stack: list[str] = []
        self._handles: list[Any] = []
        if module is None:
            return
        for name, m in module.named_modules():
            label = f"{name} ({type(m).__name__})" if name else f"{type(m).__name__}.forward"
            self._handles.append(m.register_forward_pre_hook(self._push(label)))
            self._handles.append(m.register_forward_hook(self._pop, always_call=True))

    def _push(self, label: str) -> Callable[..., None]:
        def hook(module: Any, args: Any) -> None:
            self.stack.append(label)

        return hook

    def _pop(self, module: Any, args: Any, output: Any) -> None:
        if self.stack:
            self.stack.pop()

    def current(self) -> str | None:
        """The innermost module whose forward is running (``"net.0 (Linear)"``), or None."""
        return self.stack[-1] if self.stack else None

    def remove(self) -> None:
        """Take the hooks off the modules."""
        for h in self._handles:
            h.remove()
        self._handles = []
