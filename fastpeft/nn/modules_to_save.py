"""``modules_to_save``: a full trainable copy of a module per adapter (PEFT's wrapper).

Names as PEFT: ``<path>.original_module.*`` and ``<path>.modules_to_save.<adapter>.*``. The
copy of the active adapter runs; the original runs while adapters are disabled or none of
this wrapper's adapters is active. In a mixed batch each row runs its adapter's copy.
"""
from __future__ import annotations

import copy

from torch import Tensor, nn

from .base import AdapterLayer


class ModulesToSaveWrapper(AdapterLayer):
    adapter_param_dicts = ("modules_to_save",)

    def __init__(self, module: nn.Module):
        nn.Module.__init__(self)
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._init_adapter_state()

    @property
    def base_layer(self):  # noqa: D401 - PEFT compatibility
        return self.original_module

    def add_adapter(self, name: str, **_) -> None:
        self._register(name)
        m = copy.deepcopy(self.original_module)
        for p in m.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = m
        self.set_adapter(self._active)

    def set_adapter(self, names) -> None:
        super().set_adapter(names)
        for p in self.original_module.parameters():
            p.requires_grad_(False)

    def forward(self, x: Tensor, *args, **kwargs):
        sel = self._call_selection()
        if self.disable_adapters:
            return self.original_module(x, *args, **kwargs)
        if sel is not None:
            groups = self._row_groups(x.shape[0], [n for n in dict.fromkeys(sel.names) if n in self.modules_to_save], sel)
            result = self.original_module(x, *args, **kwargs)
            for n, rows in groups:
                result[rows] = self.modules_to_save[n](x[rows], *args, **kwargs).to(result.dtype)
            return result
        act = [a for a in self.active_adapters if a in self.modules_to_save]
        if not act:
            return self.original_module(x, *args, **kwargs)
        return self.modules_to_save[act[0]](x, *args, **kwargs)

    def merge(self, *a, **k):
        pass

    def unmerge(self):
        pass

    def get_base_layer(self):
        return self.original_module
