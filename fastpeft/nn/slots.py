"""Which stack slot each row of a call uses: the slot tensors every adapter layer hands its operator.

Each adapter of a layer occupies a *slot*: its index in the layer's stacked tensors, which is
what the fused operators index. A :class:`SlotTable` (the base of every layer's bank, see
:mod:`fastpeft.nn.bank`) keeps the tensors a forward reads, current after every state change
(``set_adapter``, a mixed batch, add, delete, move), so that a forward only reads them: under
``torch.compile`` they are graph inputs, and switching between loaded adapters re-uses the
compiled graph. Per call the operator gets ``token_slots`` [M or 1, J] (J adapters per row,
-1 = none):

* the active adapters: one row ``[[slot_a, slot_b, ...]]`` that broadcasts to every row;
* a mixed batch: one slot per row, repeated over the sequence positions of each batch row
  (and over the ``k`` consecutive rows generation makes of each with beams).

With rank pages (:mod:`fastpeft.nn.paging`) the slots are translated to pages here.

The table also holds the caches derived from the slots and stacks: ``stale`` (the stacks must
be rebuilt before the next fused forward) and the eager fast-path plans (``plan`` for the
active adapters, ``mixed_plans`` per mixed-batch names tuple), dropped by every state change.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import paging

# Bounds of the per-shape caches (a new entry past them clears the cache): a serving loop sees
# a handful of batch shapes and names tuples; the bounds only stop unbounded growth.
MAX_CACHED_SHAPES = 64
MAX_CACHED_NAMES = 64


def mark_dynamic(t: Tensor, *dims: int) -> None:
    """Tell torch.compile that these sizes of ``t`` vary (slot and page counts, padded rank and
    page columns change when adapters are added or deleted): compiled graphs take them as
    symbolic sizes instead of recompiling for each new size."""
    import torch._dynamo

    for d in dims:
        torch._dynamo.maybe_mark_dynamic(t, d)


def rows_per_name(n: int, batch: int, owner: str = "layer", repeat: bool = True) -> int:
    """Batch rows per mixed-batch name: 1, or k when generation repeated each row k times
    (beam search, ``num_return_sequences``: Transformers repeats rows consecutively) and
    ``repeat`` allows it (a forward's own ``adapter_names`` must name every row)."""
    if n == batch:
        return 1
    if n == 0 or batch % n or not repeat:
        raise ValueError(
            f"mixed batch: got {n} adapter names for a batch of {batch} rows in {owner}; pass one name per batch row"
        )
    return batch // n


def _update(old: Tensor | None, new: Tensor) -> Tensor:
    """``new``, written into ``old`` when the shape allows (a captured CUDA graph reads the same
    memory), else ``new`` itself."""
    if old is not None and old.shape == new.shape and old.device == new.device and not old.is_inference():
        old.copy_(new)
        return old
    return new


class SlotTable:
    """Slot order, slot tensors and the caches derived from them, for one adapter layer.

    ``names``: the layer's adapters in slot order (``slot_of(name)`` is the index; a bank
    that keeps only some adapters on the device overrides it). ``active`` [1, J] int32: the
    active adapters' slots; ``rows`` [len(names)] int32 while in a mixed batch (else None);
    ``page_table`` / ``active_pages``: the slot -> pages map of paged stacks and the active
    slots as pages (None while unpaged or stale).
    """

    call_lock = None  # a bank whose slots a call can lose to another (offloading) holds calls one at a time

    def __init__(self) -> None:
        self.names: list[str] = []  # the layer's adapters in slot order (not a mixed batch's names)
        self.owner = "layer"  # the layer's class name, for error messages
        self.stale = True
        self.active: Tensor | None = None
        self.rows: Tensor | None = None
        self.page_table: Tensor | None = None
        self.active_pages: Tensor | None = None
        self.plan = None  # eager fast-path plan for the active adapters (fastpeft.ops.fastpath)
        self.mixed_plans: dict = {}  # the same per mixed-batch names tuple
        self._row_bufs: dict = {}  # number of names -> the memory `rows` lives in (stable for CUDA graphs)
        self._row_buf_names: dict = {}  # number of names -> the names whose slots it holds
        self._row_cache: dict = {}  # names tuple -> row slots
        self._derived: dict = {}  # (number of names, rows, batch) -> token slots derived from `rows`
        self._derived_for: dict = {}  # (names, rows, batch) -> token slots of a per-call selection

    def __getstate__(self):
        # copies and pickles start without plans (the C++ plans can be neither, and a plan is
        # only a cache: the first forward builds it again)
        state = self.__dict__.copy()
        state["plan"], state["mixed_plans"] = None, {}
        return state

    # ----- caches ---------------------------------------------------------------------------
    def drop_plans(self) -> None:
        self.plan, self.mixed_plans = None, {}

    def mark_stale(self) -> None:
        """The stacks must be rebuilt before the next fused forward (plans go with them)."""
        self.stale = True
        self.drop_plans()

    # ----- hooks of bank policies (see bank_offload.py) -------------------------------------
    def prepare_call(self, layer, sel) -> None:
        """An eager call of ``layer`` is about to run the mixed batch ``sel``."""

    def forget(self, name: str) -> None:
        """``name`` was deleted from the layer."""

    def after_move(self, layer) -> None:
        """``layer`` was moved or cast (``.to()``, ``.half()``): its storage changed."""

    def holds_stacks(self) -> bool:
        """Whether the bank holds stacks (device memory) right now."""
        return False

    def drop_stacks(self) -> None:
        """Free the stacks (the layer has no adapter left)."""

    def slot_of(self, name) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            return -1

    # ----- state changes --------------------------------------------------------------------
    def refresh(self, layer) -> None:
        """Recompute the slot tensors from ``layer``'s active adapters and mixed-batch names
        (cheap; no packing). One column per active name (-1 where this layer does not hold it;
        [[-1]] when none is active): the shape depends only on how many adapters are active,
        so compiled graphs and CUDA graphs survive set_adapter between sets of the same size."""
        device = layer._slot_device()
        slots = [self.slot_of(a) for a in layer._active] or [-1]
        self.active = _update(self.active, torch.tensor([slots], dtype=torch.int32, device=device))
        self._row_cache.clear()
        self._derived_for.clear()
        self._row_buf_names = {}
        if self._row_bufs and next(iter(self._row_bufs.values())).device != device:
            self._row_bufs, self._derived = {}, {}  # moved: new buffers on the new device
        self.drop_plans()
        self._set_rows(layer._mixed_names, device)  # slot order may have changed
        self.sync_active_pages()

    def select_rows(self, layer, names: tuple | None) -> None:
        """``layer`` entered (``names``, also its ``_mixed_names`` by now) or left (None) a mixed batch."""
        self._set_rows(names, layer._slot_device())

    def _set_rows(self, names: tuple | None, device) -> None:
        # entering / leaving a mixed batch only swaps the row-slot tensor (cached per names);
        # the plans stay (one for the active adapters, one per mixed names tuple)
        if names is None:
            self.rows = None  # the buffers and the row caches stay for the next batch
            return
        n = len(names)
        buf = self._row_bufs.get(n)  # one stable buffer per number of names (CUDA graphs)
        if buf is not None and names == self._row_buf_names.get(n):
            self.rows = buf  # the same names again (PEFT passes them on every forward)
            return
        rs = self.rows_for(names, device)
        if buf is not None and buf.device == rs.device and not buf.is_inference():
            buf.copy_(rs)
            # the per-shape slots derived from this buffer are refreshed in place too: a CUDA
            # graph captured in an earlier mixed batch of this size reads them
            for key, ts in list(self._derived.items()):
                if key[0] == n:
                    try:
                        ts.copy_(self.derive(buf, key[1], key[2]))
                    except (ValueError, RuntimeError):
                        del self._derived[key]
        else:
            buf = self._row_bufs[n] = rs.clone()
            for key in [k for k in self._derived if k[0] == n]:
                del self._derived[key]
        self.rows = buf
        self._row_buf_names[n] = names

    def rows_for(self, names: tuple, device) -> Tensor:
        """``[len(names)]`` int32: the slot of each name (-1: none here), cached per names tuple;
        changes nothing of the table's state."""
        rs = self._row_cache.get(names)
        if rs is None or rs.device != torch.device(device):
            rs = torch.tensor([self.slot_of(m) for m in names], dtype=torch.int32, device=device)
            if len(self._row_cache) > MAX_CACHED_NAMES:
                self._row_cache.clear()
            self._row_cache[names] = rs
        return rs

    def set_page_table(self, table: Tensor | None) -> None:
        """Install the slot -> pages map of stacks just packed (None: one page per slot) and
        bring the page tensors derived from the slot tensors up to date."""
        self.page_table = table
        if table is not None:
            mark_dynamic(table, 0, 1)
        self._derived.clear()  # mixed-batch slots derived through the old table
        self._derived_for.clear()
        self.sync_active_pages()

    def sync_active_pages(self) -> None:
        """``active_pages``: the active slots ``[1, J]`` as pages ``[1, J * P_max]`` (None when
        the stacks are unpaged or stale), updated in place when the shape allows."""
        table = None if self.stale else self.page_table
        if table is None or self.active is None:
            self.active_pages = None
            return
        new = paging.slots_to_pages(table, self.active.to(table.device))
        kept = _update(self.active_pages, new)
        if kept is new:
            mark_dynamic(new, 1)
        self.active_pages = kept

    # ----- what a call reads ----------------------------------------------------------------
    def token_slots(self, rows: int, batch: int, sel=None) -> Tensor | None:
        """One eager call's slots: [1, J] (or its pages) for the active adapters when ``sel``
        (a :class:`fastpeft.nn.selection.Selection`) is None, else [rows, 1] (or [rows, P_max])
        for the mixed batch it names. ``batch`` is the size of the input's first dimension;
        ``rows`` the number of rows of x the operator sees. Changes nothing of the table's state
        (the per-call slots are cached per names and shape), so concurrent calls do not meet."""
        if sel is None:
            return self.active if self.active_pages is None else self.active_pages
        key = (sel, rows, batch)
        ts = self._derived_for.get(key)
        if ts is None:
            device = (self.active if self.active is not None else torch.empty(0)).device
            ts = self.derive(self.rows_for(sel.names, device), rows, batch, sel.repeat).contiguous()
            if len(self._derived_for) > MAX_CACHED_SHAPES:
                self._derived_for.clear()
            self._derived_for[key] = ts
        return ts

    def state_token_slots(self, rows: int, batch: int) -> Tensor | None:
        """The slots of the selection recorded on the layer (``set_mixed_names``), for compiled
        forwards and the graphs captured from them: [1, J] for the active adapters, or [rows, 1]
        from the stable per-size row buffers, updated in place by every state change (a captured
        CUDA graph follows them). Traceable: no Python list becomes a tensor here."""
        rs = self.rows
        if rs is None:
            return self.active if self.active_pages is None else self.active_pages
        if torch.compiler.is_compiling():
            return self.derive(rs, rows, batch)
        key = (rs.shape[0], rows, batch)
        ts = self._derived.get(key)
        if ts is None:
            ts = self.derive(rs, rows, batch).contiguous()
            if len(self._derived) > MAX_CACHED_SHAPES:
                self._derived.clear()
            self._derived[key] = ts
        return ts

    def derive(self, rs: Tensor, rows: int, batch: int, repeat: bool = True) -> Tensor:
        """[rows, 1] slots (pages: [rows, P_max]) from the per-name slots ``rs``: each name
        covers ``batch // len(rs)`` consecutive batch rows (only 1 unless ``repeat``), each
        batch row ``rows // batch`` consecutive rows of x."""
        k = rows_per_name(rs.shape[0], batch, self.owner, repeat)  # a shape, not the names: no guard on them
        per_row = rs if k == 1 else rs.repeat_interleave(k)
        per = rows // batch if batch else 1
        ts = (per_row if per == 1 else per_row.repeat_interleave(per)).unsqueeze(1)
        return paging.slots_to_pages(None if self.stale else self.page_table, ts)  # stale: awaits the repack
