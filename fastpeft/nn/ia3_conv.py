"""IA3 on ``nn.Conv2d`` / ``nn.Conv3d`` (PEFT 0.21 adapts no ``nn.Conv1d`` with IA3: refused).

PEFT's parameter ``ia3_l.<name>``: ``[1, C, 1, ...]`` (one 1 per spatial dim) with ``C = C_in``
for feed-forward modules (it scales the input) and ``C = C_out`` otherwise (it scales the
output, bias included). Several active adapters multiply; a mixed batch gives each row its
adapter's vector (``[B, C, 1, ...]``, ones for rows without one).

The forward is PEFT's (an elementwise scale of the input or output around the base conv): no
cache, so nothing goes stale. Merging scales the weight as PEFT does (per output channel, or
per input channel expanded over the groups of a grouped conv) and the bias for output scales;
unmerging divides by ``scale + 1e-8`` with PEFT's warning. Any ``padding_mode`` and dilation
work: the scale commutes with the base's padding (reflect / replicate / circular pad scaled
values, zeros stay zeros).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ._base_kinds import adapter_device
from .base import AdapterLayer


class IA3Conv(AdapterLayer):
    """IA3 adapters (a learned scale per input or output channel) on a Conv2d / Conv3d base."""

    adapter_param_dicts = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, is_feedforward: bool, where: str = ""):
        if not isinstance(base_layer, (nn.Conv2d, nn.Conv3d)):
            at = f" (module {where!r})" if where else ""
            raise ValueError(f"IA3 on a {type(base_layer).__name__}{at} is not supported: PEFT's IA3 adapts "
                             f"torch.nn.Linear, Conv1D, torch.nn.Conv2d and torch.nn.Conv3d only")
        super().__init__(base_layer)
        self.is_feedforward = bool(is_feedforward)
        self.kind = "conv"
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self._kernel_dim = base_layer.weight.dim()
        self.fan_in_fan_out = False
        self.ia3_l = nn.ParameterDict()

    def add_adapter(self, name: str, init_ia3_weights: bool = True, dtype=None, **_) -> None:
        """A fresh adapter: ones (identity) with ``init_ia3_weights``, else random."""
        self._register(name)
        w = self.base_layer.weight
        dtype = dtype or (w.dtype if w.is_floating_point() else torch.float32)
        c = self.in_features if self.is_feedforward else self.out_features
        shape = (1, c) + (1,) * (self._kernel_dim - 2)
        make = torch.ones if init_ia3_weights else torch.randn
        self.ia3_l[name] = nn.Parameter(make(shape, device=adapter_device(self.base_layer), dtype=dtype))
        self.set_adapter(self._active)

    def _forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        names, sel = self._names_and_selection(self.ia3_l, x.shape[0])
        if not names:
            return self.base_layer(x, *args, **kwargs)
        previous_dtype = x.dtype
        if sel is None:
            scale = self.ia3_l[names[0]]
            for n in names[1:]:
                scale = scale * self.ia3_l[n]
            dtype = self.ia3_l[names[-1]].dtype  # PEFT: the last active adapter's dtype
        else:
            first = self.ia3_l[names[0]]
            ones = torch.ones(first.shape[1], dtype=first.dtype, device=first.device)
            rows = [self.ia3_l[n].reshape(-1) if n in self.ia3_l else ones for n in self._row_names(x.shape[0], sel)]
            scale = torch.stack(rows).view(x.shape[0], -1, *([1] * (x.dim() - 2)))
            dtype = first.dtype
        if self.is_feedforward:
            result = self.base_layer((x.to(dtype) * scale).to(self.base_layer.weight.dtype), *args, **kwargs)
        else:
            result = self.base_layer(x, *args, **kwargs).to(dtype) * scale
        return result.to(previous_dtype)

    # ----- merging -----------------------------------------------------------------------------
    def _weight_scale(self, name: str) -> Tensor:
        """``ia3_l`` (float32) broadcastable to the base weight ``[C_out, C_in / g, *k]``."""
        s = self.ia3_l[name].detach().float()
        ones = (1,) * (self._kernel_dim - 2)
        if not self.is_feedforward:
            return s.reshape(-1, 1, *ones)
        g = self.base_layer.groups
        if g == 1:
            return s
        cin, cout = self.in_features // g, self.out_features // g
        # output channel o reads inputs of its group only: the scale of input j of group o // cout
        return s.reshape(g, 1, cin, *ones).expand(g, cout, cin, *ones).reshape(self.out_features, cin, *ones)

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        wanted = self.active_adapters if adapter_names is None else adapter_names
        base = self.base_layer
        for n in [n for n in wanted if n in self.ia3_l and n not in self.merged_adapters]:
            new = base.weight.detach().float() * self._weight_scale(n)
            new_bias = None
            if not self.is_feedforward and base.bias is not None:
                new_bias = base.bias.detach().float() * self.ia3_l[n].detach().float().reshape(base.bias.shape)
            if safe_merge and not (torch.isfinite(new).all() and (new_bias is None or torch.isfinite(new_bias).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {n} seems to be broken")
            with torch.no_grad():
                base.weight.copy_(new.to(base.weight.dtype))
                if new_bias is not None:
                    base.bias.copy_(new_bias.to(base.bias.dtype))
            self.merged_adapters.append(n)

    def unmerge(self) -> None:
        if self.merged_adapters:
            warnings.warn("Unmerge result can be inaccurate for (IA)^3.", stacklevel=2)
        base = self.base_layer
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            with torch.no_grad():
                new = base.weight.detach().float() / (self._weight_scale(n) + 1e-8)
                base.weight.copy_(new.to(base.weight.dtype))
                if not self.is_feedforward and base.bias is not None:
                    s = self.ia3_l[n].detach().float().reshape(base.bias.shape)
                    base.bias.copy_((base.bias.detach().float() / (s + 1e-8)).to(base.bias.dtype))

    def extra_repr(self) -> str:
        return f"adapters={self._adapters}, active={self.active_adapters}, feedforward={self.is_feedforward}"
