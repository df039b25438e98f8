"""Shared machinery of every adapter layer: which adapters exist and are active, and which
adapters a call applies to which rows (the active ones, or a mixed batch's names per row).

An adapter layer wraps a ``base_layer`` (PEFT's attribute name, so state-dict keys match) and
holds any number of named adapters, with PEFT's parameter names. Its storage for the fused
operators (stacks, slot tensors, caches) is its ``bank`` (:mod:`fastpeft.nn.bank`,
:mod:`fastpeft.nn.slots`); the layer turns its state into the bank's slot tensors on every state
change, and a forward hands the operator the bank's ``token_slots``.
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..parallel import tensor_parallel as _tensor_parallel
from . import selection as _selection
from .selection import Selection
from .slots import SlotTable, rows_per_name

# One repack at a time: two threads' forwards that both find a layer's stacks stale must not
# build and alias them at once (a repack is rare: after an add, delete, move or replacement).
PACK_LOCK = threading.RLock()
# Opening and closing model-level mixed batches on a layer (the selection recorded for compiled
# forwards): several threads' blocks must not lose each other's entries.
_BLOCKS_LOCK = threading.RLock()


def packs_outside_inference_mode(pack):
    """Decorator of the layers' ``_pack``: the stacks are built as normal tensors even when the
    forward that triggers packing runs under ``torch.inference_mode()``. Parameters become views
    of the stacks, so stacks made as inference tensors would turn them into inference tensors,
    and a later training step would silently get no gradients. Holds :data:`PACK_LOCK`."""

    @functools.wraps(pack)
    def wrapper(self, *args, **kwargs):
        with PACK_LOCK:
            if torch.is_inference_mode_enabled():
                with torch.inference_mode(False), torch.no_grad():
                    return pack(self, *args, **kwargs)
            return pack(self, *args, **kwargs)

    return wrapper

BASE_NAMES = ("__base__", None)


class AdapterLayer(nn.Module):
    """Base class: bookkeeping of adapters, active set, enable/disable, merge state, selection.

    Subclasses define ``adapter_param_dicts`` (names of the ModuleDict/ParameterDicts holding
    per-adapter parameters, PEFT's names), ``bank_class`` (their storage, :mod:`fastpeft.nn.bank`)
    and implement ``add_adapter`` and ``_forward`` (and ``_remove`` when they hold more than
    those dicts). The slot order, slot tensors and caches live in ``self.bank``.
    """

    adapter_param_dicts: tuple[str, ...] = ()
    bank_class: type = SlotTable
    _tp = None  # the base's tensor-parallel sharding (fastpeft.parallel.tensor_parallel.TPPlan) or None

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self._init_adapter_state()
        self._tp = _tensor_parallel.plan_for(self, base_layer)  # raises for a sharding it does not implement

    def _init_adapter_state(self) -> None:
        self.bank = self.bank_class()
        self.bank.owner = type(self).__name__
        self._active: list[str] = []
        self._disabled = False
        self.merged_adapters: list[str] = []
        self._row_selection: tuple | None = None  # read as _mixed_names, written by set_mixed_names
        self._open_blocks: list = []  # [(block, names)] of the model-level mixed batches open on it

    @property
    def _mixed_names(self) -> tuple | None:
        """The mixed batch recorded on the layer (for compiled forwards and the graphs captured
        from them), else None. Eager forwards read their own call's selection instead
        (:meth:`_call_selection`). Read-only: :meth:`set_mixed_names` also brings the bank's
        row slots up to date."""
        return self._row_selection

    def _call_selection(self) -> Selection | None:
        """This call's mixed batch on this layer, or None (the active adapters): the call's own
        (:mod:`fastpeft.nn.selection`) in eager forwards, the recorded one while compiling."""
        if torch.compiler.is_compiling():
            names = self._row_selection
            return None if names is None else Selection(names, True)
        return _selection.current(self)

    @property
    def _adapters(self) -> list[str]:
        """The adapters in slot order (the bank's list)."""
        return self.bank.names

    # Flags whose change must drop the eager fast-path plan.
    @property
    def disable_adapters(self) -> bool:
        return self._disabled

    @disable_adapters.setter
    def disable_adapters(self, value: bool) -> None:
        self._disabled = bool(value)
        self.bank.drop_plans()

    def set_mixed_names(self, names) -> None:
        """Record a mixed batch on the layer (``names``: one adapter name per batch row) or clear
        it (None): what compiled forwards (and the CUDA graphs captured from them) read. Eager
        forwards use their call's selection (``fastpeft.mixed_batch``, ``adapter_names=``)."""
        names = None if names is None else tuple(names)
        self._row_selection = names
        self.bank.select_rows(self, names)

    def _open_block(self, block, names: tuple) -> None:
        """A model-level mixed batch opened on this layer: recorded for compiled forwards."""
        with _BLOCKS_LOCK:  # blocks of several threads open and close at once
            self._open_blocks.append((block, names))
            try:
                self.set_mixed_names(names)
            except BaseException:  # e.g. an offloading bank that cannot hold the names: nothing stays
                self._close_block(block)
                raise

    def _close_block(self, block) -> None:
        """The block ended: the layer records the innermost block still open (None: none), in
        whatever order blocks end."""
        with _BLOCKS_LOCK:
            self._open_blocks = [(b, n) for b, n in self._open_blocks if b is not block]
            self.set_mixed_names(self._open_blocks[-1][1] if self._open_blocks else None)

    def _slot_device(self) -> torch.device:
        w = getattr(self.get_base_layer(), "weight", None)
        if isinstance(w, Tensor):
            from ._base_kinds import adapter_device

            return adapter_device(self.get_base_layer())  # an offloaded base: where it computes
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def _refresh_slots(self) -> None:
        """Recompute the bank's slot tensors from the names (cheap; no packing)."""
        self.bank.refresh(self)

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

    # ----- selection: which adapters a call applies, to which rows ------------------------------
    def forward(self, x: Tensor, *args, **kwargs):
        if kwargs and "adapter_names" in kwargs:
            return self._forward_with_row_names(x, args, kwargs)
        return self._forward(x, *args, **kwargs)

    def _forward(self, x: Tensor, *args, **kwargs):
        """The layer kind's forward (abstract: every kind in fastpeft.nn defines it, or its own
        ``forward`` as ModulesToSaveWrapper does). A subclass without one cannot run."""
        raise NotImplementedError(f"{type(self).__name__} is an AdapterLayer without a _forward(x, *args, **kwargs)")

    def _adapters_to_run(self, container) -> list | None:
        """The adapters (of those in ``container``) this forward applies, in order, or None when
        the base layer alone runs: adapters disabled (a merged layer is unmerged first, as PEFT
        does) or merged. A mixed batch on merged weights is an error."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return None
        sel = self._call_selection()
        if sel is not None:
            if self.merged:
                raise ValueError("cannot use a mixed batch while adapters are merged; call unmerge_adapter() first")
            return [n for n in dict.fromkeys(sel.names) if n in container]
        if self.merged:
            return None
        return [n for n in self.active_adapters if n in container]

    def _names_and_selection(self, container, batch: int):
        """(the adapters this call runs, the call's row selection). No names (None: adapters off
        or merged; []: none of the active ones here) means the base alone runs; a mixed batch's
        length is still checked against ``batch`` then."""
        names = self._adapters_to_run(container)
        if names is None:
            return None, None
        sel = self._call_selection()
        if not names and sel is not None:
            self._rows_per_name(batch, sel)  # validates the batch length
        return names, sel

    def _rows_per_name(self, batch: int, sel: Selection) -> int:
        """Batch rows per name of the mixed batch ``sel`` (1, or k when generation repeated each
        row k times and ``sel.repeat``). Raises for a batch whose length does not fit."""
        return rows_per_name(len(sel.names), batch, type(self).__name__, sel.repeat)

    def _row_names(self, batch: int, sel: Selection) -> tuple:
        """The adapter name of each of the ``batch`` rows of mixed batch ``sel`` (validated)."""
        k = self._rows_per_name(batch, sel)
        return sel.names if k == 1 else tuple(n for n in sel.names for _ in range(k))

    def _row_groups(self, batch: int, names, sel: Selection) -> list:
        """``[(name, row indices)]`` of mixed batch ``sel`` over ``batch`` rows, for ``names``."""
        row_names = self._row_names(batch, sel)  # validated, expanded for beams
        return [(n, [i for i, m in enumerate(row_names) if m == n]) for n in names]

    def token_slots(self, rows: int, batch: int) -> Tensor | None:
        """The slots of the selection recorded on the layer (compiled forwards, graphs):
        :meth:`fastpeft.nn.slots.SlotTable.state_token_slots`."""
        return self.bank.state_token_slots(rows, batch)

    def _forward_with_row_names(self, x: Tensor, args: tuple, kwargs: dict):
        """PEFT's layer-level ``forward(x, adapter_names=[...])`` (PEFT's forward hooks pass it to
        every layer for ``model(..., adapter_names=...)``): this call as a mixed batch, one name
        per row (PEFT expands them for beams itself)."""
        names = kwargs.pop("adapter_names")
        if names is None:
            return self.forward(x, *args, **kwargs)
        names = tuple("__base__" if n is None else n for n in names)
        if torch.compiler.is_compiling():  # compiled code reads the recorded selection
            previous = self._row_selection
            self.set_mixed_names(names)
            try:
                return self.forward(x, *args, **kwargs)
            finally:
                self.set_mixed_names(previous)
        with _selection.selecting({self: Selection(names, False)}):
            return self.forward(x, *args, **kwargs)

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
        return self.bank.slot_of(name)

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
        self.bank.forget(name)
        self._adapters.remove(name)
        self._active = [a for a in self._active if a != name]
        held = self.bank.holds_stacks()
        self.bank.mark_stale()
        self._refresh_slots()
        if held:  # the deleted adapter's rows are freed now, not at the next forward
            if self._adapters:
                self._pack()
            else:
                self.bank.drop_stacks()

    def _remove(self, name: str) -> None:
        """Subclass hook: drop per-adapter Python state (scaling, flags)."""

    def _register(self, name: str) -> None:
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} already exists in {type(self).__name__}")
        self._adapters.append(name)
        self.bank.mark_stale()
        self._refresh_slots()

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda() replace parameter storage: the stacks must be rebuilt
        self.bank.mark_stale()
        out = super()._apply(fn, *args, **kwargs)
        self.bank.after_move(self)
        self._refresh_slots()  # the slot tensors follow the base weight's device
        return out

    def train(self, mode: bool = True):
        # the plans are dropped (dropout now applies or not); the stacks stay: parameters
        # replaced or written while training are found by the staleness checks of the next
        # fused forward, so eval() after training costs no repack of hundreds of adapters
        self.bank.drop_plans()
        return super().train(mode)


def find_adapter_layers(model: nn.Module):
    """All adapter layers of ``model`` with their module paths."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
