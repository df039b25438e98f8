"""One layer's adapter storage for the fused operators: the stacks, their slots and caches.

An :class:`AdapterBank` is the one thing a kernel-facing call of a LoRA layer reads. It holds

* the stacks ``a [P, c, K]``, ``bt [P, c, N]`` (B *transposed*: ``bt[p] = B_p.T``) and
  ``scales [P]`` float32, one entry per page (an adapter of rank ``r`` takes ``ceil(r / c)``
  consecutive pages, :mod:`fastpeft.nn.paging`; unpaged: one page per adapter, ``c`` = the
  largest rank, rows past an adapter's rank are zero);
* what the stacks were built from, to tell when they are stale: the storage pointers of the
  parameters that are *views* of the stacks (``aliased``), the pointers and versions of those
  the stacks hold a *copy* of (``copies``: another dtype or device, or a derived product such
  as AdaLoRA's ``A * E``), and the scaling values (``scale_src``);
* the slot tensors and ``token_slots`` (:class:`~fastpeft.nn.slots.SlotTable`, its base), the
  DoRA scale cache and the eager fast-path plans.

The layer describes its adapters with :class:`Entry` rows and keeps PEFT's parameters; the bank
never reads PEFT's parameter containers (a bank policy's refresh reads the layer's
selection). A bank subclass can change where adapters live: see
:mod:`fastpeft.nn.bank_offload` (an LRU of device slots over adapters kept in CPU memory).

:class:`ScaleBank` is the same idea for IA3: one stack ``[S + 1, D]`` of scale vectors.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..ops import fastpath as _fastpath
from . import paging
from .slots import SlotTable, mark_dynamic


class Entry(NamedTuple):
    """One adapter as the layer gives it to :meth:`AdapterBank.pack`.

    ``a`` [r, K]: the effective A; ``b`` [N, r]: the effective B (the stacks hold ``b.T``);
    ``scale``: the factor of its delta; ``watched``: the parameters ``a`` and ``b`` come from;
    ``alias``: ``watched`` is ``(A, B)`` and may become views of the stacks' rows (``A.data``
    = rows of ``a``, ``B.data`` = rows of ``bt`` transposed), so adapter memory is held once
    and in-place updates are seen without repacking. False for a derived copy."""

    a: Tensor
    b: Tensor
    scale: float
    watched: tuple
    alias: bool = True


def _ptrs(ts) -> tuple:
    return tuple(t.data_ptr() for t in ts)


def _ptrs_versions(ts) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in ts)


class AdapterBank(SlotTable):
    """The stacks of one LoRA layer (linear or embedding), with slots, staleness and caches."""

    def __init__(self) -> None:
        super().__init__()
        self.a: Tensor | None = None
        self.bt: Tensor | None = None
        self.scales: Tensor | None = None
        self.starts: list[int] = []  # first page of each slot, then the page count
        self.aliased: dict = {}  # name -> storage pointers of its parameters (views of the stacks)
        self.copies: dict = {}  # name -> (pointer, version) of the tensors the stacks copied
        self.scale_src: dict = {}  # name -> the scaling value the stacks' scales were made from
        self.dora: tuple | None = None  # (key, [S, N] DoRA scale), see fastpeft.nn.dora.dora_scale
        self._slot0: Tensor | None = None  # [[0]]: the slots of a one-adapter view

    @property
    def packed(self) -> bool:
        return self.a is not None

    @property
    def ready(self) -> bool:
        """Stacks exist and are current as far as state changes tell (no pointer checks)."""
        return not self.stale and self.a is not None

    def nbytes(self) -> int:
        return 0 if self.a is None else self.a.nbytes + self.bt.nbytes

    def holds_stacks(self) -> bool:
        return self.a is not None

    def drop_stacks(self) -> None:
        self.a = self.bt = self.scales = None
        self.aliased, self.copies, self.scale_src, self.starts, self.dora = {}, {}, {}, [], None
        self.mark_stale()
        self.set_page_table(None)

    # ----- building -------------------------------------------------------------------------
    def pack(self, entries: list, scale_src: dict, paged: bool = True) -> None:
        """Rebuild the stacks from ``entries`` (one :class:`Entry` per slot, in slot order).
        ``paged``: rank pages when the ranks differ much (DoRA's per-slot output scale does not
        distribute over pages: DoRA layers pass False). Call outside inference mode (the
        parameters become views of the stacks; see ``packs_outside_inference_mode``)."""
        names = self.names
        dtype = entries[0].a.dtype
        for e in entries:
            dtype = torch.promote_types(torch.promote_types(dtype, e.a.dtype), e.b.dtype)
        device = entries[0].a.device
        K, N = entries[0].a.shape[1], entries[0].b.shape[0]
        ranks = [e.a.shape[0] for e in entries]
        c = paging.choose_page_rows(ranks) if paged else max(ranks)
        starts = paging.page_starts(ranks, c)
        pages = starts[-1]
        a = torch.zeros(pages, c, K, dtype=dtype, device=device)
        bt = torch.zeros(pages, c, N, dtype=dtype, device=device)
        flat_a, flat_bt = a.view(pages * c, K), bt.view(pages * c, N)  # an adapter's pages are consecutive rows
        aliased, copies = {}, {}
        with torch.no_grad():
            for s, (n, e) in enumerate(zip(names, entries, strict=True)):
                o, r = starts[s] * c, e.a.shape[0]
                flat_a[o:o + r].copy_(e.a)
                flat_bt[o:o + r].copy_(e.b.t())
                same = all(t.dtype == dtype and t.device == device for t in (e.a, e.b))
                if e.alias and same:
                    e.watched[0].data = flat_a[o:o + r]
                    e.watched[1].data = flat_bt[o:o + r].t()
                    aliased[n] = _ptrs(e.watched)
                else:  # a copy in the stacks: watch the parameters' versions
                    copies[n] = _ptrs_versions(e.watched)
        scales = torch.tensor([e.scale for s, e in enumerate(entries) for _ in range(starts[s + 1] - starts[s])],
                              dtype=torch.float32, device=device)
        mark_dynamic(a, 0, 1)
        mark_dynamic(bt, 0, 1)
        mark_dynamic(scales, 0)
        self.a, self.bt, self.scales, self.starts = a, bt, scales, starts
        self.aliased, self.copies, self.scale_src = aliased, copies, dict(scale_src)
        self.dora = None
        self.stale = False
        self.set_page_table(None if pages == len(names) else paging.build_page_table(ranks, c, device))
        self.drop_plans()

    def needs_pack(self, names, watched, scaling: dict) -> bool:
        """Whether the stacks must be rebuilt before a call that uses ``names``: marked stale,
        never built, a scaling value changed in place (PEFT's set_scale / scale_layer), a
        parameter that is a view was given new storage, or one that was copied was written.
        ``watched(name)``: that adapter's parameters, as in its :class:`Entry`."""
        if self.stale or self.a is None:
            return True
        src = self.scale_src
        if any(n in src and scaling[n] != src[n] for n in names):
            return True
        for n in names:
            p = self.aliased.get(n)
            if p is not None:
                if p != _ptrs(watched(n)):
                    return True
            elif self.copies.get(n) != _ptrs_versions(watched(n)):
                return True
        return False

    # ----- reading --------------------------------------------------------------------------
    def adapter_view(self, slot: int):
        """One adapter of paged stacks as a one-slot stack of its own: views ``[1, n * c, K]`` /
        ``[1, n * c, N]`` of its ``n`` consecutive pages, its scale ``[1]`` and slots ``[[0]]``.
        One low-rank product instead of one per page (CPU decode, one adapter of rank 16 in
        pages of 4: 45.6 -> 37.8 us a layer, docs/perf-notes.md). Eager CPU forwards only: a
        CUDA graph captured with these views would not follow set_adapter."""
        p0, p1 = self.starts[slot], self.starts[slot + 1]
        a, bt = self.a, self.bt
        rows = (p1 - p0) * a.shape[1]
        one = self._slot0
        if one is None or one.device != a.device:
            one = self._slot0 = torch.zeros(1, 1, dtype=torch.int32, device=a.device)
        return (a[p0:p1].view(1, rows, a.shape[2]), bt[p0:p1].view(1, rows, bt.shape[2]), self.scales[p0:p0 + 1], one)

    def make_plan(self, layer, names, W, stacks, token_slots, dora, dora_inputs=()):
        """The eager fast path's plan (:mod:`fastpeft.ops.fastpath`) for ``layer`` running
        ``names``: the operator's arguments (``stacks`` = (a, bt, scales), ``token_slots``
        None for mixed batches) and the tensors it checks before re-using them."""
        base = layer.base_layer
        # everything a gradient could flow to: the fast path runs only while none is needed
        grad_params = [p for n in names for p in layer._params_of(n)] + [base.weight]
        if base.bias is not None:
            grad_params.append(base.bias)
        ptr_ts = [base.weight] + ([base.bias] if base.bias is not None else [])
        ver_ts = list(dora_inputs)  # the DoRA scale depends on W, the adapters and the magnitudes
        for n in names:
            ws = layer._watched(n)
            ptr_ts += ws  # views of the stacks: in-place updates are seen, swaps are not
            if n not in self.aliased:  # copies: any change means repack
                ver_ts += ws
        a, bt, scales = stacks
        return _fastpath.make_plan(grad_params, ptr_ts, ver_ts, layer._identity_checks(names), layer.in_features,
                                   layer.out_features, W, base.bias, a, bt, scales, token_slots, dora)


class ScaleBank(SlotTable):
    """IA3's stack ``[S + 1, D]``: the adapters' scale vectors in slot order, then ones (row S,
    "no adapter"), indexed with the slot tensors by compiled forwards. The ``ia3_l``
    parameters are views of their rows."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: Tensor | None = None
        self.ptrs: dict = {}

    def holds_stacks(self) -> bool:
        return self.stack is not None

    def drop_stacks(self) -> None:
        self.stack, self.ptrs = None, {}
        self.mark_stale()

    def pack(self, params: list, d: int) -> None:
        """Rebuild from ``params`` (one per slot). Parameters of mixed dtypes or devices keep
        no stack (compiled forwards then take the name-based path)."""
        self.stack, self.ptrs = None, {}
        self.stale = False
        self.drop_plans()
        if not params or any(p.dtype != params[0].dtype or p.device != params[0].device for p in params):
            return
        stack = torch.ones(len(params) + 1, d, dtype=params[0].dtype, device=params[0].device)
        with torch.no_grad():
            for s, p in enumerate(params):
                stack[s].copy_(p.flatten())
                p.data = stack[s].view(p.shape)
        mark_dynamic(stack, 0)  # adding/deleting adapters keeps the graph
        self.stack = stack
        self.ptrs = {n: p.data_ptr() for n, p in zip(self.names, params, strict=True)}

    def needs_pack(self, used, params) -> bool:
        """Stack missing, or a parameter this forward uses replaced since it was made (eager
        check of storage pointers; a compiled forward cannot make it)."""
        if self.stale:
            return bool(self.names)
        return any(n in self.ptrs and self.ptrs[n] != params[n].data_ptr() for n in used)
