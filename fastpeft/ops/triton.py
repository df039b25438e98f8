"""The ``"triton"`` backend: fused Triton kernels for ``adapter_linear`` and ``adapter_embedding``.

Registered for CUDA tensors when a CUDA device is usable, and additionally for CPU tensors when
``TRITON_INTERPRET=1`` is set (the Triton interpreter: correct but slow, used by the tests on
machines without a GPU; it must be set before ``fastpeft`` is imported, because Triton reads it
when the kernels are decorated). Otherwise the backend is marked unavailable with the reason.
The kernels and the dispatcher live in :mod:`fastpeft.kernels`.
"""
from __future__ import annotations

import importlib.util

from ..kernels._interpret import cuda_usable, interpret_requested
from . import backends

_BACKEND = "triton"


def _devices() -> tuple[tuple[str, ...], str]:
    """Device types the Triton kernels can run on here, and why not when there are none.

    Decided without importing Triton (``import triton`` costs about 0.17 s here;
    :mod:`fastpeft.kernels._interpret` holds both tests): the kernels, and with them Triton,
    are imported only when some device can run them.
    """
    if importlib.util.find_spec("triton") is None:
        return (), "triton is not installed; pip install triton (or pip install fastpeft[triton])"
    devices = []
    cuda_ok, why_not = cuda_usable()
    if cuda_ok:
        devices.append("cuda")
    if interpret_requested():
        devices.append("cpu")
    if not devices:
        return (), (
            f"{why_not} and TRITON_INTERPRET is not set (set TRITON_INTERPRET=1 before importing fastpeft "
            "to run the Triton kernels on CPU tensors in the interpreter)"
        )
    return tuple(devices), ""


#: device types the Triton backend serves ("cuda", and "cpu" under TRITON_INTERPRET=1); empty
#: when it cannot run here, with the reason in :data:`UNAVAILABLE_REASON`. ``triton_quant`` reads both.
DEVICES, UNAVAILABLE_REASON = _devices()


def _load() -> None:
    if not DEVICES:
        backends.mark_unavailable(_BACKEND, UNAVAILABLE_REASON)
        return
    try:
        from ..kernels import lora_embedding, lora_linear
    except Exception as e:  # ImportError, or a broken install
        backends.mark_unavailable(_BACKEND, f"triton is not importable ({type(e).__name__}: {e}); pip install triton")
        return
    backends.register("adapter_linear", _BACKEND, lora_linear.adapter_linear, devices=DEVICES)
    backends.register("adapter_embedding", _BACKEND, lora_embedding.adapter_embedding, devices=DEVICES)


_load()
