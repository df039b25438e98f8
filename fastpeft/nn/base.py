"""Shared machinery of every adapter layer: which adapters are active, slots, mixed batches.

An adapter layer wraps a ``base_layer`` (PEFT's attribute name, so state-dict keys match) and
holds any number of named adapters. Each adapter occupies a *slot*: its index in the layer's
stacked tensors, which is what the fused operators index. Per call the layer hands the
operator a ``token_slots`` tensor [M or 1, J] (J adapters per row, -1 = none):

* one or several active adapters: one row ``[[slot_a, slot_b, ...]]`` that broadcasts;
* a mixed batch (``mixed_batch(model, names)``): one slot per row, repeated over the
  sequence positions of each batch row.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def packs_outside_inference_mode(pack):
    """Decorator of the layers' ``_pack``: the stacks are built as normal tensors even when the
    forward that triggers packing runs under ``torch.inference_mode()``. Parameters become views
    of the stacks, so stacks made as inference tensors would turn them into inference tensors,
    and a later training step would silently get no gradients."""

    @functools.wraps(pack)
    def wrapper(self, *args, **kwargs):
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                return pack(self, *args, **kwargs)
        return pack(self, *args, **kwargs)

    return wrapper

BASE_NAMES = ("__base__", None)


class AdapterLayer(nn.Module):
    """Base class: bookkeeping of adapters, active set, enable/disable, merge state, slots.

    Subclasses define ``adapter_param_dicts`` (names of the ModuleDict/ParameterDicts holding
    per-adapter parameters, PEFT's names) and implement ``add_adapter``, ``_pack`` and the
    forward (and ``_remove`` when they hold more than those dicts).
    """

    adapter_param_dicts: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self._init_adapter_state()

    def _init_adapter_state(self) -> None:
        self._adapters: list[str] = []  # slot order
        self._active: list[str] = []
        self._disabled = False
        self.merged_adapters: list[str] = []
        self._mixed: tuple | None = None
        self._stale = True
        self._slots_cache: dict = {}
        # Slot tensors kept current by every state change (set_adapter, mixed_batch, add, delete,
        # move), so a forward only reads them: under torch.compile they are graph inputs, and
        # switching between loaded adapters re-uses the compiled graph.
        self._active_slots: Tensor | None = None  # [1, J] int32, -1 where this layer has none
        self._row_slots: Tensor | None = None  # [len(mixed names)] int32 while in a mixed batch
        self._row_bufs: dict = {}  # number of names -> the memory _row_slots lives in
        self._row_buf_names: dict = {}  # number of names -> the names whose slots it holds
        self._row_slots_cache: dict = {}  # names tuple -> row slots
        self._fast = None  # eager fast-path plan of the subclass (None: rebuild on next forward)
        self._fast_mixed: dict = {}  # the same for mixed batches, per names tuple

    def __getstate__(self):
        # copies and pickles start without fast-path plans (the C++ plans can be neither, and
        # a plan is only a cache: the first forward builds it again)
        state = super().__getstate__().copy()
        state["_fast"] = None
        state["_fast_mixed"] = {}
        return state

    # Flags whose change must drop the eager fast-path plan.
    @property
    def disable_adapters(self) -> bool:
        return self._disabled

    @disable_adapters.setter
    def disable_adapters(self, value: bool) -> None:
        self._disabled = bool(value)
        self._invalidate()

    @property
    def _dirty(self) -> bool:
        """True when the packed stacks must be rebuilt before the next fused forward."""
        return self._stale

    @_dirty.setter
    def _dirty(self, value: bool) -> None:
        self._stale = bool(value)
        if value:
            self._fast = None
            self._fast_mixed = {}

    @property
    def _mixed_names(self) -> tuple | None:
        """Adapter name per batch row while in a mixed batch (``mixed_batch``), else None."""
        return self._mixed

    @_mixed_names.setter
    def _mixed_names(self, names) -> None:
        # entering / leaving a mixed batch only swaps the row-slot tensor (cached per names);
        # the fast-path plans stay (one for the active adapters, one per mixed names tuple)
        names = None if names is None else tuple(names)
        self._mixed = names
        if names is None:
            self._row_slots = None  # the buffers and the row caches stay for the next batch
            return
        n = len(names)
        buf = self._row_bufs.get(n)  # one stable buffer per number of names (CUDA graphs)
        if buf is not None and names == self._row_buf_names.get(n):
            self._row_slots = buf  # the same names again (PEFT passes them on every forward)
            return
        rs = self._row_slots_cache.get(names)
        if rs is None:
            rs = torch.tensor([self.slot_of(m) for m in names], dtype=torch.int32, device=self._slot_device())
            if len(self._row_slots_cache) > 64:
                self._row_slots_cache.clear()
            self._row_slots_cache[names] = rs
        if buf is not None and buf.device == rs.device and not buf.is_inference():
            buf.copy_(rs)
            # the per-shape slots derived from this buffer are refreshed in place too: a CUDA
            # graph captured in an earlier mixed batch of this size reads them
            for key, ts in list(self._slots_cache.items()):
                if key[0] == n:
                    try:
                        ts.copy_(self._derive_slots(buf, key[1], key[2]))
                    except (ValueError, RuntimeError):
                        del self._slots_cache[key]
        else:
            buf = self._row_bufs[n] = rs.clone()
            for key in [k for k in self._slots_cache if k[0] == n]:
                del self._slots_cache[key]
        self._row_slots = buf
        self._row_buf_names[n] = names

    def _invalidate(self) -> None:
        self._fast = None
        self._fast_mixed = {}

    def _slot_device(self) -> torch.device:
        w = getattr(self.get_base_layer(), "weight", None)
        if isinstance(w, Tensor):
            return w.device
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def _refresh_slots(self) -> None:
        """Recompute ``_active_slots`` / ``_row_slots`` from the names (cheap; no packing)."""
        device = self._slot_device()
        # one column per active name (-1 where this layer does not hold it; [[-1]] when none is
        # active): the shape depends only on how many adapters are active, so compiled graphs
        # and CUDA graphs survive set_adapter between sets of the same size. Updated in place
        # when the shape allows (a captured CUDA graph reads the same memory).
        slots = [self.slot_of(a) for a in self._active] or [-1]
        new = torch.tensor([slots], dtype=torch.int32, device=device)
        old = self._active_slots
        if old is not None and old.shape == new.shape and old.device == new.device and not old.is_inference():
            old.copy_(new)
        else:
            self._active_slots = new
        self._row_slots_cache.clear()
        self._row_buf_names = {}
        if self._row_bufs and next(iter(self._row_bufs.values())).device != device:
            self._row_bufs, self._slots_cache = {}, {}  # moved: new buffers on the new device
        self._invalidate()
        self._mixed_names = self._mixed  # recompute the row slots (slot order may have changed)

    # PEFT's tuner layers expose the base layer's weight and bias (model code reads them,
    # e.g. T5 checks ``self.wo.weight.dtype``)
    @property
    def weight(self) -> Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def _adapters_to_run(self, container) -> list | None:
        """The adapters (of those in ``container``) this forward applies, in order, or None when
        the base layer alone runs: adapters disabled (a merged layer is unmerged first, as PEFT
        does) or merged. A mixed batch on merged weights is an error."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return None
        mixed = self._mixed_names
        if mixed is not None:
            if self.merged:
                raise ValueError("cannot use a mixed batch while adapters are merged; call unmerge_adapter() first")
            return [n for n in dict.fromkeys(mixed) if n in container]
        if self.merged:
            return None
        return [n for n in self.active_adapters if n in container]

    # ----- names and slots -------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self._adapters)

    @property
    def active_adapters(self) -> list[str]:
        return [a for a in self._active if a in self._adapters]

    @property
    def active_adapter(self):
        act = self.active_adapters
        return act[0] if len(act) == 1 else act

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def slot_of(self, name) -> int:
        try:
            return self._adapters.index(name)
        except ValueError:
            return -1

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make ``names`` the active adapters (their deltas add up). Unknown names are
        ignored here: the model-level call validates them against the model's adapters."""
        if isinstance(names, str):
            names = [names]
        self._active = list(names)
        active = set(self._active)
        # one pass over the adapter containers (not _params_of per name: with hundreds of
        # adapters this loop is most of the cost of switching)
        for attr in self.adapter_param_dicts:
            d = getattr(self, attr)
            items = d._modules.items() if isinstance(d, nn.ModuleDict) else d.items()
            for name, v in items:
                trainable = name in active
                if not isinstance(v, nn.Module):
                    ps = (v,)
                elif not v._modules:
                    ps = v._parameters.values()
                else:
                    ps = v.parameters()
                for p in ps:
                    if (p is not None and p.requires_grad != trainable and p.is_floating_point()
                            and not self._frozen_param(name, p)):
                        p.requires_grad_(trainable)
        self._refresh_slots()

    def _frozen_param(self, name: str, p: Tensor) -> bool:
        return False

    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled

    def _identity_checks(self, names) -> list:
        """``(container dict, key, object)`` triples that must still hold (``dict[key] is
        object``) for tensors captured from this layer for ``names`` to be its current ones:
        the base layer and its parameters, and the adapter containers, entries and their
        parameters. A fast-path plan checks them on every call, so that assigning a new
        ``nn.Parameter`` or module (e.g. ``load_state_dict(assign=True)``) is seen."""
        checks = []

        def add(container: dict, key: str) -> None:
            checks.append((container, key, container.get(key)))

        add(self._modules, "base_layer")
        base = self.base_layer
        for k in base._parameters:
            add(base._parameters, k)
        for attr in self.adapter_param_dicts:
            d = self._modules.get(attr)
            add(self._modules, attr)
            if d is None:
                continue
            store = d._modules if isinstance(d, nn.ModuleDict) else d._parameters
            for n in names:
                if n not in store:
                    continue
                add(store, n)
                v = store[n]
                if isinstance(v, nn.Module):
                    for k in v._parameters:
                        add(v._parameters, k)
        return checks

    def _params_of(self, name: str) -> list[Tensor]:
        out = []
        for attr in self.adapter_param_dicts:
            d = getattr(self, attr)
            if name in d:
                v = d[name]
                if not isinstance(v, nn.Module):
                    out.append(v)
                elif not v._modules:  # a leaf (nn.Linear, DoRA magnitude): skip the generic walk
                    out.extend(p for p in v._parameters.values() if p is not None)
                else:
                    out.extend(v.parameters())
        return out

    def delete_adapter(self, name: str) -> None:
        if name not in self._adapters:
            return
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting")
        for attr in self.adapter_param_dicts:
            d = getattr(self, attr)
            if name in d:
                del d[name]
        self._remove(name)
        self._adapters.remove(name)
        self._active = [a for a in self._active if a != name]
        self._dirty = True
        self._refresh_slots()

    def _remove(self, name: str) -> None:
        """Subclass hook: drop per-adapter Python state (scaling, flags)."""

    def _register(self, name: str) -> None:
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} already exists in {type(self).__name__}")
        self._adapters.append(name)
        self._dirty = True
        self._refresh_slots()

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda() replace parameter storage: the packed stacks must be rebuilt
        self._dirty = True
        out = super()._apply(fn, *args, **kwargs)
        self._refresh_slots()  # the slot tensors follow the base weight's device
        return out

    def train(self, mode: bool = True):
        # the plans are dropped (dropout now applies or not); the stacks stay: parameters
        # replaced or written while training are found by the staleness checks of the next
        # fused forward, so eval() after training costs no repack of hundreds of adapters
        self._invalidate()
        return super().train(mode)

    # ----- token_slots ----------------------------------------------------------------------
    def _rows_per_name(self, batch: int, n: int | None = None) -> int:
        """Batch rows per mixed-batch name: 1, or k when generation repeated each row k times
        (beam search, ``num_return_sequences``: Transformers repeats rows consecutively).
        ``n``: the number of names (default: ``len(self._mixed)``)."""
        if n is None:
            n = len(self._mixed)
        if n == batch:
            return 1
        if n == 0 or batch % n:
            raise ValueError(
                f"mixed batch: got {n} adapter names for a batch of {batch} rows in "
                f"{type(self).__name__}; pass one name per batch row"
            )
        return batch // n

    def _row_names(self, batch: int) -> tuple:
        """The mixed batch's adapter name of each of the ``batch`` rows (validated, expanded)."""
        k = self._rows_per_name(batch)
        names = self._mixed
        return names if k == 1 else tuple(n for n in names for _ in range(k))

    def token_slots(self, rows: int, batch: int, device=None) -> Tensor | None:
        """[1, J] for the active adapters (-1 where this layer does not hold one), or [rows, 1]
        for a mixed batch.

        ``batch`` is the size of the input's first dimension; a mixed batch has one name per
        batch row (or per group of ``batch // len(names)`` consecutive rows, as generation with
        beams repeats them), repeated over the ``rows // batch`` positions of that row. The
        result is built from the slot tensors kept by every state change; no Python list is
        turned into a tensor here, so the call traces under ``torch.compile``.
        """
        rs = self._row_slots
        if rs is None:
            return self._active_slots
        if torch.compiler.is_compiling():
            return self._derive_slots(rs, rows, batch)
        key = (rs.shape[0], rows, batch)
        ts = self._slots_cache.get(key)
        if ts is None:
            ts = self._derive_slots(rs, rows, batch).contiguous()
            if len(self._slots_cache) > 64:
                self._slots_cache.clear()
            self._slots_cache[key] = ts
        return ts

    def _derive_slots(self, rs: Tensor, rows: int, batch: int) -> Tensor:
        """[rows, 1] slots from the per-name slots ``rs``: each name covers ``batch // len(rs)``
        consecutive batch rows, each batch row ``rows // batch`` consecutive rows of x."""
        k = self._rows_per_name(batch, rs.shape[0])  # a shape, not the names: no guard on them
        per_row = rs if k == 1 else rs.repeat_interleave(k)
        per = rows // batch if batch else 1
        return (per_row if per == 1 else per_row.repeat_interleave(per)).unsqueeze(1)

    def _forward_with_row_names(self, x: Tensor, args: tuple, kwargs: dict):
        """PEFT's layer-level ``forward(x, adapter_names=[...])`` (PEFT's forward hooks pass it to
        every layer for ``model(..., adapter_names=...)``): this call as a mixed batch."""
        names = kwargs.pop("adapter_names")
        previous = self._mixed
        self._mixed_names = None if names is None else ["__base__" if n is None else n for n in names]
        try:
            return self.forward(x, *args, **kwargs)
        finally:
            self._mixed_names = previous


def find_adapter_layers(model: nn.Module):
    """All adapter layers of ``model`` with their module paths."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
