"""Keep many adapters in CPU memory and only the ones in use on the device.

``keep_adapters_on_cpu(model, max_on_device=N)``: every LoRA linear layer of ``model`` keeps its
adapters' parameters in CPU memory (pinned when CUDA is available) and an LRU of ``N`` *device
slots*: stacks ``[N, R, K]`` / ``[N, R, N_out]`` on the device (``R``: the layer's largest rank).
``set_adapter`` and ``mixed_batch`` (and PEFT's ``adapter_names=``) make sure the adapters they
name are resident, copying a missing one into the least recently used slot; the forward then
reads only device memory. The stacks keep their shape, so compiled graphs and captured CUDA
graphs stay valid across loads and evictions (the slots are updated in place).

Cost (see docs/many-adapters.md): a load copies ``r * (K + N_out)`` elements per adapted layer
from host to device (one copy per tensor, asynchronous from pinned memory), at the moment the
adapter is activated, not in the forward; a hit costs nothing. Device memory: ``N`` slots at the
layer's largest rank, whatever the number of adapters on the CPU.

Limits (kept small on purpose): LoRA/rsLoRA/AdaLoRA linear layers (fastpeft's, or PEFT's after
``fastpeft.optimize``); DoRA layers, LoRA embeddings and IA3 layers keep all their adapters on the
device (listed in ``AdapterOffload.skipped``). A mixed batch may name at most ``N`` distinct
adapters. Training offloaded adapters is not supported (the stacks hold copies).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .nn.base import AdapterLayer, packs_outside_inference_mode
from .nn.lora import LoraLinear

__all__ = ["keep_adapters_on_cpu", "AdapterOffload"]


class _SlotLRU:
    """Per-layer bookkeeping: which adapter occupies which device slot, in LRU order."""

    def __init__(self, capacity: int, device: torch.device):
        self.capacity = capacity
        self.device = device
        self.slots: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recent first
        self.loads = 0
        self.evictions = 0

    def assign(self, names: list) -> list:
        """Make ``names`` resident; returns the (name, slot) pairs whose data must be copied."""
        if len(names) > self.capacity:
            raise ValueError(
                f"{len(names)} adapters are needed at once ({names[:5]}...) but max_on_device="
                f"{self.capacity}; raise max_on_device or use fewer distinct adapters per batch"
            )
        needed = set(names)
        to_copy = []
        for n in names:
            if n in self.slots:
                self.slots.move_to_end(n)
                continue
            used = set(self.slots.values())
            free = [s for s in range(self.capacity) if s not in used]
            if free:
                slot = free[0]
            else:
                victim = next(v for v in self.slots if v not in needed)
                slot = self.slots.pop(victim)
                self.evictions += 1
            self.slots[n] = slot
            self.loads += 1
            to_copy.append((n, slot))
        return to_copy


class _OffloadedLora:
    """Methods mixed in front of a LoRA layer class by :func:`keep_adapters_on_cpu`."""

    _lru: _SlotLRU

    def slot_of(self, name) -> int:
        return self._lru.slots.get(name, -1)

    def _ready(self, n) -> bool:
        return n in self._adapters and n in self.lora_A and n in self.scaling

    def _refresh_slots(self) -> None:
        # the adapters in use (the mixed batch's, else the active ones) become resident first,
        # then the slot tensors are recomputed from the LRU's slots
        busy = getattr(self, "_offload_busy", False)
        self._offload_busy = True
        try:
            src = self._mixed if self._mixed is not None else self._active
            self._make_resident([n for n in dict.fromkeys(src) if self._ready(n)])
            self._row_slots_cache.clear()  # slots move with loads and evictions
            super()._refresh_slots()
        finally:
            self._offload_busy = busy

    @property
    def _mixed_names(self):
        return self._mixed

    @_mixed_names.setter
    def _mixed_names(self, names) -> None:
        if getattr(self, "_offload_busy", False):  # from _refresh_slots: slots are current
            AdapterLayer._mixed_names.fset(self, names)
            return
        self._mixed = None if names is None else tuple(names)
        self._refresh_slots()  # entering: load the batch's adapters; leaving: the active ones

    def _make_resident(self, names: list) -> None:
        to_copy = self._lru.assign(names)
        if not to_copy:
            return
        if self._dirty or not self._packed:
            return  # the next _pack copies every resident adapter
        with torch.no_grad():
            for n, slot in to_copy:
                self._copy_into_slot(n, slot)
        self._invalidate()

    def _copy_into_slot(self, n: str, slot: int) -> None:
        p = self._packed
        A, B = self._a_weight(n).detach(), self._b_weight(n).detach()
        r = A.shape[0]
        nb = A.device.type == "cpu" and A.is_pinned()
        p["a"][slot].zero_()
        p["bt"][slot].zero_()
        p["a"][slot, :r].copy_(A, non_blocking=nb)
        p["bt"][slot, :r].copy_(B.t(), non_blocking=nb)
        p["scales"][slot] = self._scale(n)
        la, lb = self.lora_A[n], self.lora_B[n]
        A0 = la if isinstance(la, torch.Tensor) else la.weight  # AdaLoRA: parameters, LoRA: modules
        B0 = lb if isinstance(lb, torch.Tensor) else lb.weight
        p["copies"][n] = (A0.data_ptr(), B0.data_ptr(), A0._version, B0._version)

    @packs_outside_inference_mode
    def _pack(self) -> None:
        lru = self._lru
        names = [n for n in self._adapters if self._ready(n)]
        if not names:
            return
        K, N = self.in_features, self.out_features
        As = {n: self._a_weight(n) for n in names}
        dtype = next(iter(As.values())).dtype
        R = max(a.shape[0] for a in As.values())
        dev = lru.device
        a = torch.zeros(lru.capacity, R, K, dtype=dtype, device=dev)
        bt = torch.zeros(lru.capacity, R, N, dtype=dtype, device=dev)
        scales = torch.zeros(lru.capacity, dtype=torch.float32, device=dev)
        self._packed = dict(a=a, bt=bt, scales=scales, ptrs={}, copies={}, versions=self._versions())
        lru.slots = OrderedDict((n, s) for n, s in lru.slots.items() if n in As)
        with torch.no_grad():
            for n, slot in lru.slots.items():
                self._copy_into_slot(n, slot)
        self._dora_cache.clear()
        self._dirty = False
        self._set_page_table(None)  # the device slots are plain stacks at the largest rank
        self._invalidate()

    def _pack_stale(self, names) -> bool:
        if self._dirty or not self._packed:
            return True
        if any(self.slot_of(n) < 0 for n in names):
            return True
        return super()._pack_stale(names)

    def _remove(self, name: str) -> None:
        super()._remove(name)
        self._lru.slots.pop(name, None)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        _params_to_cpu(self)  # .to(device) must not bring the adapters back
        if getattr(self, "_lru", None) is not None:
            w = self.base_layer.weight
            self._lru.device = w.device
        return out


_classes: dict = {}


def _offloaded_class(cls):
    new = _classes.get(cls)
    if new is None:
        new = type(cls.__name__, (_OffloadedLora, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _classes[cls] = new
    return new


def _params_to_cpu(layer) -> None:
    pin = torch.cuda.is_available()
    for n in layer._adapters:
        for p in layer._params_of(n):
            if p.device.type != "cpu":
                t = p.data.to("cpu")
                p.data = t.pin_memory() if pin else t


class AdapterOffload:
    """Handle returned by :func:`keep_adapters_on_cpu`: the layers it manages and counters."""

    def __init__(self, layers, skipped, max_on_device: int):
        self.layers = layers
        self.skipped = skipped  # [(path, reason)] left with all adapters on the device
        self.max_on_device = max_on_device

    def resident_adapters(self) -> set:
        """Adapters resident on the device (in any managed layer)."""
        return {n for _, m in self.layers for n in m._lru.slots}

    def stats(self) -> dict:
        """``{"loads": ..., "evictions": ...}``: slot loads (host-to-device copies of one adapter
        into one layer) and evictions, summed over the layers."""
        loads = sum(m._lru.loads for _, m in self.layers)
        evictions = sum(m._lru.evictions for _, m in self.layers)
        return dict(loads=loads, evictions=evictions)

    def device_bytes(self) -> int:
        """Bytes of the device stacks of the managed layers."""
        return sum(m._packed["a"].nbytes + m._packed["bt"].nbytes for _, m in self.layers if m._packed)


def keep_adapters_on_cpu(model: nn.Module, max_on_device: int, device=None) -> AdapterOffload:
    """Keep the adapters of ``model``'s LoRA linear layers in CPU memory and at most
    ``max_on_device`` of them per layer on ``device`` (default: each layer's base-weight device),
    in an LRU of slots. Call it after moving the model to its device. Returns a handle with
    ``stats()`` and ``resident_adapters()``."""
    if not isinstance(max_on_device, int) or max_on_device < 1:
        raise ValueError(f"max_on_device must be a positive int, got {max_on_device!r}")
    layers, skipped = [], []
    for path, m in model.named_modules():
        if not isinstance(m, AdapterLayer):
            continue
        if not isinstance(m, LoraLinear):
            skipped.append((path, f"{type(m).__name__} keeps its adapters on the device"))
            continue
        if m._has_dora():
            skipped.append((path, "DoRA layers keep their adapters on the device"))
            continue
        if m.merged:
            raise ValueError(f"layer {path!r} has merged adapters; unmerge them before offloading")
        if not isinstance(m, _OffloadedLora):
            dev = torch.device(device) if device is not None else m.base_layer.weight.device
            m._lru = _SlotLRU(max_on_device, dev)
            m.__class__ = _offloaded_class(type(m))
        else:
            m._lru.capacity = max_on_device
            m._lru.slots = OrderedDict(list(m._lru.slots.items())[-max_on_device:])
        _params_to_cpu(m)
        m._dirty = True
        m._refresh_slots()
        layers.append((path, m))
    return AdapterOffload(layers, skipped, max_on_device)
