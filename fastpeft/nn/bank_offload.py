"""A bank policy: adapters kept in CPU memory, an LRU of device slots holding the ones in use.

:class:`OffloadBank` replaces a LoRA layer's :class:`~fastpeft.nn.bank.AdapterBank` (see
:func:`fastpeft.keep_adapters_on_cpu`): the layer's PEFT parameters stay in CPU memory (pinned
when CUDA is available) and the bank's stacks are ``capacity`` *device slots* ``[capacity, R,
K]`` / ``[capacity, R, N]`` at the layer's largest rank, unpaged. Every slot refresh (after
``set_adapter``, entering or leaving a mixed batch, PEFT's ``adapter_names=``) makes the adapters
it names resident first, copying a missing one into the least recently used slot; the forward
then reads device memory only. The stacks keep their shape, so compiled graphs and captured CUDA
graphs stay valid across loads and evictions (slots are written in place).
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .bank import AdapterBank, _ptrs_versions


class OffloadBank(AdapterBank):
    """``capacity`` device slots on ``device`` in LRU order over a layer's CPU-resident adapters.

    ``lru``: name -> device slot, least recently used first; ``loads`` / ``evictions``:
    host-to-device copies of one adapter and evictions so far."""

    def __init__(self, capacity: int, device: torch.device):
        super().__init__()
        self.capacity = capacity
        self.device = device
        self.lru: OrderedDict[str, int] = OrderedDict()
        self.loads = 0
        self.evictions = 0
        # a load evicts what another call may be reading: one call (and one slot refresh) at a
        # time per layer, so each call keeps its adapters resident while its operator runs
        self.call_lock = threading.RLock()

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("call_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.call_lock = threading.RLock()

    @classmethod
    def replacing(cls, bank: AdapterBank, capacity: int, device: torch.device) -> OffloadBank:
        """A new offload bank for the adapters of ``bank`` (same slot order; nothing resident)."""
        new = cls(capacity, device)
        new.names, new.owner = bank.names, bank.owner
        return new

    def resize(self, capacity: int) -> None:
        """Keep at most ``capacity`` slots (the most recently used adapters stay resident)."""
        self.capacity = capacity
        kept = list(self.lru)[-capacity:]  # renumbered: the next pack reloads them into slots 0..k-1
        self.lru = OrderedDict((n, s) for s, n in enumerate(kept))
        self.mark_stale()

    def slot_of(self, name) -> int:
        return self.lru.get(name, -1)

    def _assign(self, names: list) -> list:
        """Make ``names`` resident; returns the (name, slot) pairs whose data must be copied."""
        if len(names) > self.capacity:
            raise ValueError(
                f"{len(names)} adapters are needed at once ({names[:5]}...) but max_on_device="
                f"{self.capacity}; raise max_on_device or use fewer distinct adapters per batch"
            )
        needed = set(names)
        to_copy = []
        for n in names:
            if n in self.lru:
                self.lru.move_to_end(n)
                continue
            used = set(self.lru.values())
            free = [s for s in range(self.capacity) if s not in used]
            if free:
                slot = free[0]
            else:
                victim = next(v for v in self.lru if v not in needed)
                slot = self.lru.pop(victim)
                self.evictions += 1
            self.lru[n] = slot
            self.loads += 1
            to_copy.append((n, slot))
        return to_copy

    # ----- the slot refreshes make the named adapters resident first ---------------------------
    def refresh(self, layer) -> None:
        with self.call_lock:
            self._refresh(layer)

    def _refresh(self, layer) -> None:
        src = layer._mixed_names if layer._mixed_names is not None else layer._active
        to_copy = self._assign([n for n in dict.fromkeys(src) if layer._entry_ready(n)])
        if to_copy and not self.stale and self.a is not None:  # else the next pack copies every resident one
            with torch.no_grad():
                for n, slot in to_copy:
                    self._load(slot, n, layer._entry(n), layer.scaling[n])
        super().refresh(layer)

    def prepare_call(self, layer, sel) -> None:
        """Make the adapters of a call resident (its mixed batch ``sel``, else the active ones):
        the slots it reads then hold them. The layer calls it holding :attr:`call_lock`, which
        it keeps until its operator returned."""
        names = layer._active if sel is None else sel.names
        if all(n in self.lru or not layer._entry_ready(n) for n in names):
            return
        to_copy = self._assign([n for n in dict.fromkeys(names) if layer._entry_ready(n)])
        if to_copy and not self.stale and self.a is not None:
            with torch.no_grad():
                for n, slot in to_copy:
                    self._load(slot, n, layer._entry(n), layer.scaling[n])
        super().refresh(layer)  # slots moved: the cached per-call slots go

    def select_rows(self, layer, names) -> None:
        # `names` is the layer's _mixed_names by now, which refresh reads
        self.refresh(layer)  # entering: load the batch's adapters; leaving: the active ones

    def _load(self, slot: int, name: str, entry, scaling: float) -> None:
        A, B = entry.a.detach(), entry.b.detach()
        r = A.shape[0]
        nb = A.device.type == "cpu" and A.is_pinned()
        self.a[slot].zero_()
        self.bt[slot].zero_()
        self.a[slot, :r].copy_(A, non_blocking=nb)
        self.bt[slot, :r].copy_(B.t(), non_blocking=nb)
        self.scales[slot] = entry.scale
        self.copies[name] = _ptrs_versions(entry.watched)
        self.scale_src[name] = scaling
        self.drop_plans()

    def pack(self, entries: list, scale_src: dict, paged: bool = True) -> None:
        """Device slots at the largest rank, holding the resident adapters (never paged). The
        stacks of the last pack are re-used (zeroed and reloaded) when their shape, dtype and
        device still fit, so a captured CUDA graph keeps reading the right memory."""
        by_name = dict(zip(self.names, entries, strict=True))
        K, N = entries[0].a.shape[1], entries[0].b.shape[0]
        dtype = entries[0].a.dtype
        R = max(e.a.shape[0] for e in entries)
        dev = self.device
        shape = (self.capacity, R, K)
        if self.a is not None and tuple(self.a.shape) == shape and self.a.dtype == dtype and self.a.device == dev \
                and self.bt.shape[2] == N and not self.a.is_inference():
            for t in (self.a, self.bt, self.scales):
                t.zero_()
        else:
            self.a = torch.zeros(shape, dtype=dtype, device=dev)
            self.bt = torch.zeros(self.capacity, R, N, dtype=dtype, device=dev)
            self.scales = torch.zeros(self.capacity, dtype=torch.float32, device=dev)
        self.starts = list(range(self.capacity + 1))
        self.aliased, self.copies, self.scale_src = {}, {}, {}
        self.lru = OrderedDict((n, s) for n, s in self.lru.items() if n in by_name)
        with torch.no_grad():
            for n, slot in self.lru.items():
                self._load(slot, n, by_name[n], scale_src[n])
        self.dora = None
        self.stale = False
        self.set_page_table(None)
        self.drop_plans()

    def needs_pack(self, names, watched, scaling) -> bool:
        if self.stale or self.a is None or any(self.slot_of(n) < 0 for n in names):
            return True
        return super().needs_pack(names, watched, scaling)

    def forget(self, name: str) -> None:
        self.lru.pop(name, None)
        self.copies.pop(name, None)

    def after_move(self, layer) -> None:
        params_to_cpu(layer)  # .to(device) must not bring the adapters back
        self.device = layer.base_layer.weight.device


def params_to_cpu(layer) -> None:
    """Move ``layer``'s adapter parameters to CPU memory (pinned when CUDA is available)."""
    pin = torch.cuda.is_available()
    for n in layer._adapters:
        for p in layer._params_of(n):
            if p.device.type != "cpu":
                t = p.data.to("cpu")
                p.data = t.pin_memory() if pin else t
