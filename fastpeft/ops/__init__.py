"""fastpeft operators (``torch.ops.fastpeft.*``) and backend selection.

Importing this package defines the operators and loads every backend that can run here; a
backend that cannot (no GPU, no Triton, no compiled extension) is recorded with its reason,
see :func:`available_backends`. Importing never fails for a missing optional backend.
"""
from __future__ import annotations

import importlib
import logging

from . import (
    _schema,  # noqa: F401  (defines torch.ops.fastpeft.*)
    reference,
)
from .backends import (
    BackendUnavailableError,
    available_backends,
    get_backend,
    mark_unavailable,
    register,
    set_backend,
)

log = logging.getLogger("fastpeft")

register("adapter_linear", "torch", reference.adapter_linear)
register("adapter_embedding", "torch", reference.adapter_embedding)

# Optional backends: each module registers its ops or calls mark_unavailable(reason).
for _name in ("triton", "cpp", "cuda"):
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except Exception as e:  # a dependency missing or broken: never let an optional backend break the import
        mark_unavailable(_name, f"import failed: {type(e).__name__}: {e}")
        log.info("fastpeft backend %s unavailable: %s", _name, e)

from .backends import choice_from_env as _choice_from_env  # noqa: E402

_choice_from_env()

adapter_linear = _schema.adapter_linear
adapter_embedding = _schema.adapter_embedding

__all__ = [
    "BackendUnavailableError",
    "adapter_embedding",
    "adapter_linear",
    "available_backends",
    "get_backend",
    "set_backend",
]

# Quantized bases (fastpeft/quant): PyTorch references, then the Triton kernels, guarded like the others.
register("adapter_linear_4bit", "torch", reference.adapter_linear_4bit)
register("adapter_linear_8bit", "torch", reference.adapter_linear_8bit)
try:
    importlib.import_module(f"{__name__}.triton_quant")
except Exception as e:  # noqa: BLE001 - an optional backend never breaks the import
    mark_unavailable("triton", f"triton_quant import failed: {type(e).__name__}: {e}")
    log.info("fastpeft quantized triton kernels unavailable: %s", e)
