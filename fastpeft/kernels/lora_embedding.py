"""Triton kernel for ``torch.ops.fastpeft.adapter_embedding``.

``y[m] = weight[ids[m]] + sum_j lora_a[s].T[ids[m]] @ lora_b[s] * slot_scales[s]``, s =
token_slots[m, j] (-1: none), lora_a ``[S, R, V]``, lora_b ``[S, R, D]`` (B transposed). A pure
gather: one program per (row, BD columns) reads the weight row slice, the R values
``lora_a[s, :, id]`` and the ``[R, BD]`` slice of ``lora_b[s]``; the rank-R product is a
handful of fp32 FMAs per output (no tensor cores needed).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Columns per program: 256 fp16/bf16 values = 512 bytes per row slice, enough for coalesced
# loads; rows are independent programs. Not measured (memory-bound gather, any value >= 128
# should saturate); see docs/perf-notes.md.
BLOCK_D = 256


@triton.jit
def _embedding_kernel(
    ids_ptr, w_ptr, a_ptr, b_ptr, scale_ptr, ts_ptr, y_ptr,
    D, R, swv, swd, sas, sar, sav, sbs, sbr, sbn, stm, stj, sym, syd,
    HAS_LORA: tl.constexpr, J: tl.constexpr, RP: tl.constexpr, BD: tl.constexpr,
):
    m = tl.program_id(0)
    pid_d = tl.program_id(1)
    m64 = m.to(tl.int64)
    idx = tl.load(ids_ptr + m64).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    dm = d < D
    out = tl.load(w_ptr + idx * swv + d * swd, mask=dm, other=0.0).to(tl.float32)
    if HAS_LORA:
        r = tl.arange(0, RP)
        rm = r < R
        for j in tl.static_range(J):
            s = tl.load(ts_ptr + m64 * stm + j * stj)
            if s >= 0:
                s64 = s.to(tl.int64)
                av = tl.load(a_ptr + s64 * sas + r * sar + idx * sav, mask=rm, other=0.0).to(tl.float32)
                bt = tl.load(b_ptr + s64 * sbs + r[:, None] * sbr + d[None, :] * sbn, mask=rm[:, None] & dm[None, :], other=0.0)
                sc = tl.load(scale_ptr + s64).to(tl.float32)
                out += tl.sum(av[:, None] * bt.to(tl.float32), axis=0) * sc
    tl.store(y_ptr + m64 * sym + d * syd, out.to(y_ptr.dtype.element_ty), mask=dm)


def adapter_embedding(
    ids: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    slot_scales: Tensor | None,
    token_slots: Tensor | None,
) -> Tensor:
    """Triton implementation of ``torch.ops.fastpeft.adapter_embedding`` (contract in ``_schema.py``)."""
    if weight.is_cuda and weight.device.index != torch.cuda.current_device():
        with torch.cuda.device(weight.device):  # Triton launches on the current device
            return adapter_embedding(ids, weight, lora_a, lora_b, slot_scales, token_slots)
    M = ids.shape[0]
    V, D = weight.shape
    y = torch.empty(M, D, device=weight.device, dtype=weight.dtype)
    if M == 0 or D == 0:
        return y
    if ids.stride(0) != 1:
        ids = ids.contiguous()
    has_lora = lora_a is not None and token_slots is not None and token_slots.numel() > 0
    if has_lora:
        R = lora_a.shape[1]
        J = token_slots.shape[1]
        RP = max(2, triton.next_power_of_2(R))
        a, b, ts = lora_a, lora_b, token_slots
        sc = slot_scales if slot_scales.stride(0) == 1 else slot_scales.contiguous()
        sas, sar, sav = a.stride()
        sbs, sbr, sbn = b.stride()
        stm = 0 if ts.shape[0] == 1 else ts.stride(0)
        stj = ts.stride(1)
    else:
        R, J, RP = 0, 1, 2
        a = b = sc = ts = y
        sas = sar = sav = sbs = sbr = sbn = stm = stj = 0
    BD = min(BLOCK_D, max(16, triton.next_power_of_2(D)))
    _embedding_kernel[(M, triton.cdiv(D, BD))](
        ids, weight, a, b, sc, ts, y,
        D, R, weight.stride(0), weight.stride(1), sas, sar, sav, sbs, sbr, sbn, stm, stj, y.stride(0), y.stride(1),
        HAS_LORA=has_lora, J=J, RP=RP, BD=BD, num_warps=4 if BD >= 256 else 2,
    )
    return y
