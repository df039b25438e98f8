"""Triton kernels for ``torch.ops.fastpeft.adapter_linear`` and the dispatcher that picks one.

Semantics (``fastpeft/ops/_schema.py``)::

    xs = x * input_scale;  y = xs @ weight.T + bias
    for j: s = token_slots[:, j]; lora = (xs @ lora_a[s].T) @ lora_b[s] * slot_scales[s]
           y += lora                                  (no DoRA)
           y += (g - 1) * (xs @ weight.T) + g * lora  (DoRA, g = dora_scale[s])
    y = y * output_scale            -> [M, N] in x.dtype

    lora_a [S, R, K]; lora_b [S, R, N] is B transposed (lora_b[s] = B_s.T)

Kernels (``docs/kernels.md`` has the tiling and the reason for every constant):

* ``_fused_linear_kernel``: one program computes a ``[BM, BN]`` tile of ``y``: the base
  ``x @ W.T`` over its K range (tensor cores via ``tl.dot``), the LoRA shrink ``x @ A[s].T``
  (sharing the loaded ``x`` tile when all rows use the same slots), the expand
  ``(x A) @ B[s]``, DoRA's ``g``, bias and IA3 in the epilogue. With ``SPLIT_K > 1`` the K
  range is split over programs (decode: few rows, the weight read must be spread over the
  whole GPU); partial tiles go to an fp32 workspace and the last program of a tile (a
  counter) reduces them in a fixed order (deterministic) and runs the epilogue.
* ``_lora_shrink_kernel``: the shrink alone, ``xa = x @ A[slot].T`` for a tile of rows (any
  slots per row) into an fp32 buffer, so that each adapter's A is read once per row tile
  instead of once per output tile; the fused kernel (``SHRINK_PRESHRUNK``, the "preshrunk"
  path) or ``_lora_add_kernel`` then only expand.
* ``_lora_add_kernel``: SGMV-style shrink + expand for a row tile (or expand only, from the
  shrink kernel's xa), adding into the output that cuBLAS (``torch.nn.functional.linear``)
  already computed: the prefill alternative (the "split" path).

All of them: any strides for x / weight (Conv1D passes ``W.T``), masked edges, ranks padded to
a power of two ``RP >= 16`` inside the kernel, ``J`` adapters per row laid side by side on one
``J * RP`` axis, rows with slot ``-1`` skipped, no host synchronisation and a grid fixed by the
shapes (CUDA graphs and ``torch.compile`` can capture the launch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from . import tuning
from ._common import strides2 as _strides2
from .lora_jit import (
    SHRINK_NONE,
    SHRINK_PER_ROW_SLOTS,
    SHRINK_PRESHRUNK,
    SHRINK_SHARED_SLOTS,
    _fused_linear_kernel,
    _lora_add_kernel,
    _lora_shrink_kernel,
)
from .lora_plan import _make_plan, _plans, _plans_generation


def adapter_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    slot_scales: Tensor | None,
    token_slots: Tensor | None,
    dora_scale: Tensor | None,
    input_scale: Tensor | None,
    output_scale: Tensor | None,
) -> Tensor:
    """Triton implementation of ``torch.ops.fastpeft.adapter_linear`` (contract in ``_schema.py``)."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        # Triton launches on the current device: models split over GPUs call with other ones
        with torch.cuda.device(x.device):
            return adapter_linear(x, weight, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale,
                                  input_scale, output_scale)
    M, K = x.shape
    N = weight.shape[0]
    has_lora = lora_a is not None and token_slots is not None and token_slots.numel() > 0
    if has_lora:
        S, R = lora_a.shape[0], lora_a.shape[1]
        J = token_slots.shape[1]
        bcast = token_slots.shape[0] == 1
        ldt = lora_a.dtype
    else:
        S = R = J = 0
        bcast = True
        ldt = None
    dora = has_lora and dora_scale is not None
    key = (
        x.device, M, N, K, x.dtype, weight.dtype, ldt, R, J, bcast, S, bias is not None, dora,
        input_scale is not None, output_scale is not None, torch.get_float32_matmul_precision(),
    )
    if _plans_generation[0] != tuning.generation:  # a tuning file changed: plan afresh
        _plans.clear()
        _plans_generation[0] = tuning.generation
    plan = _plans.get(key)
    if plan is None:
        _check(token_slots, has_lora)
        if M == 0 or N == 0:
            return x.new_empty(M, N)
        plan = _make_plan(*key)
        _plans[key] = plan

    if plan.path == "split":
        return _run_split(plan, x, weight, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale,
                          input_scale, output_scale, has_lora, dora)

    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    if has_lora and slot_scales.stride(0) != 1:
        slot_scales = slot_scales.contiguous()
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)  # contiguous: strides (N, 1)
    dummy = y
    meta = plan.meta
    sxm, sxk = x.stride()
    swn, swk = weight.stride()
    sim, sik = _strides2(input_scale, M)
    som, son = _strides2(output_scale, M)
    if has_lora:
        a, b, sc, ts = lora_a, lora_b, slot_scales, token_slots
        sas, sar, sak = a.stride()
        sbs, sbr, sbn = b.stride()
        stm = 0 if bcast else ts.stride(0)
        stj = ts.stride(1)
        sds, sdn = (dora_scale.stride() if dora else (0, 0))
    else:
        a = b = sc = ts = dummy
        sas = sar = sak = sbs = sbr = sbn = stm = stj = sds = sdn = 0

    xa = dummy
    if plan.xa_splits:
        xa = torch.empty(plan.xa_splits, M, meta["JRP"], device=x.device, dtype=torch.float32)
        _lora_shrink_kernel[(triton.cdiv(M, plan.xa_bm), plan.xa_splits)](
            x, input_scale if input_scale is not None else dummy, weight, a, ts, xa,
            M, K, R, plan.xa_k_per_split,
            sxm, sxk, sim, sik, sas, sar, sak, stm, stj,
            HAS_INS=input_scale is not None, BROADCAST=bcast, J=meta["J"], RP=meta["RP"], JRP=meta["JRP"],
            BM=plan.xa_bm, BK=plan.xa_bk, PREC_L=meta["PREC_L"], UPCAST_L=meta["UPCAST_L"],
            num_warps=8 if plan.xa_bm * meta["JRP"] >= 8192 else 4, num_stages=2,
        )
    if plan.split_k > 1:
        ws = torch.empty(plan.split_k, M, N, device=x.device, dtype=torch.float32)
        cnt = torch.zeros(plan.grid[0], device=x.device, dtype=torch.int32)
    else:
        ws = cnt = dummy
    _fused_linear_kernel[plan.grid](
        x, weight, bias if bias is not None else dummy, a, b, sc, ts,
        dora_scale if dora else dummy,
        input_scale if input_scale is not None else dummy,
        output_scale if output_scale is not None else dummy,
        y, xa, ws, cnt,
        M, N, K, R, plan.k_per_split, plan.xa_splits,
        sxm, sxk, swn, swk,
        sas, sar, sak, sbs, sbr, sbn, stm, stj, sds, sdn, sim, sik, som, son, N, 1,
        **meta,
    )
    return y


def _run_split(plan, x, weight, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale,
               input_scale, output_scale, has_lora, dora):
    """cuBLAS base + _lora_add_kernel (in place when no DoRA base must be kept)."""
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    if has_lora and slot_scales.stride(0) != 1:
        slot_scales = slot_scales.contiguous()
    xs = x if input_scale is None else (x * input_scale).to(weight.dtype)
    base = F.linear(xs, weight, bias)
    if not has_lora and output_scale is None:
        return base.to(x.dtype)
    M, K = xs.shape
    N = weight.shape[0]
    meta = dict(plan.meta)
    J = token_slots.shape[1] if has_lora else 1
    chunk = plan.j_chunk
    n_chunks = (J + chunk - 1) // chunk if has_lora else 1
    # in place unless a DoRA base must survive several launches or the dtypes differ
    y = base if (base.dtype == x.dtype and not (dora and n_chunks > 1)) else torch.empty(M, N, device=x.device, dtype=x.dtype)
    som, son = _strides2(output_scale, M)
    xa = y
    if has_lora:
        sas, sar, sak = lora_a.stride()
        sbs, sbr, sbn = lora_b.stride()
        bcast = token_slots.shape[0] == 1
        stm = 0 if bcast else token_slots.stride(0)
        stj = token_slots.stride(1)
        sds, sdn = dora_scale.stride() if dora else (0, 0)
        a, b, sc = lora_a, lora_b, slot_scales
        shrink = SHRINK_SHARED_SLOTS if bcast else SHRINK_PER_ROW_SLOTS
        if plan.xa_splits:  # the shrink first (x read once), then expand-only programs
            shrink = SHRINK_PRESHRUNK
            xa = torch.empty(plan.xa_splits, M, meta["JRP"], device=x.device, dtype=torch.float32)
            _lora_shrink_kernel[(triton.cdiv(M, plan.xa_bm), plan.xa_splits)](
                xs, y, weight, a, token_slots, xa,
                M, K, lora_a.shape[1], plan.xa_k_per_split,
                xs.stride(0), xs.stride(1), 0, 0, sas, sar, sak, stm, stj,
                HAS_INS=False, BROADCAST=bcast, J=J, RP=meta["RP"], JRP=meta["JRP"],
                BM=plan.xa_bm, BK=plan.xa_bk, PREC_L=meta["PREC_L"], UPCAST_L=meta["UPCAST_L"],
                num_warps=8 if plan.xa_bm * meta["JRP"] >= 8192 else 4, num_stages=2,
            )
    else:
        a = b = sc = y
        sas = sar = sak = sbs = sbr = sbn = stm = stj = sds = sdn = 0
        shrink = SHRINK_NONE
    yin = base
    for ci in range(n_chunks):
        j0 = ci * chunk
        jn = min(chunk, J - j0)
        ts = token_slots[:, j0:j0 + jn] if has_lora else y
        last = ci == n_chunks - 1
        _lora_add_kernel[plan.grid](
            xs, yin, base, bias if bias is not None else y, a, b, sc, ts,
            dora_scale if dora else y, output_scale if (output_scale is not None and last) else y, y, xa,
            M, N, K, lora_a.shape[1] if has_lora else 0, plan.n_per_prog, plan.xa_splits,
            xs.stride(0), xs.stride(1), yin.stride(0), yin.stride(1), base.stride(0), base.stride(1),
            sas, sar, sak, sbs, sbr, sbn, stm, stj, sds, sdn, som, son, y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, SHRINK=shrink, DORA=dora, HAS_OUTS=output_scale is not None and last,
            **{**meta, "J": max(jn, 1)},
        )
        yin = y
    return y


def _check(token_slots, has_lora):
    """What only these kernels need, once per plan (the operator checked the shapes,
    :mod:`fastpeft.ops._checks`; the hot path checks nothing): slots in int32 or int64, the
    index types the kernels are compiled and tested with."""
    if has_lora and token_slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"adapter_linear: the Triton kernels take token_slots in int32 or int64, got {token_slots.dtype}")
