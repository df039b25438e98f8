"""Triton backend of the quantized-base operators (``adapter_linear_4bit`` / ``adapter_linear_8bit``).

Registers :mod:`fastpeft.kernels.quant_linear` for ``"triton"`` on CUDA tensors (and on CPU
tensors under ``TRITON_INTERPRET=1``), or records why it cannot. Three paths per call, chosen
by :func:`fastpeft.kernels.quant_linear.plan_path` from the row count and the stacked rank:

* ``fused``: one kernel: dequantize in the matmul, LoRA shrink on the shared x tile, expand,
  DoRA, bias, IA3 in the epilogue (decode and medium batches).
* ``base_fused``: the same kernel for the base only, then the adapters in PyTorch (very many
  stacked adapter columns that would not fit in registers).
* ``dequant``: dequantize the weight once (Triton for 4-bit, PyTorch for int8) and call the dense
  ``torch.ops.fastpeft.adapter_linear`` (cuBLAS base; prefill).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backends, reference
from .triton import DEVICES as _devices
from .triton import UNAVAILABLE_REASON

if _devices:  # Triton is imported only when some device can run its kernels (see ops/triton.py)
    try:
        from ..kernels import quant_linear as _k
    except Exception as e:  # noqa: BLE001 - triton missing or broken: record why
        backends.mark_unavailable("triton", f"triton kernels for quantized bases not importable: {type(e).__name__}: {e}")
        raise


def _stacked_cols(lora_a, token_slots) -> int:
    if lora_a is None or token_slots is None or token_slots.numel() == 0:
        return 16
    S, R = lora_a.shape[0], lora_a.shape[1]
    C = S * R if token_slots.shape[0] != 1 else token_slots.shape[1] * R
    return max(16, _k._pow2(C))


def _dense(x, w, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale):
    """The dense operator on the dequantized weight ``w`` (whose dtype is the compute dtype)."""
    if x.dtype == w.dtype:
        b = None if bias is None else bias.to(w.dtype)
        return torch.ops.fastpeft.adapter_linear(x, w, b, lora_a, lora_b, slot_scales, token_slots, dora_scale,
                                                 input_scale, output_scale)
    return reference._linear_compute_dtype(x, w, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale,
                                           input_scale, output_scale)


def _adapters_after(y, x, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale):
    """Add the adapters and the output scale to a base result ``y`` (x's dtype, bias included)."""
    xs = x if input_scale is None else (x * input_scale).to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    y = reference.apply_adapters(y, xs, b, lora_a, lora_b, slot_scales, token_slots, dora_scale)
    if output_scale is not None:
        y = y * output_scale
    return y.to(x.dtype)


def _check_common(op, x, N, bias, lora_a, lora_b, slot_scales, token_slots):
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _k._TL:
        raise ValueError(f"{op}: x must be float16/bfloat16/float32, got {x.dtype}")
    if bias is not None and bias.numel() != N:
        raise ValueError(f"{op}: bias must have {N} elements (out_features), got {tuple(bias.shape)}")
    if lora_a is not None and token_slots is not None:
        K = x.shape[1]
        if lora_a.dim() != 3 or lora_a.shape[2] != K:
            raise ValueError(f"{op}: lora_a must be [S, R, K={K}], got {tuple(lora_a.shape)}")
        if lora_b is None or tuple(lora_b.shape) != (lora_a.shape[0], lora_a.shape[1], N):
            raise ValueError(f"{op}: lora_b must be [S, R, N] = {(lora_a.shape[0], lora_a.shape[1], N)}, "
                             f"got {None if lora_b is None else tuple(lora_b.shape)}")
        if slot_scales is None:
            raise ValueError(f"{op}: slot_scales is required with lora_a")
        if token_slots.dim() != 2 or token_slots.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"{op}: token_slots must be [M={x.shape[0]} or 1, J], got {tuple(token_slots.shape)}")
        if lora_a.dtype not in _k._TL:
            raise ValueError(f"{op}: lora_a must be float16/bfloat16/float32, got {lora_a.dtype}")


def adapter_linear_4bit(
    x: Tensor, qweight: Tensor, absmax: Tensor, code: Tensor,
    nested_absmax: Tensor | None, nested_code: Tensor | None, nested_offset: Tensor | None,
    out_features: int, blocksize: int, nested_blocksize: int, compute_dtype: torch.dtype | None,
    bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale,
) -> Tensor:
    N = out_features
    _check_common("adapter_linear_4bit", x, N, bias, lora_a, lora_b, slot_scales, token_slots)
    M, K = x.shape
    nbytes = qweight.numel() * qweight.element_size()
    if nbytes != (N * K + 1) // 2:
        raise ValueError(f"adapter_linear_4bit: qweight holds {nbytes} bytes, expected (N*K+1)//2 = {(N * K + 1) // 2} "
                         f"for N={N}, K={K}")
    nblocks = -(-N * K // blocksize)
    if absmax.numel() != nblocks:
        raise ValueError(f"adapter_linear_4bit: absmax has {absmax.numel()} entries, expected ceil(N*K/blocksize) = {nblocks}")
    cd = compute_dtype or x.dtype
    if M == 0:
        return x.new_empty(0, N)
    args = (bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale)
    path = _k.plan_path(M, _stacked_cols(lora_a, token_slots), x.device)
    if path == "dequant":
        w = _k.dequantize_4bit_triton(qweight, absmax, code, nested_absmax, nested_code, nested_offset,
                                      N, K, blocksize, nested_blocksize, cd)
        return _dense(x, w, *args)
    y = _k.quant_linear(4, x, qweight, absmax, code, nested_absmax, nested_code, nested_offset, N, blocksize,
                        nested_blocksize, cd, *args, base_only=(path == "base_fused"))
    if path == "base_fused":
        y = _adapters_after(y, x, *args)
    return y


def adapter_linear_8bit(
    x: Tensor, qweight: Tensor, row_scale: Tensor,
    bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale,
) -> Tensor:
    if qweight.dim() != 2 or qweight.dtype != torch.int8:
        raise ValueError(f"adapter_linear_8bit: qweight must be int8 [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
    N, K = qweight.shape
    _check_common("adapter_linear_8bit", x, N, bias, lora_a, lora_b, slot_scales, token_slots)
    if x.shape[1] != K:
        raise ValueError(f"adapter_linear_8bit: x has {x.shape[1]} features, qweight expects K={K}")
    if row_scale.numel() != N:
        raise ValueError(f"adapter_linear_8bit: row_scale must have N={N} entries, got {row_scale.numel()}")
    M = x.shape[0]
    if M == 0:
        return x.new_empty(0, N)
    args = (bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale)
    path = _k.plan_path(M, _stacked_cols(lora_a, token_slots), x.device)
    if path == "dequant":
        return _dense(x, reference.dequantize_8bit_weight(qweight, row_scale, x.dtype), *args)
    rs = row_scale.float().contiguous()
    y = _k.quant_linear(8, x, qweight, rs, None, None, None, None, N, 1, 1, x.dtype, *args,
                        base_only=(path == "base_fused"))
    if path == "base_fused":
        y = _adapters_after(y, x, *args)
    return y


if _devices:
    backends.register("adapter_linear_4bit", "triton", adapter_linear_4bit, devices=_devices)
    backends.register("adapter_linear_8bit", "triton", adapter_linear_8bit, devices=_devices)
else:
    backends.mark_unavailable("triton", UNAVAILABLE_REASON)
