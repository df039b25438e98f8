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

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

BASE_NAMES = ("__base__", None)


class AdapterLayer(nn.Module):
    """Base class: bookkeeping of adapters, active set, enable/disable, merge state, slots.

    Subclasses define ``adapter_param_dicts`` (names of the ModuleDict/ParameterDicts holding
    per-adapter parameters, PEFT's names) and implement ``_add``, ``_remove``, ``_pack`` and
    the forward.
    """

    adapter_param_dicts: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self._adapters: list[str] = []  # slot order
        self._active: list[str] = []
        self.disable_adapters = False
        self.merged_adapters: list[str] = []
        self._mixed_names: Optional[tuple] = None
        self._dirty = True
        self._slots_cache: dict = {}

    # PEFT's tuner layers expose the base layer's weight and bias (model code reads them,
    # e.g. T5 checks ``self.wo.weight.dtype``)
    @property
    def weight(self) -> Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> Optional[Tensor]:
        return getattr(self.get_base_layer(), "bias", None)

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

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
        for name in self._adapters:
            trainable = name in self._active
            for p in self._params_of(name):
                if p.is_floating_point() and not self._frozen_param(name, p):
                    p.requires_grad_(trainable)
        self._slots_cache.clear()

    def _frozen_param(self, name: str, p: Tensor) -> bool:
        return False

    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled

    def _params_of(self, name: str) -> list[Tensor]:
        out = []
        for attr in self.adapter_param_dicts:
            d = getattr(self, attr)
            if name in d:
                v = d[name]
                out.extend(v.parameters() if isinstance(v, nn.Module) else [v])
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
        self._slots_cache.clear()

    def _remove(self, name: str) -> None:
        """Subclass hook: drop per-adapter Python state (scaling, flags)."""

    def _register(self, name: str) -> None:
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} already exists in {type(self).__name__}")
        self._adapters.append(name)
        self._dirty = True
        self._slots_cache.clear()

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda() replace parameter storage: the packed stacks must be rebuilt
        self._dirty = True
        self._slots_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        self._dirty = True
        return super().train(mode)

    # ----- token_slots ----------------------------------------------------------------------
    def token_slots(self, rows: int, batch: int, device) -> Optional[Tensor]:
        """[1, J] for the active adapters, or [rows, 1] for a mixed batch; None if no adapter applies.

        ``batch`` is the size of the input's first dimension; a mixed batch has one name per
        batch row, repeated over the ``rows // batch`` positions of that row.
        """
        names = self._mixed_names
        if names is None:
            key = ("active", device)
            ts = self._slots_cache.get(key)
            if ts is None:
                slots = [self.slot_of(a) for a in self.active_adapters]
                ts = torch.tensor([slots], dtype=torch.int32, device=device) if slots else None
                self._slots_cache[key] = ts
            return ts
        if len(names) != batch:
            raise ValueError(
                f"mixed batch: got {len(names)} adapter names for a batch of {batch} rows in "
                f"{type(self).__name__}; pass one name per batch row"
            )
        key = ("mixed", names, rows, device)
        ts = self._slots_cache.get(key)
        if ts is None:
            per_row = torch.tensor([self.slot_of(n) for n in names], dtype=torch.int32)
            ts = per_row.repeat_interleave(rows // batch).unsqueeze(1).to(device)
            if len(self._slots_cache) > 64:
                self._slots_cache.clear()
            self._slots_cache[key] = ts
        return ts

    def uses_mixed_batch(self) -> bool:
        return self._mixed_names is not None


def find_adapter_layers(model: nn.Module):
    """All adapter layers of ``model`` with their module paths."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
