"""Triton kernels for ``torch.ops.fastpeft.adapter_linear`` and the dispatcher that picks one.

Semantics (``fastpeft/ops/_schema.py``)::

    xs = x * input_scale;  y = xs @ weight.T + bias
    for j: s = token_slots[:, j]; lora = (xs @ lora_a[s].T) @ lora_b[s] * slot_scales[s]
           y += lora                                  (no DoRA)
           y += (g - 1) * (xs @ weight.T) + g * lora  (DoRA, g = dora_scale[s])
    y = y * output_scale            -> [M, N] in x.dtype

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
  instead of once per output tile; the fused kernel (``SHRINK=3``, the "given" path) or
  ``_lora_add_kernel`` then only expand.
* ``_lora_add_kernel``: SGMV-style shrink + expand for a row tile (or expand only, from the
  shrink kernel's xa), adding into the output that cuBLAS (``torch.nn.functional.linear``)
  already computed: the prefill alternative (the "split" path).

All of them: any strides for x / weight (Conv1D passes ``W.T``), masked edges, ranks padded to
a power of two ``RP >= 16`` inside the kernel, ``J`` adapters per row laid side by side on one
``J * RP`` axis, rows with slot ``-1`` skipped, no host synchronisation and a grid fixed by the
shapes (CUDA graphs and ``torch.compile`` can capture the launch).
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import tuning
from ._interpret import INTERPRET

# ---------------------------------------------------------------------------------------------
# Dispatch thresholds. PROVISIONAL: chosen by reasoning about an H100 (SXM, 132 SMs, 3.35 TB/s,
# ~990 dense bf16 TFLOP/s); nothing here has been measured on a GPU yet. Each names the sweep of
# bench/bench_linear.py that must set it (docs/perf-notes.md, "to measure").
# ---------------------------------------------------------------------------------------------

# Rows up to this use the decode tiling (BM = 16, split-K). tl.dot needs M >= 16, so 16 rows
# cost the same tensor-core work as 1; above it the GEMM tiling takes over.
# To measure: tokens 1..64 at 4096x4096, decode vs fused tiling.
DECODE_MAX_ROWS = 16

# Rows up to this run the fused kernel ("decode", "fused" or "given"); above it cuBLAS
# computes the base and _lora_add_kernel adds the adapters ("split"). 256 is about the H100 ridge point for a bf16 linear
# (arithmetic intensity ~ M FLOP/byte vs 990 TFLOP/s / 3.35 TB/s ~ 295): below it the layer is
# memory-bound and one pass over W wins; above it cuBLAS' GEMM efficiency matters more than
# the second pass over y. To measure: tokens 64..4096, "fused" vs "split" paths.
FUSED_MAX_ROWS = 256

# One launch or two. In the one-launch kernel every output tile computes the shrink for its
# rows, so A is read tiles_M * tiles_N times (from L2 after the first): per row tile and
# distinct adapter, a fraction JRP * a_bytes / (BN * w_bytes) of the weight's bytes (0.25 for
# rank 16 fp32 adapters on a bf16 weight at BN = 128, whatever the layer's shape). When the
# estimated re-read, tiles_M * distinct * that fraction, exceeds MAX_AREREAD_FRACTION, the
# "given" path computes xa once per row tile first (_lora_shrink_kernel, a second launch) and
# the fused kernel only expands. 0.5: half the weight's bytes again from L2 (about 2x HBM
# bandwidth on H100) costs about a quarter of the base time, about one extra launch for a
# 4096x4096 decode. To measure: tokens 1..256, ranks 16..128, 1..64 distinct adapters,
# "decode"/"fused" vs "given".
MAX_AREREAD_FRACTION = 0.5
# A mixed batch with more possible distinct adapters than this, min(S, M*J), always takes the
# "given" path: the one-launch kernel re-reads x once per distinct adapter in every tile.
FUSED_MAX_DISTINCT = 4

# Split path: at most this many N slices per row tile in the one-kernel shrink + expand (each
# slice re-reads its x rows), and the x re-read (over the weight's bytes) above which the
# shrink runs as its own kernel first. At 4096 tokens x is as large as a 4096x4096 weight, so
# any re-read costs a full extra pass; at <= 256 tokens it is a few percent. To measure:
# tokens 256..4096, split with the shrink inside vs first (override(split_shrink=...)).
ADD_MAX_NSPLIT = 4
MAX_XREREAD_FRACTION = 0.25

# Shrink kernel K slices: at least this long (the shrink is a small GEMM: short slices keep
# enough programs for a decode batch of a few rows).
MIN_K_PER_SHRINK = 256

# Largest J * RP (concatenated padded rank) kept in registers next to the [BM, BN] accumulator:
# decode tiles (BM=16) and GEMM tiles (BM up to 64). Above, the split path (cuBLAS base +
# _lora_add_kernel, which chunks J) is used. Register-pressure bound, to measure with rank 128/256.
DECODE_MAX_JRP = 256
FUSED_MAX_JRP = 128
ADD_MAX_JRP = 256
# With exact fp32 products ("ieee": fp32 activations under the default matmul precision) tl.dot
# runs on FMA units and holds its operand tiles in registers: sm_90 AOT compiles spilled
# kilobytes at J * RP = 256 in the decode tile, so above this the split path is used.
IEEE_MAX_JRP = 64

# Split-K / split-N so that a launch has at least TARGET_WAVES programs per SM (a memory-bound
# GEMV needs many loads in flight on every SM), without making a K slice shorter than
# MIN_K_PER_SPLIT (a few pipelined BK steps per program) or the fp32 split-K workspace larger
# than WS_MAX_FRACTION of the weight's bytes.
TARGET_WAVES = 2
MIN_K_PER_SPLIT = 512
WS_MAX_FRACTION = 0.25
MAX_SPLIT_K = 16

# Shared memory for the pipelined operand tiles of one program (x, W and A tiles per stage).
# H100 allows 227 KB per block; 160 KB leaves room for the epilogue's B tile and layout
# conversions. BK, then the stage count, shrink until the tiles fit (a compile-time
# "out of resources" otherwise). Not tuned: to measure with rank 64/128 fp32 adapters.
SMEM_BUDGET = 160 * 1024

# SM count assumed when no GPU is present (interpreter): an H100 SXM, so the plans made on the
# CPU are the ones an H100 would get.
ASSUMED_SMS = 132

# Fused-kernel tiles (BM, BN, BK, num_warps, num_stages) before _fit_smem and the JRP/N/K clamps.
# Decode (M <= DECODE_MAX_ROWS): BM=16, the smallest tl.dot M (16 rows cost what 1 does). BN=128:
# A is re-read once per N tile, JRP / BN of the weight's elements (see MAX_AREREAD_FRACTION), so
# wide tiles; split-K then spreads the weight over >= 2 waves. BK=128 before _fit_smem (64 for
# bf16: 4 stages of a [64, 128] weight tile, 16 KB each, in flight).
DECODE_TILE = (16, 128, 128, 4, 4)
# GEMM tiling for 17..FUSED_MAX_ROWS rows: 64x128x64 with 8 warps is Triton's usual Hopper bf16
# starting point; 32-row tiles for up to 32 rows waste less of the MMA.
FUSED_TILE_32 = (32, 128, 64, 4, 3)
FUSED_TILE_64 = (64, 128, 64, 8, 3)

# The constants above that a per-device tuning file may override (fastpeft/kernels/tuning.py;
# written by bench/bench_linear.py --tune). ASSUMED_SMS is not one: it stands in for a device.
TUNABLES = (
    "DECODE_MAX_ROWS", "FUSED_MAX_ROWS", "MAX_AREREAD_FRACTION", "FUSED_MAX_DISTINCT", "ADD_MAX_NSPLIT",
    "MAX_XREREAD_FRACTION", "MIN_K_PER_SHRINK", "DECODE_MAX_JRP", "FUSED_MAX_JRP", "ADD_MAX_JRP",
    "IEEE_MAX_JRP", "TARGET_WAVES", "MIN_K_PER_SPLIT", "WS_MAX_FRACTION", "MAX_SPLIT_K", "SMEM_BUDGET",
    "DECODE_TILE", "FUSED_TILE_32", "FUSED_TILE_64",
)


def _rules(dev: torch.device) -> SimpleNamespace:
    """The planner's constants for ``dev``: this module's values, with the device's tuning file on top."""
    return SimpleNamespace(**tuning.rules("lora_linear", dev, {n: globals()[n] for n in TUNABLES}))



# ---------------------------------------------------------------------------------------------
# Triton helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b. UPCAST (interpreter + bf16 only): the interpreter's bf16 dot is wrong, so
    the tiles go through fp32 there; compiled code keeps bf16 (tensor cores)."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _load_x(x_ptr, ins_ptr, rows64, rmask, kk, kmask, sxm, sxk, sim, sik, HAS_INS: tl.constexpr):
    """x tile [BM, BK], times the IA3 input scale when present (in fp32)."""
    m2 = rmask[:, None] & kmask[None, :]
    x = tl.load(x_ptr + rows64[:, None] * sxm + kk[None, :] * sxk, mask=m2, other=0.0)
    if HAS_INS:
        s = tl.load(ins_ptr + rows64[:, None] * sim + kk[None, :] * sik, mask=m2, other=0.0)
        x = x.to(tl.float32) * s.to(tl.float32)
    return x


@triton.jit
def _next_slot(sl, s):
    """Smallest slot in ``sl`` greater than ``s`` (2**30, above any slot, when none)."""
    return tl.min(tl.where(sl > s, sl, 1073741824))


@triton.jit
def _shrink_mixed(
    xa, sl, x_ptr, ins_ptr, w_ptr, a_ptr, rows64, rmask, k_lo, k_hi,
    sxm, sxk, sim, sik, sas, sar, sak, rcol, cmask,
    HAS_INS: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """xa[m, c] += x[m] . A[sl[m, c]][r(c)] over [k_lo, k_hi), one pass per distinct slot.

    sl [BM, JRP]: the slot of row m for the adapter column block of c (-1: none). Rows that do
    not use the slot are not loaded; a tile whose rows are all -1 does no work at all.
    """
    WDT = w_ptr.dtype.element_ty
    LDT = a_ptr.dtype.element_ty
    s = tl.min(tl.where(sl >= 0, sl, 1073741824))
    smax = tl.max(sl)
    while s <= smax:
        sel = sl == s
        rsel = rmask & (tl.max(sel.to(tl.int32), axis=1) > 0)
        s64 = s.to(tl.int64)
        t = tl.zeros_like(xa)
        for k0 in range(k_lo, k_hi, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < k_hi
            x = _load_x(x_ptr, ins_ptr, rows64, rsel, kk, kmask, sxm, sxk, sim, sik, HAS_INS)
            x = x.to(WDT).to(LDT)
            a = tl.load(
                a_ptr + s64 * sas + rcol[None, :] * sar + kk[:, None] * sak,
                mask=kmask[:, None] & cmask[None, :],
                other=0.0,
            )
            t = _mm(x, a, t, PREC, UPCAST)
        xa += tl.where(sel, t, 0.0)
        s = _next_slot(sl, s)
    return xa


@triton.jit
def _expand_loop(acc, sl, xa_s, b_ptr, rcol, bmask, ncols, sbs, sbr, sbn, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc += sum over distinct slots s of (xa_s where sl == s) @ B[s][r(c), ncols]."""
    LDT = b_ptr.dtype.element_ty
    s = tl.min(tl.where(sl >= 0, sl, 1073741824))
    smax = tl.max(sl)
    while s <= smax:
        bt = tl.load(b_ptr + s.to(tl.int64) * sbs + rcol[:, None] * sbr + ncols[None, :] * sbn, mask=bmask, other=0.0)
        acc = _mm(tl.where(sl == s, xa_s, 0.0).to(LDT), bt, acc, PREC, UPCAST)
        s = _next_slot(sl, s)
    return acc


@triton.jit
def _expand_mixed(
    out, base, xa_s, sl, b_ptr, dora_ptr, ts_ptr, rows64, rmask, ncols, nmask, jcol, rcol, cmask,
    sbs, sbr, sbn, sds, sdn, stm, stj,
    DORA: tl.constexpr, J: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Per-row slots: out += lora (or DoRA's (g - 1) * base + g * lora per adapter column)."""
    bmask = cmask[:, None] & nmask[None, :]
    if DORA:
        for j in tl.static_range(J):
            slj = tl.where((jcol == j)[None, :], sl, -1)
            lora = _expand_loop(tl.zeros_like(out), slj, xa_s, b_ptr, rcol, bmask, ncols, sbs, sbr, sbn, PREC, UPCAST)
            sj = tl.load(ts_ptr + rows64 * stm + j * stj, mask=rmask, other=-1)
            g = tl.load(
                dora_ptr + tl.maximum(sj, 0).to(tl.int64)[:, None] * sds + ncols[None, :] * sdn,
                mask=(sj >= 0)[:, None] & nmask[None, :],
                other=1.0,
            ).to(tl.float32)
            out += (g - 1.0) * base + g * lora
    else:
        out = _expand_loop(out, sl, xa_s, b_ptr, rcol, bmask, ncols, sbs, sbr, sbn, PREC, UPCAST)
    return out


@triton.jit
def _expand_bcast(
    out, base, xa_s, slot_c64, cvalid, b_ptr, dora_ptr, ts_ptr, ncols, nmask, jcol, rcol,
    sbs, sbr, sbn, sds, sdn, stj,
    DORA: tl.constexpr, J: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Every row uses the same slots: one [BM, JRP] x [JRP, BN] dot (one per adapter for DoRA)."""
    LDT = b_ptr.dtype.element_ty
    bt = tl.load(
        b_ptr + slot_c64[:, None] * sbs + rcol[:, None] * sbr + ncols[None, :] * sbn,
        mask=cvalid[:, None] & nmask[None, :],
        other=0.0,
    )
    if DORA:
        for j in tl.static_range(J):
            lora = _mm(tl.where((jcol == j)[None, :], xa_s, 0.0).to(LDT), bt, tl.zeros_like(out), PREC, UPCAST)
            sj = tl.load(ts_ptr + j * stj)
            g = tl.load(dora_ptr + tl.maximum(sj, 0).to(tl.int64) * sds + ncols * sdn, mask=nmask, other=1.0)
            g = tl.where(sj >= 0, g.to(tl.float32), 1.0)
            out += (g[None, :] - 1.0) * base + g[None, :] * lora
    else:
        out = _mm(xa_s.to(LDT), bt, out, PREC, UPCAST)
    return out


@triton.jit
def _store_out(
    out, bias_ptr, outs_ptr, y_ptr, rows64, rmask, ncols, nmask, som, son, sym, syn,
    HAS_BIAS: tl.constexpr, HAS_OUTS: tl.constexpr,
):
    """y = (out + bias) * output_scale, cast to y's dtype."""
    m2 = rmask[:, None] & nmask[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + ncols, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if HAS_OUTS:
        out *= tl.load(outs_ptr + rows64[:, None] * som + ncols[None, :] * son, mask=m2, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows64[:, None] * sym + ncols[None, :] * syn, out.to(y_ptr.dtype.element_ty), mask=m2)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fused_linear_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, scale_ptr, ts_ptr, dora_ptr, ins_ptr, outs_ptr,
    y_ptr, xa_ptr, ws_ptr, cnt_ptr,
    M, N, K, R, K_PER_SPLIT, XA_SPLITS,
    sxm, sxk, swn, swk, sas, sar, sak, sbs, sbr, sbn, stm, stj, sds, sdn, sim, sik, som, son, sym, syn,
    HAS_BIAS: tl.constexpr, SHRINK: tl.constexpr, DORA: tl.constexpr, HAS_INS: tl.constexpr,
    HAS_OUTS: tl.constexpr, J: tl.constexpr, RP: tl.constexpr, JRP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    PREC_W: tl.constexpr, PREC_L: tl.constexpr, UPCAST_W: tl.constexpr, UPCAST_L: tl.constexpr,
):
    """One [BM, BN] tile of y over one K slice. SHRINK: 0 no LoRA, 1 same slots for every row
    (shrink inside the K loop on the shared x tile), 2 per-row slots (shrink per distinct slot
    after the base loop), 3 per-row slots with xa precomputed by _lora_shrink_kernel."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # grouped tile order: GROUP_M row tiles share each weight tile while it is in L2
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsz = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsz
    pid_n = (pid % width) // gsz

    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    ncols = pid_n * BN + tl.arange(0, BN)
    nmask = ncols < N
    ncols64 = ncols.to(tl.int64)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    WDT = w_ptr.dtype.element_ty

    # the concatenated adapter axis: column c is rank row r(c) of adapter j(c)
    cols = tl.arange(0, JRP)
    jcol = cols // RP
    rcol = cols % RP
    cmask = (jcol < J) & (rcol < R)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if SHRINK == 1:
        slot_c = tl.load(ts_ptr + jcol * stj, mask=jcol < J, other=-1)
        cvalid = cmask & (slot_c >= 0)
        slot_c64 = tl.maximum(slot_c, 0).to(tl.int64)
        xa = tl.zeros((BM, JRP), dtype=tl.float32)

    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < k_hi
        x = _load_x(x_ptr, ins_ptr, rows64, rmask, kk, kmask, sxm, sxk, sim, sik, HAS_INS).to(WDT)
        w = tl.load(
            w_ptr + kk.to(tl.int64)[:, None] * swk + ncols64[None, :] * swn,
            mask=kmask[:, None] & nmask[None, :],
            other=0.0,
        )
        acc = _mm(x, w, acc, PREC_W, UPCAST_W)
        if SHRINK == 1:
            # slot -1 (adapter off for the batch): loads masked off, the dot adds zeros
            a = tl.load(
                a_ptr + slot_c64[None, :] * sas + rcol[None, :] * sar + kk[:, None] * sak,
                mask=kmask[:, None] & cvalid[None, :],
                other=0.0,
            )
            xa = _mm(x.to(a_ptr.dtype.element_ty), a, xa, PREC_L, UPCAST_L)

    out = acc
    if SHRINK == 1:
        sc = tl.load(scale_ptr + slot_c64, mask=cvalid, other=0.0).to(tl.float32)
        out = _expand_bcast(
            out, acc, xa * sc[None, :], slot_c64, cvalid, b_ptr, dora_ptr, ts_ptr, ncols64, nmask, jcol, rcol,
            sbs, sbr, sbn, sds, sdn, stj, DORA, J, PREC_L, UPCAST_L,
        )
    elif SHRINK >= 2:
        sl = tl.load(ts_ptr + rows64[:, None] * stm + jcol[None, :] * stj, mask=rmask[:, None] & cmask[None, :], other=-1)
        xa = tl.zeros((BM, JRP), dtype=tl.float32)
        if SHRINK == 2:
            xa = _shrink_mixed(
                xa, sl, x_ptr, ins_ptr, w_ptr, a_ptr, rows64, rmask, k_lo, k_hi,
                sxm, sxk, sim, sik, sas, sar, sak, rcol, cmask, HAS_INS, BK, PREC_L, UPCAST_L,
            )
        else:
            if pid_k == 0:  # xa covers all of K: only the first K slice adds the expand
                for i in range(XA_SPLITS):
                    xa += tl.load(
                        xa_ptr + (i * M + rows64[:, None]) * JRP + cols[None, :],
                        mask=rmask[:, None] & cmask[None, :],
                        other=0.0,
                    )
        sc = tl.load(scale_ptr + tl.maximum(sl, 0), mask=sl >= 0, other=0.0).to(tl.float32)
        if SHRINK == 3 and not DORA:
            if pid_k == 0:  # the other K slices have nothing to add: skip their B reads
                out = _expand_mixed(
                    out, acc, xa * sc, sl, b_ptr, dora_ptr, ts_ptr, rows64, rmask, ncols64, nmask, jcol, rcol, cmask,
                    sbs, sbr, sbn, sds, sdn, stm, stj, DORA, J, PREC_L, UPCAST_L,
                )
        else:  # (DoRA's (g - 1) * base term is needed in every K slice)
            out = _expand_mixed(
                out, acc, xa * sc, sl, b_ptr, dora_ptr, ts_ptr, rows64, rmask, ncols64, nmask, jcol, rcol, cmask,
                sbs, sbr, sbn, sds, sdn, stm, stj, DORA, J, PREC_L, UPCAST_L,
            )

    if SPLIT_K == 1:
        _store_out(out, bias_ptr, outs_ptr, y_ptr, rows64, rmask, ncols64, nmask, som, son, sym, syn, HAS_BIAS, HAS_OUTS)
    else:
        # Everything above is linear in the K slice, so partial tiles add up; only the
        # epilogue (bias, IA3 out, cast) waits for the sum. The last program to arrive at this
        # tile's counter sums the partials in slice order (deterministic) and stores y.
        m2 = rmask[:, None] & nmask[None, :]
        tl.store(ws_ptr + (pid_k * M + rows64[:, None]) * N + ncols64[None, :], out, mask=m2)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid, 1)  # acq_rel, gpu scope: partials are visible
        if arrived == SPLIT_K - 1:
            tot = tl.zeros((BM, BN), dtype=tl.float32)
            for i in range(SPLIT_K):
                tot += tl.load(
                    ws_ptr + (i * M + rows64[:, None]) * N + ncols64[None, :], mask=m2, other=0.0, cache_modifier=".cg"
                )
            _store_out(tot, bias_ptr, outs_ptr, y_ptr, rows64, rmask, ncols64, nmask, som, son, sym, syn, HAS_BIAS, HAS_OUTS)


@triton.jit
def _lora_shrink_kernel(
    x_ptr, ins_ptr, w_ptr, a_ptr, ts_ptr, xa_ptr,
    M, K, R, K_PER_SPLIT,
    sxm, sxk, sim, sik, sas, sar, sak, stm, stj,
    HAS_INS: tl.constexpr, BROADCAST: tl.constexpr, J: tl.constexpr, RP: tl.constexpr, JRP: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, PREC_L: tl.constexpr, UPCAST_L: tl.constexpr,
):
    """xa[ks, m, c] = xs[m] . A[slot(m, j(c))][r(c)] over K slice ks, for a tile of BM rows.

    The shrink of the "given" path: computed once per row tile, so every adapter's A is read
    once per row tile that uses it, instead of once per output tile of the fused kernel.
    Rows without an adapter get zeros. Grid (row tiles, K slices).
    """
    pid_m = tl.program_id(0)
    ks = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, JRP)
    jcol = cols // RP
    rcol = cols % RP
    cmask = (jcol < J) & (rcol < R)
    k_lo = ks * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    xa = tl.zeros((BM, JRP), dtype=tl.float32)
    if BROADCAST:
        slot_c = tl.load(ts_ptr + jcol * stj, mask=jcol < J, other=-1)
        cvalid = cmask & (slot_c >= 0)
        slot_c64 = tl.maximum(slot_c, 0).to(tl.int64)
        if tl.max(tl.where(cvalid, 1, 0)) > 0:
            for k0 in range(k_lo, k_hi, BK):
                kk = k0 + tl.arange(0, BK)
                kmask = kk < k_hi
                x = _load_x(x_ptr, ins_ptr, rows64, rmask, kk, kmask, sxm, sxk, sim, sik, HAS_INS)
                x = x.to(w_ptr.dtype.element_ty).to(a_ptr.dtype.element_ty)
                a = tl.load(
                    a_ptr + slot_c64[None, :] * sas + rcol[None, :] * sar + kk[:, None] * sak,
                    mask=kmask[:, None] & cvalid[None, :],
                    other=0.0,
                )
                xa = _mm(x, a, xa, PREC_L, UPCAST_L)
    else:
        sl = tl.load(ts_ptr + rows64[:, None] * stm + jcol[None, :] * stj, mask=rmask[:, None] & cmask[None, :], other=-1)
        xa = _shrink_mixed(
            xa, sl, x_ptr, ins_ptr, w_ptr, a_ptr, rows64, rmask, k_lo, k_hi,
            sxm, sxk, sim, sik, sas, sar, sak, rcol, cmask, HAS_INS, BK, PREC_L, UPCAST_L,
        )
    tl.store(xa_ptr + (ks * M + rows64[:, None]) * JRP + cols[None, :], xa, mask=rmask[:, None])


@triton.jit
def _lora_add_kernel(
    xs_ptr, yin_ptr, base_ptr, bias_ptr, a_ptr, b_ptr, scale_ptr, ts_ptr, dora_ptr, outs_ptr, y_ptr, xa_ptr,
    M, N, K, R, N_PER_PROG, XA_SPLITS,
    sxm, sxk, syim, syin, sbam, sban, sas, sar, sak, sbs, sbr, sbn, stm, stj, sds, sdn, som, son, sym, syn,
    HAS_BIAS: tl.constexpr, SHRINK: tl.constexpr, DORA: tl.constexpr, HAS_OUTS: tl.constexpr,
    J: tl.constexpr, RP: tl.constexpr, JRP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, PREC_L: tl.constexpr, UPCAST_L: tl.constexpr,
):
    """y = (yin + adapters) * output_scale for a BM-row tile and an N slice (SGMV style).

    yin = xs @ W.T + bias computed by cuBLAS; base (DoRA) = base_in - bias. The shrink runs once
    per program over all of K, then the expand loops over the program's N slice.
    SHRINK: 0 none (IA3 output scale only), 1 same slots for every row, 2 per-row slots,
    3 xa precomputed by _lora_shrink_kernel (summed over its XA_SPLITS K slices).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, JRP)
    jcol = cols // RP
    rcol = cols % RP
    cmask = (jcol < J) & (rcol < R)
    LDT = a_ptr.dtype.element_ty

    live = False
    if SHRINK == 1:
        slot_c = tl.load(ts_ptr + jcol * stj, mask=jcol < J, other=-1)
        cvalid = cmask & (slot_c >= 0)
        slot_c64 = tl.maximum(slot_c, 0).to(tl.int64)
        live = tl.max(tl.where(cvalid, 1, 0)) > 0
        xa = tl.zeros((BM, JRP), dtype=tl.float32)
        if live:
            for k0 in range(0, K, BK):
                kk = k0 + tl.arange(0, BK)
                kmask = kk < K
                x = tl.load(
                    xs_ptr + rows64[:, None] * sxm + kk[None, :] * sxk, mask=rmask[:, None] & kmask[None, :], other=0.0
                )
                a = tl.load(
                    a_ptr + slot_c64[None, :] * sas + rcol[None, :] * sar + kk[:, None] * sak,
                    mask=kmask[:, None] & cvalid[None, :],
                    other=0.0,
                )
                xa = _mm(x.to(LDT), a, xa, PREC_L, UPCAST_L)
        sc = tl.load(scale_ptr + slot_c64, mask=cvalid, other=0.0).to(tl.float32)
        xa_s = xa * sc[None, :]
    elif SHRINK == 2:
        sl = tl.load(ts_ptr + rows64[:, None] * stm + jcol[None, :] * stj, mask=rmask[:, None] & cmask[None, :], other=-1)
        live = tl.max(sl) >= 0
        xa = _shrink_mixed(
            tl.zeros((BM, JRP), dtype=tl.float32), sl, xs_ptr, xs_ptr, xs_ptr, a_ptr, rows64, rmask, 0, K,
            sxm, sxk, 0, 0, sas, sar, sak, rcol, cmask, False, BK, PREC_L, UPCAST_L,
        )
        sc = tl.load(scale_ptr + tl.maximum(sl, 0), mask=sl >= 0, other=0.0).to(tl.float32)
        xa_s = xa * sc
    elif SHRINK == 3:
        sl = tl.load(ts_ptr + rows64[:, None] * stm + jcol[None, :] * stj, mask=rmask[:, None] & cmask[None, :], other=-1)
        live = tl.max(sl) >= 0
        xa = tl.zeros((BM, JRP), dtype=tl.float32)
        for i in range(XA_SPLITS):
            xa += tl.load(xa_ptr + (i * M + rows64[:, None]) * JRP + cols[None, :],
                          mask=rmask[:, None] & cmask[None, :], other=0.0)
        sc = tl.load(scale_ptr + tl.maximum(sl, 0), mask=sl >= 0, other=0.0).to(tl.float32)
        xa_s = xa * sc

    if HAS_OUTS:
        run = True
    else:
        run = live  # no adapter on any row of the tile and no output scale: nothing to do
    if run:
        n_lo = pid_n * N_PER_PROG
        n_hi = tl.minimum(n_lo + N_PER_PROG, N)
        for n0 in range(n_lo, n_hi, BN):
            ncols = n0 + tl.arange(0, BN)
            nmask = ncols < n_hi
            ncols64 = ncols.to(tl.int64)
            m2 = rmask[:, None] & nmask[None, :]
            out = tl.load(yin_ptr + rows64[:, None] * syim + ncols64[None, :] * syin, mask=m2, other=0.0).to(tl.float32)
            if SHRINK != 0:
                base = out
                if DORA:
                    base = tl.load(
                        base_ptr + rows64[:, None] * sbam + ncols64[None, :] * sban, mask=m2, other=0.0
                    ).to(tl.float32)
                    if HAS_BIAS:
                        base -= tl.load(bias_ptr + ncols64, mask=nmask, other=0.0).to(tl.float32)[None, :]
                if SHRINK == 1:
                    out = _expand_bcast(
                        out, base, xa_s, slot_c64, cvalid, b_ptr, dora_ptr, ts_ptr, ncols64, nmask, jcol, rcol,
                        sbs, sbr, sbn, sds, sdn, stj, DORA, J, PREC_L, UPCAST_L,
                    )
                else:
                    out = _expand_mixed(
                        out, base, xa_s, sl, b_ptr, dora_ptr, ts_ptr, rows64, rmask, ncols64, nmask, jcol, rcol, cmask,
                        sbs, sbr, sbn, sds, sdn, stm, stj, DORA, J, PREC_L, UPCAST_L,
                    )
            if HAS_OUTS:
                out *= tl.load(outs_ptr + rows64[:, None] * som + ncols64[None, :] * son, mask=m2, other=0.0).to(tl.float32)
            tl.store(y_ptr + rows64[:, None] * sym + ncols64[None, :] * syn, out.to(y_ptr.dtype.element_ty), mask=m2)


# ---------------------------------------------------------------------------------------------
# Host side: plans (cached per shape), launches
# ---------------------------------------------------------------------------------------------

PATHS = ("decode", "fused", "given", "split")

_overrides: dict = {"path": None, "split_k": None, "split_shrink": None, "tile": None}


@contextlib.contextmanager
def override(path: str | None = None, split_k: int | None = None, split_shrink: str | None = None,
             tile: tuple | None = None):
    """Force a path and/or a split-K factor (tests, benchmarks); plans made inside are dropped after.

    path: "decode" / "fused" (the fused kernel with decode or GEMM tiling, shrink inside it),
    "given" (row-tile shrink kernel, then the fused kernel), "split" (cuBLAS base, then
    _lora_add_kernel). split_shrink (split path only): "inside" (one kernel) or "given" (the
    shrink kernel first). tile (fused kernel): (BM, BN, BK, num_warps, num_stages) before the
    shared-memory and shape clamps (``bench/bench_linear.py --tune`` sweeps it).
    """
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    if split_shrink not in (None, "inside", "given"):
        raise ValueError(f"unknown split_shrink {split_shrink!r}; expected 'inside' or 'given'")
    old = dict(_overrides)
    _overrides.update(path=path, split_k=split_k, split_shrink=split_shrink, tile=None if tile is None else tuple(tile))
    _plans.clear()
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(old)
        _plans.clear()


class Plan(NamedTuple):
    path: str
    grid: tuple
    meta: dict  # constexprs + launch options of the main kernel
    split_k: int
    k_per_split: int
    xa_splits: int  # "given": K slices of the shrink kernel (0: no shrink kernel)
    xa_k_per_split: int
    xa_bk: int
    xa_bm: int  # "given": rows per program of the shrink kernel
    n_per_prog: int  # "split": N columns per program of _lora_add_kernel
    j_chunk: int  # "split": adapters per _lora_add_kernel launch


_plans: dict = {}
_plans_generation = [0]  # tuning.generation the cached plans were made under
_sms: dict = {}


def _num_sms(device: torch.device) -> int:
    n = _sms.get(device)
    if n is None:
        if device.type == "cuda":
            n = torch.cuda.get_device_properties(device).multi_processor_count
        else:
            n = ASSUMED_SMS
        _sms[device] = n
    return n


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# tl.dot precision of an fp32 adapter (PEFT's default) applied to 16-bit activations. The
# activations are exact in TF32 (10-bit mantissa >= fp16's and bf16's), so only A, B and the
# [M, R] intermediate round, to 2^-11 relative: below the 16-bit output's own rounding, and the
# tolerance tests hold. "tf32x3" (~fp32) doubled the decode kernel's registers (142 -> 255 plus
# spills, sm_90 AOT compile) and "ieee" runs on FMA units at a fraction of the tensor-core rate.
# To measure on a GPU: error vs PEFT's fp32 path, and the time of "tf32" vs "tf32x3".
FP32_ADAPTER_PRECISION = "tf32"


def _precision(dtype: torch.dtype, other: torch.dtype, fp32_prec: str) -> str:
    """tl.dot input precision for operands of ``dtype``; ``other`` is the activations' dtype.

    All-fp32 products follow torch.get_float32_matmul_precision() ("highest" -> exact fp32, as
    cuBLAS and PEFT compute by default); an fp32 adapter next to 16-bit activations uses
    FP32_ADAPTER_PRECISION."""
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit operands
    if other != torch.float32:
        return FP32_ADAPTER_PRECISION
    return "ieee" if fp32_prec == "highest" else "tf32"


def _fit_smem(BM: int, BN: int, BK: int, JRP: int, wsize: int, lsize: int, stages: int, L) -> tuple:
    """Shrink BK, then the pipeline depth, until the per-stage tiles fit SMEM_BUDGET."""

    def need(bk, st):
        return st * (BM * bk * wsize + bk * BN * wsize + bk * JRP * lsize)

    while need(BK, stages) > L.SMEM_BUDGET and BK > 32:
        BK //= 2
    while need(BK, stages) > L.SMEM_BUDGET and stages > 2:
        stages -= 1
    return BK, stages


def _split_k(n_tiles: int, K: int, M: int, N: int, bk: int, sms: int, w_bytes: int, L) -> int:
    want = max(1, (L.TARGET_WAVES * sms + n_tiles - 1) // max(n_tiles, 1))
    sk = 1
    while (
        sk < want
        and sk * 2 <= L.MAX_SPLIT_K
        and K // (sk * 2) >= max(L.MIN_K_PER_SPLIT, bk)
        and (sk * 2) * M * N * 4 <= L.WS_MAX_FRACTION * w_bytes
    ):
        sk *= 2
    return sk


def _make_plan(dev, M, N, K, xdt, wdt, ldt, R, J, bcast, S, has_bias, dora, has_ins, has_outs, fp32_prec) -> Plan:
    has_lora = J > 0
    L = _rules(dev)
    RP = max(16, _pow2(R)) if has_lora else 16
    JRP = _pow2(J) * RP if has_lora else 16
    distinct = 1 if bcast else min(S, M * J)
    sms = _num_sms(dev)
    prec_w = _precision(wdt, xdt, fp32_prec)
    prec_l = _precision(ldt, xdt, fp32_prec) if has_lora else "tf32"
    ieee = "ieee" in (prec_w, prec_l)
    esize = torch.empty((), dtype=wdt).element_size()
    lsize = torch.empty((), dtype=ldt).element_size() if has_lora else 0
    upcast_w = INTERPRET and wdt == torch.bfloat16
    upcast_l = INTERPRET and has_lora and ldt == torch.bfloat16
    common = dict(J=max(J, 1), RP=RP, JRP=JRP, PREC_L=prec_l, UPCAST_L=upcast_l)
    forced = _overrides["path"]
    forced_add = _overrides.get("split_shrink")

    # ---- which path ----
    if forced is not None:
        path = forced
    elif not has_lora and not (has_ins or has_outs):
        path = "split"  # a plain linear: cuBLAS as it is (the split path returns F.linear)
    elif M > L.FUSED_MAX_ROWS:
        path = "split"
    else:
        path = "decode" if M <= L.DECODE_MAX_ROWS else "fused"
        limit = min(L.DECODE_MAX_JRP if path == "decode" else L.FUSED_MAX_JRP, L.IEEE_MAX_JRP if ieee else 1 << 30)
        if has_lora and JRP > limit:
            path = "split"
    if path == "given" and not has_lora:
        path = "decode" if M <= L.DECODE_MAX_ROWS else "fused"

    if path == "split":
        # _lora_add_kernel tiles. BN=128 output columns per expand step (a 256-byte line of a
        # bf16 y row); BK=64 keeps the [BK, JRP] A tile small. The [BM, JRP] fp32 xa stays in
        # registers for the whole N loop: BM * JRP <= 8192 (sm_90 AOT compile: BM=64 at
        # J*RP=256 spilled 640 bytes, BM=32 with 8 warps none).
        jrp_chunk = _pow2(max(1, min(J, L.ADD_MAX_JRP // RP))) * RP if has_lora else 16
        j_chunk = max(1, min(J, L.ADD_MAX_JRP // RP)) if has_lora else 1
        BN = 128 if N >= 128 else max(16, _pow2(N))
        if ieee:  # FMA dot: operand tiles in registers (AOT: 255 regs at BN=128, 80 at 64)
            BN = min(BN, 64)
        while BN > 32 and jrp_chunk * BN * lsize > 64 * 1024:  # the expand's [JRP, BN] B tile
            BN //= 2
        BM = min(64, max(16, _pow2(M)), max(16, 8192 // jrp_chunk))
        n_tiles = triton.cdiv(N, BN)
        # One kernel (shrink + expand per program) re-reads the x row tile once per N slice;
        # more row tiles (smaller BM) or more N slices fill the GPU. When that fills it only at
        # an x re-read above MAX_XREREAD_FRACTION of the weight's bytes, the shrink runs first
        # (_lora_shrink_kernel, x read once) and every program only expands one [BM, BN] tile.
        while BM > 16 and triton.cdiv(M, BM) * L.ADD_MAX_NSPLIT < sms:
            BM //= 2
        m_tiles = triton.cdiv(M, BM)
        nsplit = max(1, min(n_tiles, L.ADD_MAX_NSPLIT, (L.TARGET_WAVES * sms + m_tiles - 1) // m_tiles))
        xs_bytes = M * K * torch.empty((), dtype=xdt).element_size()
        given = has_lora and J <= j_chunk and (
            forced_add == "given" or (forced_add is None and (nsplit - 1) * xs_bytes > L.MAX_XREREAD_FRACTION * N * K * esize)
        )
        xa_splits = xa_k = xa_bk = xa_bm = 0
        if given:
            BM = min(64, max(16, _pow2(M)), max(16, 8192 // jrp_chunk))
            m_tiles, nsplit = triton.cdiv(M, BM), n_tiles
            xa_bm = BM
            xa_bk, _ = _fit_smem(xa_bm, 0, 64, jrp_chunk, esize, lsize, 2, L)
            want = max(1, (L.TARGET_WAVES * sms + m_tiles - 1) // m_tiles)
            xa_splits = max(1, min(want, K // L.MIN_K_PER_SHRINK))
            xa_k = max(xa_bk, triton.cdiv(triton.cdiv(K, xa_splits), xa_bk) * xa_bk)
            xa_splits = max(1, triton.cdiv(K, xa_k))
        n_per = triton.cdiv(triton.cdiv(N, nsplit), BN) * BN
        nsplit = triton.cdiv(N, n_per)
        meta = dict(common, J=j_chunk, JRP=jrp_chunk, BM=BM, BN=BN, BK=64, num_warps=8 if BM >= 32 else 4, num_stages=2)
        return Plan(path, (m_tiles, nsplit), meta, 1, K, xa_splits, xa_k, xa_bk, xa_bm, n_per, j_chunk)

    # ---- fused kernel tiles (DECODE_TILE / FUSED_TILE_*: see where they are defined) ----
    if _overrides.get("tile") is not None:
        BM, BN, BK, warps, stages = _overrides["tile"]
    elif M <= L.DECODE_MAX_ROWS:
        BM, BN, BK, warps, stages = L.DECODE_TILE
    else:
        BM, BN, BK, warps, stages = L.FUSED_TILE_32 if M <= 32 else L.FUSED_TILE_64
    if ieee:  # FMA dot (see IEEE_MAX_JRP): smaller operand tiles
        BN, BK = min(BN, 64), min(BK, 32)
    while has_lora and BN > 64 and JRP * BN > 16384:  # [JRP, BN] B tile (AOT: JRP=256, BN=128 spilled)
        BN //= 2
    if N < BN:
        BN = max(16, _pow2(N))
    if K < BK:
        BK = max(16, _pow2(K))
    BK, stages = _fit_smem(BM, BN, BK, JRP if has_lora else 0, esize, lsize, stages, L)
    m_tiles = triton.cdiv(M, BM)
    tiles = m_tiles * triton.cdiv(N, BN)

    if forced is None and has_lora and path in ("decode", "fused"):
        reread = m_tiles * min(distinct, BM) * JRP * lsize / (BN * esize)
        if (not bcast and distinct > L.FUSED_MAX_DISTINCT) or reread > L.MAX_AREREAD_FRACTION:
            path = "given"

    sk = _overrides["split_k"]
    if sk is None:
        sk = _split_k(tiles, K, M, N, BK, sms, N * K * esize, L)
    sk = max(1, min(int(sk), triton.cdiv(K, BK)))
    k_per = max(BK, triton.cdiv(triton.cdiv(K, sk), BK) * BK)
    sk = max(1, triton.cdiv(K, k_per))

    if not has_lora:
        shrink = 0
    elif path == "given":
        shrink = 3
    else:
        shrink = 1 if bcast else 2

    xa_splits = xa_k = xa_bk = xa_bm = 0
    if shrink == 3:
        # shrink kernel: 16-row tiles for decode, 64 above (A read once per row tile); K slices
        # (>= MIN_K_PER_SHRINK) until there are TARGET_WAVES programs per SM
        xa_bm = 16 if M <= L.DECODE_MAX_ROWS else 64
        xa_bk, _ = _fit_smem(xa_bm, 0, 64, JRP, esize, lsize, 2, L)
        xa_m_tiles = triton.cdiv(M, xa_bm)
        want = max(1, (L.TARGET_WAVES * sms + xa_m_tiles - 1) // xa_m_tiles)
        xa_splits = max(1, min(want, K // L.MIN_K_PER_SHRINK))
        xa_k = max(xa_bk, triton.cdiv(triton.cdiv(K, xa_splits), xa_bk) * xa_bk)
        xa_splits = max(1, triton.cdiv(K, xa_k))

    meta = dict(
        common, HAS_BIAS=has_bias, SHRINK=shrink, DORA=dora and has_lora, HAS_INS=has_ins, HAS_OUTS=has_outs,
        BM=BM, BN=BN, BK=BK, GROUP_M=8, SPLIT_K=sk, PREC_W=prec_w, UPCAST_W=upcast_w,
        num_warps=warps, num_stages=stages,
    )
    return Plan(path, (tiles, sk), meta, sk, k_per, xa_splits, xa_k, xa_bk, xa_bm, 0, 0)


def _strides2(t: Tensor | None, rows: int) -> tuple:
    """(row stride, column stride) of a [N] / [1, N] / [rows, N] scale; 0 for broadcast dims."""
    if t is None:
        return 0, 0
    if t.dim() == 1:
        return 0, t.stride(0)
    return (0 if t.shape[0] == 1 and rows != 1 else t.stride(0)), t.stride(1)


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
        _check(x, weight, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale, has_lora)
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
        shrink = 1 if bcast else 2
        if plan.xa_splits:  # the shrink first (x read once), then expand-only programs
            shrink = 3
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
        shrink = 0
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


def _check(x, weight, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale, has_lora):
    """Shape checks, once per plan (the hot path does none)."""
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"adapter_linear: weight must be [N, K={K}], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"adapter_linear: bias must be [{N}], got {tuple(bias.shape)}")
    if input_scale is not None and input_scale.shape[-1] != K:
        raise ValueError(f"adapter_linear: input_scale must be [K={K}] or [M, K], got {tuple(input_scale.shape)}")
    if output_scale is not None and output_scale.shape[-1] != N:
        raise ValueError(f"adapter_linear: output_scale must be [N={N}] or [M, N], got {tuple(output_scale.shape)}")
    if not has_lora:
        return
    if lora_b is None or slot_scales is None:
        raise ValueError("adapter_linear: lora_a given without lora_b / slot_scales")
    S, R, Ka = lora_a.shape
    if Ka != K or tuple(lora_b.shape) != (S, R, N):
        raise ValueError(
            f"adapter_linear: lora_a must be [S, R, K={K}] and lora_b [S, R, N={N}], got "
            f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
        )
    if lora_a.dtype != lora_b.dtype:
        raise ValueError(f"adapter_linear: lora_a and lora_b dtypes differ ({lora_a.dtype} vs {lora_b.dtype})")
    if token_slots.dim() != 2 or token_slots.shape[0] not in (1, M):
        raise ValueError(f"adapter_linear: token_slots must be [M={M} or 1, J], got {tuple(token_slots.shape)}")
    if token_slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"adapter_linear: token_slots must be int32, got {token_slots.dtype}")
    if dora_scale is not None and tuple(dora_scale.shape) != (S, N):
        raise ValueError(f"adapter_linear: dora_scale must be [S={S}, N={N}], got {tuple(dora_scale.shape)}")
