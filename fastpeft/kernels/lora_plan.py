"""The planner of ``adapter_linear``: which path and which tiles for a call's shapes.

One :class:`Plan` per shape, dtype and option set, cached in ``_plans`` (``lora_linear`` looks it
up per call). The constants below are the rules (docs/kernels.md gives the reason for each);
a per-device tuning file overrides them (``tuning.py``). ``override()`` forces a path, a split-K
factor or a tile (tests, benchmarks, ``bench/bench_linear.py --tune``).
"""
from __future__ import annotations

import contextlib
import warnings
from types import SimpleNamespace
from typing import NamedTuple

import torch
import triton

from . import tuning
from ._common import ASSUMED_SMS  # noqa: F401  (part of the planner's rules as tests read them)
from ._common import num_sms as _num_sms
from ._common import pow2 as _pow2
from ._interpret import INTERPRET
from .lora_jit import SHRINK_NONE, SHRINK_PER_ROW_SLOTS, SHRINK_PRESHRUNK, SHRINK_SHARED_SLOTS

# ---------------------------------------------------------------------------------------------
# Dispatch thresholds. PROVISIONAL: chosen by reasoning about an H100 (SXM, 132 SMs, 3.35 TB/s,
# ~990 dense bf16 TFLOP/s); nothing here has been measured on a GPU yet. Each names the sweep of
# bench/bench_linear.py that must set it (docs/perf-notes.md, "to measure").
# ---------------------------------------------------------------------------------------------

# Rows up to this use the decode tiling (BM = 16, split-K). tl.dot needs M >= 16, so 16 rows
# cost the same tensor-core work as 1; above it the GEMM tiling takes over.
# To measure: tokens 1..64 at 4096x4096, decode vs fused tiling.
DECODE_MAX_ROWS = 16

# Rows up to this run the fused kernel ("decode", "fused" or "preshrunk"); above it cuBLAS
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
# "preshrunk" path computes xa once per row tile first (_lora_shrink_kernel, a second launch) and
# the fused kernel only expands. 0.5: half the weight's bytes again from L2 (about 2x HBM
# bandwidth on H100) costs about a quarter of the base time, about one extra launch for a
# 4096x4096 decode. To measure: tokens 1..256, ranks 16..128, 1..64 distinct adapters,
# "decode"/"fused" vs "preshrunk".
MAX_AREREAD_FRACTION = 0.5
# A mixed batch with more possible distinct adapters than this, min(S, M*J), always takes the
# "preshrunk" path: the one-launch kernel re-reads x once per distinct adapter in every tile.
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
# Plans (cached per shape; lora_linear looks them up and launches)
# ---------------------------------------------------------------------------------------------

#: the paths of a plan: "decode" / "fused" (one launch of the fused kernel, decode or GEMM
#: tiling, the shrink inside it), "preshrunk" (_lora_shrink_kernel computes xa = xs @ A[slot].T
#: per row tile first, then the fused kernel takes that pre-computed product), "split" (cuBLAS
#: base, then _lora_add_kernel adds the adapters)
PATHS = ("decode", "fused", "preshrunk", "split")
#: where the split path's shrink runs: "inside" _lora_add_kernel, or "preshrunk" (the shrink kernel first)
SPLIT_SHRINKS = ("inside", "preshrunk")

_overrides: dict = {"path": None, "split_k": None, "split_shrink": None, "tile": None}


def _current_name(value: str | None, what: str) -> str | None:
    """A path name as it is called now: an old one (``tuning.RENAMED_VALUES``: "given") maps to
    its new name with a DeprecationWarning."""
    new = tuning.RENAMED_VALUES.get(value) if isinstance(value, str) else None
    if new is None:
        return value
    warnings.warn(f"fastpeft: {what} {value!r} is now called {new!r}", DeprecationWarning, stacklevel=4)
    return new


@contextlib.contextmanager
def override(path: str | None = None, split_k: int | None = None, split_shrink: str | None = None,
             tile: tuple | None = None):
    """Force a path and/or a split-K factor (tests, benchmarks); plans made inside are dropped after.

    path: one of :data:`PATHS`. split_shrink (split path only): one of :data:`SPLIT_SHRINKS`.
    tile (fused kernel): (BM, BN, BK, num_warps, num_stages) before the shared-memory and shape
    clamps (``bench/bench_linear.py --tune`` sweeps it). The old name "given" of "preshrunk" is
    still accepted, with a DeprecationWarning.
    """
    path = _current_name(path, "path")
    split_shrink = _current_name(split_shrink, "split_shrink")
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    if split_shrink is not None and split_shrink not in SPLIT_SHRINKS:
        raise ValueError(f"unknown split_shrink {split_shrink!r}; expected one of {SPLIT_SHRINKS}")
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
    xa_splits: int  # shrink kernel first ("preshrunk", split shrink "preshrunk"): its K slices (0: none)
    xa_k_per_split: int
    xa_bk: int
    xa_bm: int  # rows per program of the shrink kernel
    n_per_prog: int  # "split": N columns per program of _lora_add_kernel
    j_chunk: int  # "split": adapters per _lora_add_kernel launch


_plans: dict = {}
_plans_generation = [0]  # tuning.generation the cached plans were made under
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
    forced_split_shrink = _overrides.get("split_shrink")

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
    if path == "preshrunk" and not has_lora:
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
        preshrunk = has_lora and J <= j_chunk and (
            forced_split_shrink == "preshrunk"
            or (forced_split_shrink is None and (nsplit - 1) * xs_bytes > L.MAX_XREREAD_FRACTION * N * K * esize)
        )
        xa_splits = xa_k = xa_bk = xa_bm = 0
        if preshrunk:
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
            path = "preshrunk"

    sk = _overrides["split_k"]
    if sk is None:
        sk = _split_k(tiles, K, M, N, BK, sms, N * K * esize, L)
    sk = max(1, min(int(sk), triton.cdiv(K, BK)))
    k_per = max(BK, triton.cdiv(triton.cdiv(K, sk), BK) * BK)
    sk = max(1, triton.cdiv(K, k_per))

    if not has_lora:
        shrink = SHRINK_NONE
    elif path == "preshrunk":
        shrink = SHRINK_PRESHRUNK
    else:
        shrink = SHRINK_SHARED_SLOTS if bcast else SHRINK_PER_ROW_SLOTS

    xa_splits = xa_k = xa_bk = xa_bm = 0
    if shrink == SHRINK_PRESHRUNK:
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
