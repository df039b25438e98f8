"""Host side of the quantized-base operators on Triton: the path per call, and its launches.

``adapter_linear_4bit`` / ``adapter_linear_8bit`` here are the ``"triton"`` backend of
``torch.ops.fastpeft.adapter_linear_4bit`` / ``_8bit`` (registered by
:mod:`fastpeft.ops.triton_quant`; the contract is in ``fastpeft/ops/_schema.py``, and the op
body has checked the shapes, :mod:`fastpeft.ops._checks`). Three paths per call, chosen by
:func:`fastpeft.kernels.quant_linear.plan_path` from the row count and the number of stacked
adapter columns:

* ``fused``: one kernel: dequantize in the matmul, LoRA shrink on the shared x tile, expand,
  DoRA, bias, IA3 in the epilogue (decode and medium batches).
* ``base_fused``: the same kernel for the base only, then the adapters in PyTorch (very many
  stacked adapter columns, which would not fit in registers).
* ``dequant``: dequantize the weight once (Triton for 4-bit, PyTorch for int8) and call the
  dense operator (cuBLAS base; prefill).

The kernels import nothing of the operator layer: the PyTorch pieces the ``base_fused`` and
``dequant`` paths need come in as :class:`Fallbacks` (``fastpeft.ops.triton_quant`` passes
the routed dense operator and the reference's functions).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import quant_linear as _k
from ._common import pow2


class Fallbacks(NamedTuple):
    """What the quantized host code calls outside the kernels.

    * ``adapter_linear``: the routed dense operator ``torch.ops.fastpeft.adapter_linear``
      (same arguments; its backend runs the base on the dequantized weight);
    * ``linear_compute_dtype(x, w, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale,
      input_scale, output_scale)``: ``adapter_linear`` whose base product runs in ``w.dtype``
      when that differs from ``x.dtype`` (bitsandbytes' compute dtype);
    * ``apply_adapters(y, xs, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale)``: ``y``
      plus the LoRA/DoRA deltas of ``xs [M, K]`` (``lora_b`` B transposed, ``[S, R, N]``);
    * ``dequantize_8bit(qweight, row_scale, dtype)``: LLM.int8 ``[N, K]`` -> dense ``[N, K]``.
    """

    adapter_linear: Callable
    linear_compute_dtype: Callable
    apply_adapters: Callable
    dequantize_8bit: Callable


def stacked_cols(lora_a: Tensor | None, token_slots: Tensor | None) -> int:
    """Padded count of the kernel's stacked adapter columns: ``J * R`` when all rows share their
    slots (``token_slots [1, J]``), ``S * R`` for per-row slots; 16 at least, a power of two."""
    if lora_a is None or token_slots is None or token_slots.numel() == 0:
        return 16
    S, R = lora_a.shape[0], lora_a.shape[1]
    C = S * R if token_slots.shape[0] != 1 else token_slots.shape[1] * R
    return max(16, pow2(C))


def _dense(fb: Fallbacks, x, w, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale):
    """The dense operator on the dequantized weight ``w [N, K]`` (whose dtype is the compute dtype)."""
    if x.dtype == w.dtype:
        b = None if bias is None else bias.to(w.dtype)
        return fb.adapter_linear(x, w, b, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale)
    return fb.linear_compute_dtype(x, w, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale,
                                   output_scale)


def _adapters_after(fb: Fallbacks, y, x, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale,
                    output_scale):
    """Add the adapters and the output scale to a base result ``y [M, N]`` (x's dtype, bias included)."""
    xs = x if input_scale is None else (x * input_scale).to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    y = fb.apply_adapters(y, xs, b, lora_a, lora_b, slot_scales, token_slots, dora_scale)
    if output_scale is not None:
        y = y * output_scale
    return y.to(x.dtype)


def _check_kernel_dtypes(op: str, x: Tensor, lora_a: Tensor | None, token_slots: Tensor | None) -> None:
    """What the kernel alone cannot do (the shapes were checked by the operator): x and the
    adapters in float16, bfloat16 or float32."""
    if x.dtype not in _k._TL:
        raise ValueError(f"{op}: the Triton kernels take x in float16/bfloat16/float32, got {x.dtype}")
    if lora_a is not None and token_slots is not None and token_slots.numel() > 0 and lora_a.dtype not in _k._TL:
        raise ValueError(f"{op}: the Triton kernels take lora_a in float16/bfloat16/float32, got {lora_a.dtype}")


def adapter_linear_4bit(
    x: Tensor, qweight: Tensor, absmax: Tensor, code: Tensor,
    nested_absmax: Tensor | None, nested_code: Tensor | None, nested_offset: Tensor | None,
    out_features: int, blocksize: int, nested_blocksize: int, compute_dtype: torch.dtype | None,
    bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale,
    *, fallbacks: Fallbacks,
) -> Tensor:
    """``adapter_linear_4bit`` on Triton: x [M, K], the bitsandbytes 4-bit weight of
    ``[out_features, K]``, adapters as ``adapter_linear`` (lora_a [S, R, K], lora_b [S, R, N],
    B transposed). Returns [M, N] in x.dtype."""
    _check_kernel_dtypes("adapter_linear_4bit", x, lora_a, token_slots)
    N = out_features
    M, K = x.shape
    cd = compute_dtype or x.dtype
    if M == 0:
        return x.new_empty(0, N)
    args = (bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale)
    path = _k.plan_path(M, stacked_cols(lora_a, token_slots), x.device)
    if path == "dequant":
        w = _k.dequantize_4bit_triton(qweight, absmax, code, nested_absmax, nested_code, nested_offset,
                                      N, K, blocksize, nested_blocksize, cd)
        return _dense(fallbacks, x, w, *args)
    y = _k.quant_linear(4, x, qweight, absmax, code, nested_absmax, nested_code, nested_offset, N, blocksize,
                        nested_blocksize, cd, *args, base_only=(path == "base_fused"))
    if path == "base_fused":
        y = _adapters_after(fallbacks, y, x, *args)
    return y


def adapter_linear_8bit(
    x: Tensor, qweight: Tensor, row_scale: Tensor,
    bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale,
    *, fallbacks: Fallbacks,
) -> Tensor:
    """``adapter_linear_8bit`` on Triton: x [M, K], qweight int8 [N, K], row_scale [N], adapters
    as ``adapter_linear`` (lora_b B transposed, [S, R, N]). Returns [M, N] in x.dtype."""
    _check_kernel_dtypes("adapter_linear_8bit", x, lora_a, token_slots)
    N = qweight.shape[0]
    M = x.shape[0]
    if M == 0:
        return x.new_empty(0, N)
    args = (bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale)
    path = _k.plan_path(M, stacked_cols(lora_a, token_slots), x.device)
    if path == "dequant":
        return _dense(fallbacks, x, fallbacks.dequantize_8bit(qweight, row_scale, x.dtype), *args)
    rs = row_scale.float().contiguous()
    y = _k.quant_linear(8, x, qweight, rs, None, None, None, None, N, 1, 1, x.dtype, *args,
                        base_only=(path == "base_fused"))
    if path == "base_fused":
        y = _adapters_after(fallbacks, y, x, *args)
    return y
