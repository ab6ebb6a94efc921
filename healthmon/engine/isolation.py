"""Run extra computation on the user's model without leaving a trace on the run.

healthmon replays the user's ``training_step`` (Hessian estimates, the NaN replay that names the
first broken module). Everything such a replay can touch is saved here and put back afterwards, so
the trained weights *and* the logged metrics are bit-identical with and without healthmon:

* random streams: torch's CPU and CUDA generators, Python's ``random``, NumPy's global RNG, and
  generator objects held by the model (``random.Random``, ``numpy.random.Generator`` /
  ``RandomState``, ``torch.Generator`` attributes of any submodule);
* module state: buffers (BatchNorm running statistics, also when the step rebinds them),
  train/eval modes, parameter gradients, and the plain Python attributes of every submodule
  (rebinds, and the contents of list/dict/set attributes such as ``self.outputs.append(loss)``);
* torchmetrics: every ``Metric`` in the model is a submodule, so its registered states (the names
  in ``_defaults``, restored in place), its update count, cached ``compute()`` and
  ``forward()`` results come back with the module state above;
* logging: ``self.log`` / ``self.log_dict`` are no-ops during a replay, the trainer's result
  collection (what ``self.log`` accumulates into step and epoch aggregates) is restored in case a
  value reaches it another way (``LightningModule.log(self, ...)``, a logged ``Metric`` object),
  and the trainer's loggers drop ``log_metrics`` calls made by the replay.

What a replay could change beyond this (files, global variables, objects reachable only deeper
inside user objects) is not visible to healthmon; :func:`replay_blocker` names the setups known not
to be replayable so that a monitor reports ``monitor.skipped`` instead of replaying.
"""

from __future__ import annotations

import random
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

# nn.Module's own bookkeeping (hooks, parameter and submodule registries): not the user's state,
# and restoring it could undo what torch itself does on a first forward (lazy modules).
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) - {"_buffers", "training"}
_CONTAINERS = (list, dict, set, deque)


def _numpy() -> Any:
    """NumPy if the process has imported it (a run that never imported it cannot draw from it)."""
    return sys.modules.get("numpy")


class _GeneratorState:
    """The state of one RNG object: Python ``random.Random``, NumPy or torch generators."""

    def __init__(self, rng: Any) -> None:
        self.rng = rng
        np = _numpy()
        if isinstance(rng, random.Random):
            self.state: Any = rng.getstate()
        elif isinstance(rng, torch.Generator):
            self.state = rng.get_state()
        elif np is not None and isinstance(rng, np.random.Generator):
            self.state = rng.bit_generator.state
        else:  # numpy.random.RandomState
            self.state = rng.get_state()

    @staticmethod
    def is_generator(value: Any) -> bool:
        if isinstance(value, (random.Random, torch.Generator)):
            return True
        np = _numpy()
        return np is not None and isinstance(value, (np.random.Generator, np.random.RandomState))

    def restore(self) -> None:
        rng, np = self.rng, _numpy()
        if isinstance(rng, random.Random):
            rng.setstate(self.state)
        elif isinstance(rng, torch.Generator):
            rng.set_state(self.state)
        elif np is not None and isinstance(rng, np.random.Generator):
            rng.bit_generator.state = self.state
        else:
            rng.set_state(self.state)


class HostRandomState:
    """Python's ``random``, NumPy's global RNG and the RNG objects held by ``module``'s submodules.

    torch's own generators are handled by :func:`preserved_rng`; these are the streams a recipe
    draws from on the host (mixup's ``np.random.beta``, ``random.random()`` augmentations).
    """

    def __init__(self, module: torch.nn.Module | None = None) -> None:
        self.python = random.getstate()
        np = _numpy()
        self.numpy = np.random.get_state() if np is not None else None
        self.held: list[_GeneratorState] = []
        seen: set[int] = set()
        for m in module.modules() if module is not None else ():
            for value in vars(m).values():
                if id(value) not in seen and _GeneratorState.is_generator(value):
                    seen.add(id(value))
                    self.held.append(_GeneratorState(value))

    def restore(self) -> None:
        """Put back the saved states of Python's, NumPy's and the module's generators."""
        random.setstate(self.python)
        np = _numpy()
        if np is not None and self.numpy is not None:
            np.random.set_state(self.numpy)
        for g in self.held:
            g.restore()


@contextmanager
def preserved_rng(module: torch.nn.Module | None = None) -> Iterator[None]:
    """Save and restore every RNG: torch CPU and CUDA, Python, NumPy, and generators in ``module``."""
    cpu = torch.get_rng_state()
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    host = HostRandomState(module)
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        host.restore()


def _metric_state_names(module: torch.nn.Module) -> frozenset[str]:
    """The registered states of a torchmetrics ``Metric`` (``add_state`` records them in ``_defaults``)."""
    defaults = vars(module).get("_defaults")
    return frozenset(defaults) if isinstance(defaults, dict) else frozenset()


#: How deep nested containers (a dict of lists of losses, ...) are saved by content.
_MAX_CONTAINER_DEPTH = 4


def _save_containers(value: Any, saved: list[tuple[Any, Any]], seen: set[int], depth: int = 0) -> None:
    """Append ``(container, copy of its contents)`` for ``value`` and the containers nested in it."""
    if depth > _MAX_CONTAINER_DEPTH or id(value) in seen:
        return
    if isinstance(value, dict):
        contents: Any = dict(value)
        children = list(contents.values())
    elif isinstance(value, _CONTAINERS):
        contents = children = list(value)
    else:
        return
    seen.add(id(value))
    saved.append((value, contents))
    for child in children:
        if isinstance(child, (dict, *_CONTAINERS)):
            _save_containers(child, saved, seen, depth + 1)


def _restore_container(target: Any, contents: Any) -> None:
    if isinstance(target, dict):
        target.clear()
        target.update(contents)
    elif isinstance(target, list):
        target[:] = contents
    else:  # set, deque
        target.clear()
        (target.update if isinstance(target, set) else target.extend)(contents)


class _AttributeSnapshot:
    """The plain Python attributes of one object, restored by identity; containers by content.

    Containers nested in containers (a dict of per-step lists, as a module recording its losses
    keeps) are restored by content too, down to ``_MAX_CONTAINER_DEPTH`` levels.

    Tensors that are not parameters are cloned and, when their version counter shows an in-place
    change (torchmetrics states such as ``tp += ...``), copied back in place; inference tensors
    (no version counter, read-only outside inference mode) are left alone. ``skip`` names
    attributes left alone.
    """

    def __init__(self, obj: Any, skip: frozenset[str] = frozenset()) -> None:
        self.obj = obj
        self.attrs = {k: v for k, v in vars(obj).items() if k not in skip}
        self.skip = skip
        self.containers: list[tuple[Any, Any]] = []
        self.values: dict[str, tuple[torch.Tensor, int]] = {}
        seen: set[int] = set()
        for k, v in self.attrs.items():
            if isinstance(v, (dict, *_CONTAINERS)):
                _save_containers(v, self.containers, seen)
            elif (
                isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter) and not v.is_inference()
            ):
                self.values[k] = (v.detach().clone(), v._version)

    def restore(self) -> None:
        current = vars(self.obj)
        for k in [k for k in current if k not in self.skip and k not in self.attrs]:
            del current[k]  # attributes the replay added
        current.update(self.attrs)
        for target, contents in self.containers:
            _restore_container(target, contents)
        with torch.no_grad():
            for k, (saved, version) in self.values.items():
                target = self.attrs[k]
                if target._version == version:
                    continue  # not modified in place
                if target.shape == saved.shape and target.dtype == saved.dtype:
                    target.copy_(saved)
                else:  # resized in place: give the attribute its old value back
                    current[k] = saved


@contextmanager
def preserved_module_state(module: torch.nn.Module, *, grads: bool = True) -> Iterator[None]:
    """Save and restore buffers, modes, gradients, torchmetrics states and submodule attributes.

    Buffers are put back by name (a step may rebind ``self.ema = self.ema * 0.9 + x``) and their
    values copied back in place; every submodule's own attributes (Python values, lists and dicts,
    torchmetrics' states, update counts and caches) are restored as :class:`_AttributeSnapshot`.
    """
    snapshots = [_AttributeSnapshot(m, _MODULE_INTERNALS) for m in module.modules()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    saved_grads = [(p, p.grad) for p in module.parameters()] if grads else []
    try:
        yield
    finally:
        for snap in snapshots:
            snap.restore()  # modes, buffer registry, attributes
        with torch.no_grad():
            for b, copy in buffers:
                b.copy_(copy)
        for p, g in saved_grads:
            p.grad = g


@contextmanager
def preserved_results(trainer: Any) -> Iterator[None]:
    """Restore the trainer's result collection: what ``self.log`` accumulates for step and epoch.

    Lightning keeps one ``_ResultMetric`` (a torchmetrics ``Metric``) per logged key in the active
    loop's result collection; keys a replay created are removed and the existing ones restored.
    """
    results = getattr(trainer, "_results", None) if trainer is not None else None
    if not isinstance(results, dict):
        yield
        return
    entries = dict(results)
    own = _AttributeSnapshot(results)
    metrics = [
        _AttributeSnapshot(m, _MODULE_INTERNALS)
        for value in entries.values()
        if isinstance(value, torch.nn.Module)
        for m in value.modules()
    ]
    try:
        yield
    finally:
        results.clear()
        results.update(entries)
        own.restore()
        for snap in metrics:
            snap.restore()


@contextmanager
def silenced_logging(pl_module: Any) -> Iterator[None]:
    """Make ``self.log`` / ``self.log_dict`` and the loggers' ``log_metrics`` no-ops during a replay."""
    noop = lambda *args, **kwargs: None  # noqa: E731
    trainer = getattr(pl_module, "_trainer", None)
    loggers = list(getattr(trainer, "loggers", None) or []) if trainer is not None else []
    pl_module.__dict__["log"] = noop
    pl_module.__dict__["log_dict"] = noop
    patched = []
    for logger in loggers:
        if "log_metrics" not in vars(logger):
            vars(logger)["log_metrics"] = noop
            patched.append(logger)
    try:
        yield
    finally:
        pl_module.__dict__.pop("log", None)
        pl_module.__dict__.pop("log_dict", None)
        for logger in patched:
            vars(logger).pop("log_metrics", None)


def replay_blocker(pl_module: Any) -> str | None:
    """Why calling ``pl_module.training_step`` again could change the run, or None when it is safe.

    Manual optimization steps optimizers inside ``training_step``; a torchmetrics state that is not
    a tensor or a list of tensors cannot be saved faithfully.
    """
    if not getattr(pl_module, "automatic_optimization", True):
        return "manual optimization: replaying training_step would step the optimizer"
    for name, m in pl_module.named_modules():
        for state in _metric_state_names(m):
            value = vars(m).get(state)
            if not (
                isinstance(value, torch.Tensor)
                or (isinstance(value, list) and all(isinstance(v, torch.Tensor) for v in value))
            ):
                return (
                    f"the metric {name or type(m).__name__} holds a state {state!r} of type "
                    f"{type(value).__name__} that healthmon cannot save and restore"
                )
    return None


@contextmanager
def isolated(pl_module: Any) -> Iterator[None]:
    """All of the above: RNGs, module and metric state, gradients and logging restored on exit."""
    with ExitStack() as stack:
        stack.enter_context(preserved_results(getattr(pl_module, "_trainer", None)))
        stack.enter_context(preserved_rng(pl_module))
        stack.enter_context(preserved_module_state(pl_module))
        stack.enter_context(silenced_logging(pl_module))
        yield
