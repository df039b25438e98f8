"""Keep many adapters in CPU memory and only the ones in use on the device.

``keep_adapters_on_cpu(model, max_on_device=N)``: every LoRA linear layer of ``model`` gets an
offloading bank (:mod:`fastpeft.nn.bank_offload`, a bank policy: no class changes) and keeps its
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

import torch
from torch import nn

from .nn.bank_offload import OffloadBank, params_to_cpu
from .nn.base import AdapterLayer
from .nn.lora import LoraLinear

__all__ = ["keep_adapters_on_cpu", "AdapterOffload"]


class AdapterOffload:
    """Handle returned by :func:`keep_adapters_on_cpu`: the layers it manages and counters."""

    def __init__(self, layers, skipped, max_on_device: int):
        self.layers = layers
        self.skipped = skipped  # [(path, reason)] left with all adapters on the device
        self.max_on_device = max_on_device

    def resident_adapters(self) -> set:
        """Adapters resident on the device (in any managed layer)."""
        return {n for _, m in self.layers for n in m.bank.lru}

    def stats(self) -> dict:
        """``{"loads": ..., "evictions": ...}``: slot loads (host-to-device copies of one adapter
        into one layer) and evictions, summed over the managed layers."""
        loads = sum(m.bank.loads for _, m in self.layers)
        evictions = sum(m.bank.evictions for _, m in self.layers)
        return dict(loads=loads, evictions=evictions)

    def device_bytes(self) -> int:
        """Bytes of the device stacks of the managed layers."""
        return sum(m.bank.nbytes() for _, m in self.layers)


def keep_adapters_on_cpu(model: nn.Module, max_on_device: int, device=None) -> AdapterOffload:
    """Keep the adapters of ``model``'s LoRA linear layers in CPU memory and at most
    ``max_on_device`` of them per layer on ``device`` (default: each layer's base-weight device),
    in an LRU of slots (:class:`fastpeft.nn.bank_offload.OffloadBank` becomes each layer's bank).
    Call it after moving the model to its device. Returns a handle with ``stats()`` and
    ``resident_adapters()``."""
    if not isinstance(max_on_device, int) or max_on_device < 1:
        raise ValueError(f"max_on_device must be a positive int, got {max_on_device!r}")
    layers, skipped, merged = [], [], []
    for path, m in model.named_modules():
        if not isinstance(m, AdapterLayer):
            continue
        if not isinstance(m, LoraLinear):
            skipped.append((path, f"{type(m).__name__} keeps its adapters on the device"))
        elif m._has_dora():
            skipped.append((path, "DoRA layers keep their adapters on the device"))
        elif m.merged:
            merged.append(path)
        else:
            layers.append((path, m))
    if merged:  # checked before any layer changes
        raise ValueError(f"layer {merged[0]!r} has merged adapters; unmerge them before offloading")
    for _, m in layers:
        if isinstance(m.bank, OffloadBank):
            m.bank.resize(max_on_device)
        else:
            dev = torch.device(device) if device is not None else m.base_layer.weight.device
            m.bank = OffloadBank.replacing(m.bank, max_on_device, dev)
        params_to_cpu(m)
        m.bank.mark_stale()
        m._refresh_slots()
    return AdapterOffload(layers, skipped, max_on_device)
