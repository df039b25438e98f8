"""IA3 layers: a learned per-feature scale on a linear-like base.

PEFT's name ``ia3_l.<name>``: shape [1, K] for feed-forward modules (scales the input) and
[N, 1] otherwise (scales the output, bias included). Several active adapters multiply.
The fused operator receives the product as ``input_scale`` [K] / ``output_scale`` [N], or
per row ([M, K] / [M, N]) in a mixed batch.

Under ``torch.compile`` the scales come from a stack ``[S + 1, D]`` of every adapter's vector
(row S: ones, "no adapter"), indexed with the slot tensors that state changes keep current, so a
compiled graph never reads adapter names: switching adapters, and mixed batches of one size,
re-use it (as for the LoRA layers). The ``ia3_l`` parameters are views of their rows, so
in-place updates are seen without repacking.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..ops import _schema  # noqa: F401
from ._base_kinds import base_kind, fused_forward_ok, in_out_features, weight_nk
from .base import AdapterLayer, packs_outside_inference_mode


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
        make = torch.ones if init_ia3_weights else torch.randn
        t = make(shape, device=w.device, dtype=dtype)
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

    # ----- the stack read by compiled forwards -----------------------------------------------
    @packs_outside_inference_mode
    def _pack(self) -> None:
        """Rows ``[S + 1, D]``: the adapters' vectors in slot order, then ones. Parameters of one
        dtype and device become views of their rows; otherwise no stack is kept (compiled
        forwards then take the name-based path)."""
        names = self._adapters
        params = [self.ia3_l[n] for n in names]
        self._packed = {}
        self._dirty = False
        self._invalidate()
        if not params or any(p.dtype != params[0].dtype or p.device != params[0].device for p in params):
            return
        d = self.in_features if self.is_feedforward else self.out_features
        stack = torch.ones(len(names) + 1, d, dtype=params[0].dtype, device=params[0].device)
        with torch.no_grad():
            for s, (n, p) in enumerate(zip(names, params, strict=True)):
                stack[s].copy_(p.flatten())
                self.ia3_l[n].data = stack[s].view(p.shape)
        from torch._dynamo import maybe_mark_dynamic

        maybe_mark_dynamic(stack, 0)  # adding/deleting adapters keeps the graph
        self._packed = {"stack": stack, "ptrs": {n: self.ia3_l[n].data_ptr() for n in names}}

    def _pack_stale(self) -> bool:
        """Stack missing, or a parameter this forward uses replaced since it was made (eager
        check of storage pointers; a compiled forward cannot make it)."""
        if self._dirty or not self._packed:
            return bool(self._adapters)
        ptrs = self._packed["ptrs"]
        used = self.active_adapters if self._mixed is None else dict.fromkeys(self._mixed)
        return any(n in ptrs and ptrs[n] != self.ia3_l[n].data_ptr() for n in used)

    def _traced_scales(self, x: Tensor, M: int):
        """(input_scale, output_scale) for the fused operator from the stack and the slot
        tensors, or None when the name-based path must run. Multiplies the active adapters'
        rows one after the other, in PEFT's order (bit-equal to the eager product)."""
        if self._dirty or not self._packed or self.disable_adapters or self.merged_adapters:
            return None
        stack = self._packed["stack"]
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.ia3_l.values()):
            return None  # training: the name-based path, through the parameters
        none = stack.shape[0] - 1
        ts = self.token_slots(M, x.shape[0] if x.dim() > 1 else 1)  # [1, J] or [M, 1]
        idx = torch.where(ts < 0, none, ts).long()
        if self._row_slots is None:
            rows = stack.index_select(0, idx[0])  # [J, D]
            scale = rows[0]
            for j in range(1, rows.shape[0]):
                scale = scale * rows[j]
        else:
            scale = stack.index_select(0, idx[:, 0])  # [M, D]
        return (scale, None) if self.is_feedforward else (None, scale)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if kwargs and "adapter_names" in kwargs:
            return self._forward_with_row_names(x, args, kwargs)
        if torch.compiler.is_compiling():
            if not args and not kwargs and self.kind != "quant" and fused_forward_ok(self.base_layer):
                K, N = self.in_features, self.out_features
                x2 = x.reshape(-1, K)
                scales = self._traced_scales(x, x2.shape[0])
                if scales is not None:
                    W = self.base_layer.weight
                    W = W.t() if self.kind == "conv1d" else W
                    y = torch.ops.fastpeft.adapter_linear(x2, W, self.base_layer.bias, None, None, None, None, None,
                                                          *scales)
                    return y.reshape(*x.shape[:-1], N)
        elif self._pack_stale():
            self._pack()  # once per state change: ready for a compiled forward
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
        wanted = self.active_adapters if adapter_names is None else adapter_names  # []: nothing, as in PEFT
        names = [n for n in wanted if n in self.ia3_l and n not in self.merged_adapters]
        for n in names:
            s = self.ia3_l[n].detach().flatten()
            self._scale_base(s)
            self.merged_adapters.append(n)

    def unmerge(self) -> None:
        if self.merged_adapters:
            warnings.warn("Unmerge result can be inaccurate for (IA)^3.", stacklevel=2)
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            self._scale_base(1.0 / (self.ia3_l[n].detach().flatten() + 1e-8))

    def _scale_base(self, s: Tensor) -> None:
        W = weight_nk(self.base_layer)
        new = W.detach().float() * (s.float().view(1, -1) if self.is_feedforward else s.float().view(-1, 1))
        if self.kind == "quant":
            from ..quant.layers import quantized_like

            warnings.warn("merging into a quantized base: dequantize, merge, requantize (rounding errors possible)", stacklevel=2)
            self.base_layer = quantized_like(self.base_layer, new.to(W.dtype))
        else:
            with torch.no_grad():
                self.base_layer.weight.copy_(new.t() if self.kind == "conv1d" else new)
        if not self.is_feedforward and self.base_layer.bias is not None:
            with torch.no_grad():
                self.base_layer.bias.mul_(s.to(self.base_layer.bias.dtype))

    def get_base_layer(self):
        return self.base_layer
