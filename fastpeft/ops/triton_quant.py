"""Triton backend of the quantized-base operators (``adapter_linear_4bit`` / ``adapter_linear_8bit``).

Registers :mod:`fastpeft.kernels.quant_host` (the path choice and the launches; kernels in
:mod:`fastpeft.kernels.quant_linear`) for ``"triton"`` on CUDA tensors (and on CPU tensors
under ``TRITON_INTERPRET=1``), or records why it cannot. The host code gets what it needs of
this layer as :class:`~fastpeft.kernels.quant_host.Fallbacks`: the routed dense operator and
the reference's functions (the kernels import nothing of ``fastpeft.ops``).
"""
from __future__ import annotations

import functools

import torch

from . import backends, reference
from .triton import DEVICES as _devices
from .triton import UNAVAILABLE_REASON

if _devices:  # Triton is imported only when some device can run its kernels (see ops/triton.py)
    try:
        from ..kernels import quant_host as _host
    except Exception as e:  # noqa: BLE001 - triton missing or broken: record why
        backends.mark_unavailable("triton", f"triton kernels for quantized bases not importable: {type(e).__name__}: {e}")
        raise

    _fallbacks = _host.Fallbacks(
        adapter_linear=torch.ops.fastpeft.adapter_linear,
        linear_compute_dtype=reference._linear_compute_dtype,
        apply_adapters=reference.apply_adapters,
        dequantize_8bit=reference.dequantize_8bit_weight,
    )
    #: the registered implementations (the host functions with this layer's fallbacks bound)
    adapter_linear_4bit = functools.partial(_host.adapter_linear_4bit, fallbacks=_fallbacks)
    adapter_linear_8bit = functools.partial(_host.adapter_linear_8bit, fallbacks=_fallbacks)
    backends.register("adapter_linear_4bit", "triton", adapter_linear_4bit, devices=_devices)
    backends.register("adapter_linear_8bit", "triton", adapter_linear_8bit, devices=_devices)
else:
    backends.mark_unavailable("triton", UNAVAILABLE_REASON)
