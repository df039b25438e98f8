"""Triton kernels for ``adapter_linear_4bit`` / ``adapter_linear_8bit`` (bitsandbytes bases).

Semantics (``fastpeft/ops/_schema.py``, reference in ``fastpeft/ops/reference.py``)::

    W  = dequantize(qweight)                       -> [N, K] in the compute dtype cd
    xs = x * input_scale
    y  = (xs.to(cd) @ W.T + bias).to(x.dtype)
    for j: s = token_slots[:, j]; lora = (xs @ lora_a[s].T) @ lora_b[s] * slot_scales[s]
           y += lora  |  y += (g - 1) * (xs @ W.T) + g * lora   (DoRA, g = dora_scale[s])
    y  = y * output_scale                   lora_a [S, R, K]; lora_b [S, R, N] is B transposed

``_quant_linear_kernel`` (one launch: the packed weight is read once)
    A program owns a ``[BM, BN]`` output tile and a slice of K (``SPLIT_K`` slices). Per K step
    it loads the x tile once and uses it twice: for the base (the weight tile is dequantized in
    registers: 4-bit nibbles -> 16-entry LUT -> times the block's absmax, which for double
    quantization is itself ``nested_code[absmax_q] * nested_absmax + offset``; int8 -> times
    the row scale) and for the LoRA shrink ``t += x @ A_cols`` against the stacked adapter
    columns. The epilogue expands ``t`` (``t * coef @ B_cols``), applies DoRA, bias and the IA3
    output scale. With ``SPLIT_K > 1`` every piece of that epilogue is linear in the partial
    sums, so each K slice applies it to its partials and atomically adds into an fp32
    workspace (bias from slice 0 only).

    Adapter columns: the ``C`` stacked rank columns are either ``J * R`` (all rows use the same
    slots: column ``c`` belongs to ``token_slots[0, c // R]``) or ``S * R`` (a slot per row:
    column ``c`` belongs to slot ``c // R`` and row ``m`` weights it by how many of its ``J``
    slots equal that slot). DoRA's ``g[s, n]`` is folded into the B columns and ``(g - 1)``
    into a per-row factor on the base: ``y = base * (1 + sum_j (g_j - 1)) + t @ (g * B) + bias``.

``_dequant_4bit_kernel``
    Dequantizes the whole 4-bit weight to the compute dtype: the prefill path (many rows),
    where cuBLAS on the dense weight beats a Triton GEMM with dequantization in the loop.

All launches use a grid fixed by the shapes and no host synchronisation (token slots, the
nested offset and the LUTs are read on the device).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tuning
from ._common import ASSUMED_SMS  # noqa: F401  (the SM count plans assume without a GPU)
from ._common import num_sms as _num_sms
from ._common import pow2 as _pow2
from ._common import strides2 as _strides2
from ._interpret import INTERPRET

# ---------------------------------------------------------------------------------------------
# Dispatch constants. UNMEASURED: chosen by reasoning about an H100 (132 SMs, 3.35 TB/s); no GPU
# was available when they were written. bench/bench_quant.py measures the alternatives
# ("fused" vs "dequant" paths, split-K on/off) and is the sweep that must set them.
# ---------------------------------------------------------------------------------------------

# Rows up to this use the decode tiling BM = 16 (tl.dot needs M >= 16, so 1..16 rows cost the
# same tensor-core work; the layer is memory-bound on the 0.5 byte/weight stream).
DECODE_MAX_ROWS = 16
# From this many rows on, dequantize once to the compute dtype and let cuBLAS run the GEMM
# (torch.ops.fastpeft.adapter_linear): the dequantization pass costs K*N*(0.5 + 2) bytes, about
# the time of M=~100 rows of GEMM at the H100's ridge point, and cuBLAS' GEMM efficiency on big
# tiles beats a Triton loop that also unpacks nibbles. To measure: tokens 64..4096.
PREFILL_MIN_ROWS = 256
# Largest padded count of stacked adapter columns (J*R or S*R) kept in registers next to the
# accumulator, per tile height; above it the kernel computes the base only and the adapters are
# added by the dense reference path. Set from a ptxas sm_90 compile sweep (tiles below, bf16,
# mixed slots + DoRA + IA3): BM=16 spills nothing up to 128 columns (256: ~3 KB of spills), BM=64
# up to 64 (128: ~2.2 KB). Speed unmeasured.
MAX_FUSED_COLS_DECODE = 128
MAX_FUSED_COLS = 64
# Split-K so that a decode launch has about TARGET_PROGRAMS_PER_SM programs per SM, but never a
# K slice shorter than MIN_K_PER_SPLIT (atomics and the x reload would dominate).
TARGET_PROGRAMS_PER_SM = 2
MIN_K_PER_SPLIT = 1024
MAX_SPLIT_K = 8
# Tiles (BM, BN, BK, num_warps, num_stages): the zero-spill configurations of a ptxas compile
# sweep for sm_90 (both formats, bf16, plain and mixed/DoRA/IA3 epilogues): BN=64, BK=64, 8 warps,
# 3 stages at BM=16 and BM=64. BN=128 or BK=128 with the heavier epilogues spilled 0.2-1.8 KB;
# BK=128 at 4 warps spilled too. Whether a wider tile would be faster despite spills is
# unmeasured (bench/bench_quant.py --tune sweeps them).
DECODE_TILE = (16, 64, 64, 8, 3)
PREFILL_TILE = (64, 64, 64, 8, 3)

# The constants above that a per-device tuning file may override (fastpeft/kernels/tuning.py;
# written by bench/bench_quant.py --tune).
TUNABLES = ("DECODE_MAX_ROWS", "PREFILL_MIN_ROWS", "MAX_FUSED_COLS_DECODE", "MAX_FUSED_COLS", "TARGET_PROGRAMS_PER_SM",
            "MIN_K_PER_SPLIT", "MAX_SPLIT_K", "DECODE_TILE", "PREFILL_TILE")


_rules_cache: dict = {}


def _rules(device: torch.device | None) -> SimpleNamespace:
    """The planner's constants for ``device``: this module's values, with the device's tuning file
    on top. Cached per device (every quantized forward asks; measured 6.5 us uncached vs a dict
    lookup): after changing a constant of this module at run time, call ``tuning.clear_cache()``."""
    key = (device, tuning.generation)
    rules = _rules_cache.get(key)
    if rules is None:
        if len(_rules_cache) > 64:
            _rules_cache.clear()
        defaults = {n: globals()[n] for n in TUNABLES}
        merged = defaults if device is None else tuning.rules("quant_linear", device, defaults)
        rules = _rules_cache[key] = SimpleNamespace(**merged)
    return rules

# Test hooks: force a path / split-K (None = heuristics).
FORCE_PATH: str | None = None  # "fused" or "dequant"
FORCE_SPLIT_K: int | None = None
FORCE_TILE: tuple | None = None  # (BM, BN, BK, num_warps, num_stages)

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _mma(a, b, acc, FP32: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the interpreter computes tl.dot with numpy, which has no bfloat16.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif FP32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _rnd(v, DT: tl.constexpr, INTERP: tl.constexpr):
    """float32 ``v`` -> ``DT`` rounding to nearest even (the interpreter truncates to bfloat16)."""
    if INTERP and DT == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return v.to(DT)


@triton.jit
def _absmax_at(absmax_ptr, nabsmax_ptr, ncode_ptr, noff, blk, mask, NBLOCKSIZE, NESTED: tl.constexpr):
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        am = tl.load(ncode_ptr + q, mask=mask, other=0.0) * tl.load(nabsmax_ptr + blk // NBLOCKSIZE, mask=mask, other=0.0)
        return am + noff
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _quant_linear_kernel(
    x_ptr, sxm, sxk,
    w_ptr, swn, swk,
    absmax_ptr, code_ptr, nabsmax_ptr, ncode_ptr, noff_ptr,
    bias_ptr,
    a_ptr, sas, sar, sak,
    b_ptr, sbs, sbr, sbn,
    scale_ptr,
    slots_ptr, stm, stj,
    dora_ptr, sds, sdn,
    ins_ptr, sim, sik,
    outs_ptr, som, son,
    y_ptr, sym, syn,
    M, N, K, R, C,
    BLOCKSIZE: tl.constexpr, NBLOCKSIZE: tl.constexpr,
    FMT: tl.constexpr,  # 4: bitsandbytes 4-bit, 8: LLM.int8
    NESTED: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, MIXED: tl.constexpr, J: tl.constexpr,
    HAS_DORA: tl.constexpr, HAS_INS: tl.constexpr, HAS_OUTS: tl.constexpr,
    CD: tl.constexpr, LD: tl.constexpr,
    SPLIT_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CP: tl.constexpr,
    INTERP: tl.constexpr, IDX64: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_tiles_n = tl.cdiv(N, BN)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n

    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rmask = rows < M
    nmask = cols < N
    # int32 offsets unless a tensor has 2**31 elements or more (halves the address registers)
    if IDX64:
        rows64 = rows.to(tl.int64)
        cols64 = cols.to(tl.int64)
    else:
        rows64 = rows
        cols64 = cols

    k_steps = tl.cdiv(K, BK)
    steps_per_split = tl.cdiv(k_steps, SPLIT_K)
    k_lo = pid_k * steps_per_split * BK
    k_hi = tl.minimum(k_lo + steps_per_split * BK, K)

    XD: tl.constexpr = x_ptr.dtype.element_ty
    CD_FP32: tl.constexpr = CD == tl.float32
    LD_FP32: tl.constexpr = LD == tl.float32
    UP_C: tl.constexpr = INTERP and (CD == tl.bfloat16)
    UP_L: tl.constexpr = INTERP and (LD == tl.bfloat16)

    acc = tl.zeros((BM, BN), dtype=tl.float32)

    if HAS_LORA:
        ccol = tl.arange(0, CP)
        cvalid = ccol < C
        grp = ccol // R
        rr = ccol % R
        if MIXED:
            cslot = grp
        else:
            cslot = tl.load(slots_ptr + grp * stj, mask=cvalid, other=-1)
        cvalid = cvalid & (cslot >= 0)
        cslot64 = tl.where(cvalid, cslot, 0)
        if IDX64:
            cslot64 = cslot64.to(tl.int64)
        a_row = a_ptr + cslot64 * sas + rr * sar  # [CP]
        t = tl.zeros((BM, CP), dtype=tl.float32)

    if NESTED:
        noff = tl.load(noff_ptr)
    else:
        noff = 0.0
    if FMT == 4:
        code16 = tl.load(code_ptr + tl.arange(0, 16))

    for k0 in range(k_lo, k_hi, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < k_hi
        xm = rmask[:, None] & kmask[None, :]
        x = tl.load(x_ptr + rows64[:, None] * sxm + ks[None, :] * sxk, mask=xm, other=0.0)
        if HAS_INS:
            s_in = tl.load(ins_ptr + rows64[:, None] * sim + ks[None, :] * sik, mask=xm, other=0.0)
            x = _rnd(x.to(tl.float32) * s_in.to(tl.float32), XD, INTERP)
        wm = nmask[:, None] & kmask[None, :]
        # ---- dequantize the weight tile [BN, BK] (k contiguous) ----
        if FMT == 4:
            if EVEN_K:
                # rows start on a byte: load each byte once, split its two nibbles
                kb = k0 // 2 + tl.arange(0, BK // 2)
                bm = nmask[:, None] & (kb[None, :] * 2 < k_hi)
                byte = tl.load(w_ptr + cols64[:, None] * (K // 2) + kb[None, :], mask=bm, other=0)
                hi = (byte >> 4) & 0xF
                lo = byte & 0xF
                nib = tl.interleave(hi, lo).to(tl.int32)
            else:
                e = cols64[:, None] * K + ks[None, :]
                byte = tl.load(w_ptr + (e >> 1), mask=wm, other=0)
                shift = ((1 - (e & 1)) * 4).to(tl.uint8)
                nib = ((byte >> shift) & 0xF).to(tl.int32)
            # 16-entry LUT held in registers (a global gather here would be software-pipelined
            # through shared memory: ~200 KB at 3 stages, measured by compiling for sm_90)
            vals = tl.gather(tl.broadcast_to(code16[None, :], (BN, 16)), nib, 1)
            if ALIGNED:
                # blocks never straddle rows (K % BLOCKSIZE == 0): one scale per (row, block)
                if BK >= BLOCKSIZE:
                    NBT: tl.constexpr = BK // BLOCKSIZE
                    jb = tl.arange(0, NBT)
                    blk = (cols64[:, None] * K + k0) // BLOCKSIZE + jb[None, :]
                    bmask_ = nmask[:, None] & ((k0 + jb * BLOCKSIZE) < k_hi)[None, :]
                    am = _absmax_at(absmax_ptr, nabsmax_ptr, ncode_ptr, noff, blk, bmask_, NBLOCKSIZE, NESTED)
                    wf = (tl.reshape(vals, (BN, NBT, BLOCKSIZE)) * am[:, :, None]).reshape(BN, BK)
                else:
                    blk = (cols64 * K + k0) // BLOCKSIZE
                    am = _absmax_at(absmax_ptr, nabsmax_ptr, ncode_ptr, noff, blk, nmask, NBLOCKSIZE, NESTED)
                    wf = vals * am[:, None]
            else:
                e_idx = cols64[:, None] * K + ks[None, :]
                am = _absmax_at(absmax_ptr, nabsmax_ptr, ncode_ptr, noff, e_idx // BLOCKSIZE, wm, NBLOCKSIZE, NESTED)
                wf = vals * am
            wv = _rnd(wf, CD, INTERP)
        else:
            cb = tl.load(w_ptr + cols64[:, None] * swn + ks[None, :] * swk, mask=wm, other=0)
            rs = tl.load(absmax_ptr + cols64, mask=nmask, other=0.0) * (1.0 / 127.0)
            wv = _rnd(cb.to(tl.float32) * rs[:, None], CD, INTERP)
        acc = _mma(_rnd(x.to(tl.float32), CD, INTERP), tl.trans(wv), acc, CD_FP32, UP_C)
        if HAS_LORA:
            am_ = cvalid[None, :] & kmask[:, None]
            a = tl.load(a_row[None, :] + ks[:, None] * sak, mask=am_, other=0.0)  # [BK, CP]
            t = _mma(_rnd(x.to(tl.float32), LD, INTERP), a.to(LD), t, LD_FP32, UP_L)

    # ---- epilogue (linear in acc and t, so it may run per K slice) ----
    y = acc
    if HAS_LORA:
        # the scale is rounded to the adapters' dtype, as every backend does (_schema.py)
        sc = _rnd(tl.load(scale_ptr + cslot64, mask=cvalid, other=0.0).to(tl.float32), LD, INTERP).to(tl.float32)
        if MIXED:
            cnt = tl.zeros((BM, CP), dtype=tl.float32)
            for j in tl.static_range(J):
                sj = tl.load(slots_ptr + rows64 * stm + j * stj, mask=rmask, other=-1)
                cnt += (sj[:, None] == cslot[None, :]).to(tl.float32)
            coef = cnt * sc[None, :]
        else:
            coef = tl.zeros((BM, CP), dtype=tl.float32) + sc[None, :]
        bmask = cvalid[:, None] & nmask[None, :]
        bt = tl.load(b_ptr + cslot64[:, None] * sbs + rr[:, None] * sbr + cols64[None, :] * sbn,
                     mask=bmask, other=0.0).to(tl.float32)
        if HAS_DORA:
            g = tl.load(dora_ptr + cslot64[:, None] * sds + cols64[None, :] * sdn, mask=bmask, other=0.0).to(tl.float32)
            bt = bt * g
            gsum = tl.zeros((BM, BN), dtype=tl.float32)
            for j in tl.static_range(J):
                if MIXED:
                    sj = tl.load(slots_ptr + rows64 * stm + j * stj, mask=rmask, other=-1)
                else:
                    sj = tl.load(slots_ptr + j * stj + rows64 * 0)
                gv = tl.load(dora_ptr + tl.where(sj >= 0, sj, 0)[:, None] * sds + cols64[None, :] * sdn,
                             mask=(sj >= 0)[:, None] & nmask[None, :], other=1.0).to(tl.float32)
                gsum += gv - 1.0
            y = y * (1.0 + gsum)
        y = tl.dot(t * coef, bt, y, input_precision="ieee")
    if HAS_BIAS:
        bias = _rnd(tl.load(bias_ptr + cols64, mask=nmask, other=0.0).to(tl.float32), CD, INTERP).to(tl.float32)
        if SPLIT_K > 1:
            bias = tl.where(pid_k == 0, bias, 0.0)
        y = y + bias[None, :]
    if HAS_OUTS:
        s_out = tl.load(outs_ptr + rows64[:, None] * som + cols64[None, :] * son,
                        mask=rmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)
        y = y * s_out
    optr = y_ptr + rows64[:, None] * sym + cols64[None, :] * syn
    omask = rmask[:, None] & nmask[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(optr, y, mask=omask)
    else:
        tl.store(optr, _rnd(y, y_ptr.dtype.element_ty, INTERP), mask=omask)


@triton.jit
def _dequant_4bit_kernel(
    w_ptr, absmax_ptr, code_ptr, nabsmax_ptr, ncode_ptr, noff_ptr, out_ptr,
    numel, BLOCKSIZE, NBLOCKSIZE,
    NESTED: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr,
):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < numel
    byte = tl.load(w_ptr + (e >> 1), mask=mask, other=0)
    shift = ((1 - (e & 1)) * 4).to(tl.uint8)
    nib = ((byte >> shift) & 0xF).to(tl.int32)
    if NESTED:
        noff = tl.load(noff_ptr)
    else:
        noff = 0.0
    am = _absmax_at(absmax_ptr, nabsmax_ptr, ncode_ptr, noff, e // BLOCKSIZE, mask, NBLOCKSIZE, NESTED)
    v = tl.load(code_ptr + nib, mask=mask, other=0.0) * am
    tl.store(out_ptr + e, _rnd(v, out_ptr.dtype.element_ty, INTERP), mask=mask)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------


def _tiles(M: int, L) -> tuple:
    """(BM, BN, BK, num_warps, num_stages) for M rows (DECODE_TILE / PREFILL_TILE, or FORCE_TILE)."""
    if FORCE_TILE is not None:
        return tuple(FORCE_TILE)
    return L.DECODE_TILE if M <= L.DECODE_MAX_ROWS else L.PREFILL_TILE


def _split_k(M: int, N: int, K: int, bm: int, bn: int, bk: int, device, L) -> int:
    if FORCE_SPLIT_K is not None:
        return max(1, int(FORCE_SPLIT_K))
    if INTERPRET or device.type != "cuda":
        return 1
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    want = triton.cdiv(_num_sms(device) * L.TARGET_PROGRAMS_PER_SM, tiles)
    most = max(1, K // L.MIN_K_PER_SPLIT)
    return int(max(1, min(want, most, L.MAX_SPLIT_K)))


def dequantize_4bit_triton(qweight, absmax, code, nested_absmax, nested_code, nested_offset,
                           out_features: int, in_features: int, blocksize: int, nested_blocksize: int,
                           dtype: torch.dtype) -> Tensor:
    """The 4-bit weight as a dense ``[N, K]`` tensor of ``dtype`` (one kernel launch)."""
    numel = out_features * in_features
    out = torch.empty(out_features, in_features, dtype=dtype, device=qweight.device)
    w = qweight.reshape(-1)
    if w.dtype != torch.uint8:
        w = w.view(torch.uint8)
    nested = nested_absmax is not None
    BLOCK = 1024
    grid = (triton.cdiv(numel, BLOCK),)
    _dequant_4bit_kernel[grid](
        w, absmax, code, nested_absmax if nested else absmax, nested_code if nested else code,
        nested_offset if nested else absmax, out, numel, blocksize, nested_blocksize,
        NESTED=nested, BLOCK=BLOCK, INTERP=INTERPRET,
    )
    return out


def _span(t: Tensor) -> int:
    """Largest element offset a kernel computes for ``t`` (plus one)."""
    return sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True) if n > 0) + 1


def quant_linear(
    fmt: int,
    x: Tensor,
    qweight: Tensor,
    absmax: Tensor,
    code: Tensor | None,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    nested_offset: Tensor | None,
    N: int,
    blocksize: int,
    nested_blocksize: int,
    cd: torch.dtype,
    bias: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    slot_scales: Tensor | None,
    token_slots: Tensor | None,
    dora_scale: Tensor | None,
    input_scale: Tensor | None,
    output_scale: Tensor | None,
    base_only: bool = False,
) -> Tensor:
    """Launch ``_quant_linear_kernel``. ``fmt`` 4: qweight is bnb 4-bit bytes, ``absmax`` the
    (possibly nested) block scales; ``fmt`` 8: qweight is int8 [N, K], ``absmax`` the row scales.
    ``base_only``: ignore the adapters and the output scale (the caller adds them)."""
    M, K = x.shape
    dev = x.device
    has_lora = (not base_only and lora_a is not None and token_slots is not None and token_slots.numel() > 0)
    mixed = has_lora and token_slots.shape[0] != 1
    J = token_slots.shape[1] if has_lora else 1
    R = lora_a.shape[1] if has_lora else 1
    S = lora_a.shape[0] if has_lora else 1
    C = (S * R if mixed else J * R) if has_lora else 1
    CP = max(16, _pow2(C))
    has_dora = has_lora and dora_scale is not None
    has_outs = (not base_only) and output_scale is not None
    L = _rules(x.device)
    bm, bn, bk, warps, stages = _tiles(M, L)
    split = _split_k(M, N, K, bm, bn, bk, dev, L)
    xdt = x.dtype
    out_dtype = torch.float32 if split > 1 else xdt
    y = (torch.zeros if split > 1 else torch.empty)(M, N, dtype=out_dtype, device=dev)
    if fmt == 4:
        w = qweight.reshape(-1)
        if w.dtype != torch.uint8:
            w = w.view(torch.uint8)
        swn = swk = 0
    else:
        w = qweight
        swn, swk = qweight.stride(0), qweight.stride(1)
    nested = fmt == 4 and nested_absmax is not None
    # one absmax per (row, block): needs blocks that never straddle rows
    aligned = fmt == 4 and K % blocksize == 0 and blocksize >= 16
    dummy = absmax
    spans = [N * K + K, _span(y)] + [_span(t) for t in (x, w, lora_a, lora_b, dora_scale, input_scale, output_scale,
                                                        token_slots) if t is not None]
    idx64 = max(spans) >= (1 << 31) - 1
    sim, sik = _strides2(input_scale, M)
    som, son = _strides2(output_scale if has_outs else None, M)
    ld = lora_a.dtype if has_lora else cd
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), split)
    _quant_linear_kernel[grid](
        x, x.stride(0), x.stride(1),
        w, swn, swk,
        absmax, code if code is not None else dummy,
        nested_absmax if nested else dummy, nested_code if nested else dummy, nested_offset if nested else dummy,
        bias if bias is not None else dummy,
        lora_a if has_lora else dummy, *(lora_a.stride() if has_lora else (0, 0, 0)),
        lora_b if has_lora else dummy, *(lora_b.stride() if has_lora else (0, 0, 0)),
        slot_scales if has_lora else dummy,
        token_slots if has_lora else dummy, *((token_slots.stride(0), token_slots.stride(1)) if has_lora else (0, 0)),
        dora_scale if has_dora else dummy, *(dora_scale.stride() if has_dora else (0, 0)),
        input_scale if input_scale is not None else dummy, sim, sik,
        output_scale if has_outs else dummy, som, son,
        y, y.stride(0), y.stride(1),
        M, N, K, R, C,
        BLOCKSIZE=blocksize, NBLOCKSIZE=nested_blocksize,
        FMT=fmt, NESTED=nested, EVEN_K=(fmt == 4 and K % 2 == 0), ALIGNED=aligned,
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, MIXED=mixed, J=J,
        HAS_DORA=has_dora, HAS_INS=input_scale is not None, HAS_OUTS=has_outs,
        CD=_TL[cd], LD=_TL[ld],
        SPLIT_K=split, BM=bm, BN=bn, BK=bk, CP=CP, INTERP=INTERPRET, IDX64=idx64,
        num_warps=warps, num_stages=stages if (fmt == 8 or aligned) else 1,
    )
    return y.to(xdt) if split > 1 else y


def plan_path(M: int, C_padded: int, device: torch.device | None = None) -> str:
    """"fused" (one kernel), "base_fused" (kernel for the base, adapters added after) or "dequant".

    ``device``: whose tuning file applies (None: this module's constants alone)."""
    if FORCE_PATH is not None:
        return FORCE_PATH
    L = _rules(device)
    if M >= L.PREFILL_MIN_ROWS:
        return "dequant"
    if C_padded > (L.MAX_FUSED_COLS_DECODE if M <= L.DECODE_MAX_ROWS else L.MAX_FUSED_COLS):
        return "base_fused"
    return "fused"
