"""AdaLoRA (SVD-form) adapters on a linear-like base: ``delta = B @ (A * E) * scaling / (ranknum + 1e-5)``.

PEFT's names: ``lora_A.<name>`` [r, K], ``lora_B.<name>`` [N, r], ``lora_E.<name>`` [r, 1] and
the non-trainable ``ranknum.<name>`` (not saved in checkpoints). The bank's stacks hold
``A * E`` (a derived copy, rebuilt when A, B, E or ranknum change: the bank watches all four).
"""
from __future__ import annotations

import torch
from torch import nn

from .bank import Entry
from .lora import LoraLinear


class AdaLoraLinear(LoraLinear):
    """AdaLoRA adapters; forward routes, merging and the bank as :class:`LoraLinear`."""

    adapter_param_dicts = ("lora_A", "lora_B", "lora_E", "ranknum")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()

    def add_adapter(self, name, r, lora_alpha, lora_dropout=0.0, init_lora_weights=True, dtype=None, ranknum=None, **_):
        """``ranknum``: the scaling divisor (PEFT keeps the initial rank there after pruning)."""
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        self._register(name)
        w = self.base_layer.weight
        dtype = dtype or (w.dtype if w.is_floating_point() else torch.float32)
        K, N = self.in_features, self.out_features
        self._set_config(name, r, lora_alpha, False, False, False,
                         nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity(),
                         scaling=lora_alpha if lora_alpha > 0 else float(r))
        kw = dict(device=w.device, dtype=dtype)
        self.lora_A[name] = nn.Parameter(torch.randn(r, K, **kw))
        self.lora_B[name] = nn.Parameter(torch.randn(N, r, **kw))
        self.lora_E[name] = nn.Parameter(torch.randn(r, 1, **kw))
        ranks = float(ranknum if ranknum is not None else r)
        self.ranknum[name] = nn.Parameter(torch.full((1,), ranks, **kw), requires_grad=False)
        if init_lora_weights:
            with torch.no_grad():
                nn.init.zeros_(self.lora_E[name])
                nn.init.normal_(self.lora_A[name], mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B[name], mean=0.0, std=0.02)
        self.set_adapter(self._active)

    def _frozen_param(self, name, p):
        return p is self.ranknum[name] if name in self.ranknum else False

    def _a_weight(self, name):
        return self.lora_A[name] * self.lora_E[name]

    def _b_weight(self, name):
        return self.lora_B[name]

    def _scale(self, name):
        return self.scaling[name] / (float(self.ranknum[name]) + 1e-5)

    def _watched(self, name):
        return (self.lora_A[name], self.lora_B[name], self.lora_E[name], self.ranknum[name])

    def _entry(self, name):
        return Entry(self._a_weight(name), self._b_weight(name), self._scale(name), self._watched(name), alias=False)

    def _lora_out(self, name, x):
        d = self.lora_dropout[name](x)
        return (d @ (self.lora_A[name] * self.lora_E[name]).T) @ self.lora_B[name].T

    def _adapter_delta(self, name, x, result):
        xl = x.to(self.lora_A[name].dtype)
        return self._lora_out(name, xl) * self.scaling[name] / (self.ranknum[name] + 1e-5)
