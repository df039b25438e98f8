"""IA3 layers: a learned per-feature scale on a linear-like base.

PEFT's name ``ia3_l.<name>``: shape [1, K] for feed-forward modules (scales the input) and
[N, 1] otherwise (scales the output, bias included). Several active adapters multiply.
The fused operator receives the product as ``input_scale`` [K] / ``output_scale`` [N], or
per row ([M, K] / [M, N]) in a mixed batch.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..ops import _schema  # noqa: F401
from ._base_kinds import base_kind, fused_forward_ok, in_out_features, weight_nk
from .base import AdapterLayer


class IA3Linear(AdapterLayer):
    adapter_param_dicts = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, is_feedforward: bool):
        super().__init__(base_layer)
        self.kind = base_kind(base_layer)
        self.in_features, self.out_features = in_out_features(base_layer)
        self.fan_in_fan_out = self.kind == "conv1d"
        self.is_feedforward = bool(is_feedforward)
        self.ia3_l = nn.ParameterDict()
        self._packed: dict = {}

    def add_adapter(self, name: str, init_ia3_weights: bool = True, dtype=None, **_) -> None:
        self._register(name)
        w = self.base_layer.weight
        dtype = dtype or (w.dtype if w.is_floating_point() else torch.float32)
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        t = torch.ones(shape, device=w.device, dtype=dtype) if init_ia3_weights else torch.randn(shape, device=w.device, dtype=dtype)
        self.ia3_l[name] = nn.Parameter(t)
        self.set_adapter(self._active)

    def _scale_vector(self, names) -> Tensor:
        """Product of the named adapters' scales, flattened: [K] (feed-forward) or [N]."""
        s = self.ia3_l[names[0]].flatten()
        for n in names[1:]:
            s = s * self.ia3_l[n].flatten()
        return s

    def _row_scales(self, x: Tensor, mixed) -> Tensor:
        """[batch, 1.., D] per-row scales for a mixed batch (1 for rows without an adapter)."""
        row_names = self._row_names(x.shape[0])  # validated, expanded for beams
        d = self.in_features if self.is_feedforward else self.out_features
        ones = torch.ones(d, dtype=next(iter(self.ia3_l.values())).dtype, device=x.device)
        rows = [self.ia3_l[n].flatten() if n in self.ia3_l else ones for n in row_names]
        return torch.stack(rows)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if kwargs and "adapter_names" in kwargs:
            return self._forward_with_row_names(x, args, kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        mixed = self._mixed_names
        if mixed is None and self.merged:
            return self.base_layer(x, *args, **kwargs)
        if mixed is not None and self.merged:
            raise ValueError("cannot use a mixed batch while adapters are merged; call unmerge_adapter() first")
        names = [n for n in self.active_adapters if n in self.ia3_l] if mixed is None else None
        if mixed is None and not names:
            return self.base_layer(x, *args, **kwargs)
        if mixed is not None:
            scale = self._row_scales(x, mixed)  # [B, D]
            scale = scale.view(x.shape[0], *([1] * (x.dim() - 2)), -1)
        else:
            scale = self._scale_vector(names)
        previous_dtype = x.dtype
        if args or kwargs or not fused_forward_ok(self.base_layer) or (
            torch.is_grad_enabled() and scale.requires_grad
        ):
            if self.is_feedforward:
                return self.base_layer((x * scale).to(previous_dtype), *args, **kwargs)
            result = self.base_layer(x, *args, **kwargs)
            return (result * scale).to(result.dtype)
        K, N = self.in_features, self.out_features
        x2 = x.reshape(-1, K)
        if mixed is not None:
            rows_per = x2.shape[0] // x.shape[0]
            scale = scale.reshape(x.shape[0], -1).repeat_interleave(rows_per, dim=0)
        in_s, out_s = (scale, None) if self.is_feedforward else (None, scale)
        if self.kind == "quant":
            from ..quant.layers import quantized_adapter_linear

            y = quantized_adapter_linear(self.base_layer, x2, None, None, None, None, None, in_s, out_s)
        else:
            W = self.base_layer.weight
            W = W.t() if self.kind == "conv1d" else W
            y = torch.ops.fastpeft.adapter_linear(x2, W, self.base_layer.bias, None, None, None, None, None, in_s, out_s)
        return y.reshape(*x.shape[:-1], N)

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        names = [n for n in (adapter_names or self.active_adapters) if n in self.ia3_l and n not in self.merged_adapters]
        for n in names:
            s = self.ia3_l[n].detach().flatten()
            self._scale_base(s)
            self.merged_adapters.append(n)

    def unmerge(self) -> None:
        if self.merged_adapters:
            warnings.warn("Unmerge result can be inaccurate for (IA)^3.")
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            self._scale_base(1.0 / (self.ia3_l[n].detach().flatten() + 1e-8))

    def _scale_base(self, s: Tensor) -> None:
        W = weight_nk(self.base_layer)
        new = W.detach().float() * (s.float().view(1, -1) if self.is_feedforward else s.float().view(-1, 1))
        if self.kind == "quant":
            from ..quant.layers import quantized_like

            warnings.warn("merging into a quantized base: dequantize, merge, requantize (rounding errors possible)")
            self.base_layer = quantized_like(self.base_layer, new.to(W.dtype))
        else:
            with torch.no_grad():
                self.base_layer.weight.copy_(new.t() if self.kind == "conv1d" else new)
        if not self.is_feedforward and self.base_layer.bias is not None:
            with torch.no_grad():
                self.base_layer.bias.mul_(s.to(self.base_layer.bias.dtype))

    def get_base_layer(self):
        return self.base_layer
