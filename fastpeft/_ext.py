"""Loader of the compiled extension ``fastpeft._C``.

Importing ``fastpeft._C`` loads ``csrc/``'s library, whose static initialisers register the
operators ``torch.ops.fastpeft.native_*`` with the PyTorch dispatcher (CPU kernels, and CUDA
kernels when it was built with CUDA). This module never raises: when the library is missing
or does not load, :data:`error` says why, and the backends that need it (``cpp``, ``cuda``)
report that reason through ``fastpeft.ops.available_backends(verbose=True)``.

Build it with ``pip install --no-build-isolation -e .`` (or ``tools/build_ext.sh``).
"""
from __future__ import annotations

import logging

import torch  # noqa: F401  (loads libtorch, which _C links against, before _C)

log = logging.getLogger("fastpeft")

BUILD_HINT = "build with: pip install --no-build-isolation -e ."

#: the loaded module, or None
module = None
#: why the extension is not usable (None when it loaded)
error: str | None = None
#: compiled-in features, e.g. {"cpu", "cuda", "x86-multiversion"}
features: frozenset[str] = frozenset()


def _load() -> None:
    global module, error, features
    try:
        from . import _C  # type: ignore[attr-defined]  # noqa: F401
    except ImportError as e:
        text = str(e)
        if "undefined symbol" in text or "cannot open shared object" in text:
            error = (
                f"extension fails to load ({text}); it was probably built against another torch "
                f"than {torch.__version__}: rebuild, {BUILD_HINT}"
            )
        else:
            error = f"extension not built: {text}; {BUILD_HINT}"
        log.info("fastpeft compiled extension unavailable: %s", error)
        return
    except Exception as e:  # noqa: BLE001  (an error raised while registering the operators)
        error = f"extension failed to load: {type(e).__name__}: {e}; {BUILD_HINT}"
        log.info("fastpeft compiled extension unavailable: %s", error)
        return
    try:
        features = frozenset(str(torch.ops.fastpeft.native_build_info()).split(","))
    except Exception as e:  # noqa: BLE001
        error = f"extension loaded but registered no operators ({type(e).__name__}: {e}); {BUILD_HINT}"
        return
    module = _C


def available() -> bool:
    """Whether ``fastpeft._C`` loaded and its operators are registered."""
    return module is not None


def has_cuda() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return "cuda" in features


def library_path() -> str | None:
    """File of the compiled library (for C++ programs that ``dlopen`` it), or None."""
    return getattr(module, "__file__", None) if module is not None else None


_load()
