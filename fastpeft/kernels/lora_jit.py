"""The Triton code of ``adapter_linear``: device helpers and the three kernels.

``lora_linear`` (the host module) launches them with the plans of ``lora_plan``; the semantics
and the role of each kernel are in ``lora_linear``'s docstring, the tiling in docs/kernels.md.
Tensors as in the operator (``fastpeft/ops/_schema.py``): ``a_ptr`` is lora_a ``[S, R, K]``,
``b_ptr`` is lora_b, B transposed, ``[S, R, N]``; ``xa`` is the shrink ``xs @ A[slot].T`` of a
row, laid out on the concatenated rank axis ``J * RP`` (column ``c``: rank row ``c % RP`` of
the row's adapter ``c // RP``).
"""
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# SHRINK modes: how a program of _fused_linear_kernel / _lora_add_kernel gets xa for its rows.
# The planner (lora_plan) picks one per plan and passes it as the SHRINK constexpr; the kernels
# compare against the tl.constexpr copies below (Triton code reads only constexpr globals).
# ---------------------------------------------------------------------------------------------

#: no adapter applies: the base (and IA3) only
SHRINK_NONE = 0
#: every row uses the same slots (token_slots [1, J]): the A tile is gathered per column and
#: multiplied with the x tile the base already loaded (the fused kernel: inside its K loop)
SHRINK_SHARED_SLOTS = 1
#: a slot per row (mixed batch): one pass over the x rows per distinct slot of the tile
#: (the fused kernel: after the base's K loop, so the weight loads still pipeline)
SHRINK_PER_ROW_SLOTS = 2
#: xa was computed by _lora_shrink_kernel before (the "preshrunk" path, and the split path's
#: shrink-first form): the kernel only sums its K slices and expands
SHRINK_PRESHRUNK = 3

_NONE = tl.constexpr(SHRINK_NONE)
_SHARED_SLOTS = tl.constexpr(SHRINK_SHARED_SLOTS)
_PER_ROW_SLOTS = tl.constexpr(SHRINK_PER_ROW_SLOTS)
_PRESHRUNK = tl.constexpr(SHRINK_PRESHRUNK)

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
    """One [BM, BN] tile of y over one K slice; SHRINK is one of the SHRINK_* modes above
    (SHRINK_PRESHRUNK: xa from _lora_shrink_kernel, summed over its XA_SPLITS K slices)."""
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
    if SHRINK == _SHARED_SLOTS:
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
        if SHRINK == _SHARED_SLOTS:
            # slot -1 (adapter off for the batch): loads masked off, the dot adds zeros
            a = tl.load(
                a_ptr + slot_c64[None, :] * sas + rcol[None, :] * sar + kk[:, None] * sak,
                mask=kmask[:, None] & cvalid[None, :],
                other=0.0,
            )
            xa = _mm(x.to(a_ptr.dtype.element_ty), a, xa, PREC_L, UPCAST_L)

    out = acc
    if SHRINK == _SHARED_SLOTS:
        sc = tl.load(scale_ptr + slot_c64, mask=cvalid, other=0.0).to(tl.float32)
        out = _expand_bcast(
            out, acc, xa * sc[None, :], slot_c64, cvalid, b_ptr, dora_ptr, ts_ptr, ncols64, nmask, jcol, rcol,
            sbs, sbr, sbn, sds, sdn, stj, DORA, J, PREC_L, UPCAST_L,
        )
    elif SHRINK == _PER_ROW_SLOTS or SHRINK == _PRESHRUNK:
        sl = tl.load(ts_ptr + rows64[:, None] * stm + jcol[None, :] * stj, mask=rmask[:, None] & cmask[None, :], other=-1)
        xa = tl.zeros((BM, JRP), dtype=tl.float32)
        if SHRINK == _PER_ROW_SLOTS:
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
        if SHRINK == _PRESHRUNK and not DORA:
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

    The shrink of the "preshrunk" path: computed once per row tile, so every adapter's A is read
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
    per program over all of K, then the expand loops over the program's N slice. SHRINK is one
    of the SHRINK_* modes above (SHRINK_NONE: the IA3 output scale only; SHRINK_PRESHRUNK: xa
    from _lora_shrink_kernel, summed over its XA_SPLITS K slices).
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
    if SHRINK == _SHARED_SLOTS:
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
    elif SHRINK == _PER_ROW_SLOTS:
        sl = tl.load(ts_ptr + rows64[:, None] * stm + jcol[None, :] * stj, mask=rmask[:, None] & cmask[None, :], other=-1)
        live = tl.max(sl) >= 0
        xa = _shrink_mixed(
            tl.zeros((BM, JRP), dtype=tl.float32), sl, xs_ptr, xs_ptr, xs_ptr, a_ptr, rows64, rmask, 0, K,
            sxm, sxk, 0, 0, sas, sar, sak, rcol, cmask, False, BK, PREC_L, UPCAST_L,
        )
        sc = tl.load(scale_ptr + tl.maximum(sl, 0), mask=sl >= 0, other=0.0).to(tl.float32)
        xa_s = xa * sc
    elif SHRINK == _PRESHRUNK:
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
            if SHRINK != _NONE:
                base = out
                if DORA:
                    base = tl.load(
                        base_ptr + rows64[:, None] * sbam + ncols64[None, :] * sban, mask=m2, other=0.0
                    ).to(tl.float32)
                    if HAS_BIAS:
                        base -= tl.load(bias_ptr + ncols64, mask=nmask, other=0.0).to(tl.float32)[None, :]
                if SHRINK == _SHARED_SLOTS:
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
