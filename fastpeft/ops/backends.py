"""Backend registry: the one place where an operator call picks its implementation.

Each backend module (``reference``, ``triton``, ``cpp``, ``cuda``) calls :func:`register` for
the operators and devices it implements, or :func:`mark_unavailable` with the reason it cannot
run here (no GPU, no Triton, extension not built, ...). Layers never call a backend directly:
they call ``torch.ops.fastpeft.<op>``, whose implementation asks :func:`resolve`.

Choice rules
------------
* ``"auto"`` (default): for each device type the first available backend in
  ``AUTO_ORDER[device_type]`` that implements the op.
* a named backend: used for every op it implements on that device; ops it does not implement
  fall back to ``"torch"`` (the pure-PyTorch reference), which implements everything.
  Naming a backend that is unavailable raises :class:`BackendUnavailableError` saying why.
* The environment variable ``FASTPEFT_BACKEND`` sets the initial choice.
"""
from __future__ import annotations

import os
from collections.abc import Callable

BACKENDS = ("torch", "triton", "cuda", "cpp")

# Preference for "auto". CUDA tensors: Triton (fused kernels), then the compiled CUDA
# extension, then PyTorch. CPU tensors: the compiled C++ kernels, then PyTorch (Triton on the
# CPU is the interpreter: correct but slow, so never chosen automatically).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpp", "torch"),
}


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is requested that cannot run on this machine."""


_impls: dict[str, dict[str, dict[str, Callable]]] = {}  # op -> backend -> device_type -> fn
_unavailable: dict[str, str] = {}  # backend -> reason
_loaded: set[str] = set()
_choice: str = "auto"
_cache: dict[tuple[str, str], Callable] = {}
_listeners: list[Callable[[], None]] = []


def add_listener(fn: Callable[[], None]) -> None:
    """Call ``fn()`` whenever what :func:`resolve` returns may change (a backend is registered
    or chosen); layers' fast-path plans use it to drop a backend captured earlier."""
    _listeners.append(fn)


def _changed() -> None:
    _cache.clear()
    for fn in _listeners:
        fn()


def register(op: str, backend: str, fn: Callable, devices: tuple[str, ...] = ("cpu", "cuda")) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op`` on ``devices``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    per_device = _impls.setdefault(op, {}).setdefault(backend, {})
    for d in devices:
        per_device[d] = fn
    _unavailable.pop(backend, None)
    _loaded.add(backend)
    _changed()


def mark_unavailable(backend: str, reason: str) -> None:
    """Record why ``backend`` cannot be used here (shown by ``available_backends``)."""
    if backend not in _loaded:
        _unavailable[backend] = reason
    _changed()


def _reason(backend: str) -> str | None:
    if backend in _loaded:
        return None
    return _unavailable.get(backend, "not loaded")


def available_backends(verbose: bool = False):
    """Backends that can run here.

    Returns a list of names, or with ``verbose=True`` a dict ``name -> None | reason`` where
    the reason says why that backend cannot run.
    """
    status = {b: _reason(b) for b in BACKENDS}
    if verbose:
        return status
    return [b for b, r in status.items() if r is None]


def set_backend(name: str) -> None:
    """Choose the backend for all operators: "auto", "torch", "triton", "cuda" or "cpp"."""
    global _choice
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    reason = _reason(name) if name != "auto" else None
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {reason}")
    _choice = name
    _changed()


def get_backend() -> str:
    """The backend chosen with :func:`set_backend` (``"auto"`` unless changed)."""
    return _choice


def resolve(op: str, device_type: str) -> Callable:
    """The implementation of ``op`` for tensors on ``device_type`` under the current choice."""
    key = (op, device_type)
    fn = _cache.get(key)
    if fn is not None:
        return fn
    per_backend = _impls.get(op, {})
    order = AUTO_ORDER.get(device_type, ("torch",)) if _choice == "auto" else (_choice, "torch")
    for b in order:
        impl = per_backend.get(b, {}).get(device_type)
        if impl is not None:
            if _choice != "auto" and b != _choice and _choice in per_backend:
                raise BackendUnavailableError(
                    f"backend {_choice!r} implements {op} but not on {device_type} tensors; "
                    f"move the tensors or call set_backend('auto')"
                )
            _cache[key] = impl
            return impl
    raise BackendUnavailableError(f"no backend implements {op} on {device_type} tensors")


def choice_from_env() -> None:
    """Apply ``FASTPEFT_BACKEND`` if set (called once the backends are loaded)."""
    name = os.environ.get("FASTPEFT_BACKEND")
    if name:
        set_backend(name.strip().lower())
