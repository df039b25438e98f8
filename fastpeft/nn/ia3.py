"""IA3 layers: a learned per-feature scale on a linear-like base.

PEFT's name ``ia3_l.<name>``: shape [1, K] for feed-forward modules (scales the input) and
[N, 1] otherwise (scales the output, bias included). Several active adapters multiply.
The fused operator receives the product as ``input_scale`` [K] / ``output_scale`` [N], or
per row ([M, K] / [M, N]) in a mixed batch.

Under ``torch.compile`` the scales come from the bank's stack ``[S + 1, D]`` of every adapter's vector
(row S: ones, "no adapter"), indexed with the slot tensors that state changes keep current, so a
compiled graph never reads adapter names: switching adapters, and mixed batches of one size,
re-use it (as for the LoRA layers). The ``ia3_l`` parameters are views of their rows, so
in-place updates are seen without repacking.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..parallel import tensor_parallel as _tensor_parallel
from ._base_kinds import adapter_device, runs_fused, weight_nk
from .bank import ScaleBank
from .base import packs_outside_inference_mode
from .linear_base import LinearLayerBase


class IA3Linear(LinearLayerBase):
    """IA3 adapters (a learned scale per input or output feature) on a linear-like base."""

    adapter_param_dicts = ("ia3_l",)
    bank_class = ScaleBank

    def __init__(self, base_layer: nn.Module, is_feedforward: bool):
        super().__init__(base_layer)
        self.is_feedforward = bool(is_feedforward)
        self.ia3_l = nn.ParameterDict()

    def add_adapter(self, name: str, init_ia3_weights: bool = True, dtype=None, **_) -> None:
        self._register(name)
        w = self.base_layer.weight
        dtype = dtype or (w.dtype if w.is_floating_point() else torch.float32)
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        make = torch.ones if init_ia3_weights else torch.randn
        t = make(shape, device=adapter_device(self.base_layer), dtype=dtype)
        self.ia3_l[name] = nn.Parameter(t)
        if self._tp is not None:  # this rank's shard, equal on every rank (fastpeft/parallel)
            _tensor_parallel.adopt(self, name)
        self.set_adapter(self._active)

    def _scale_vector(self, names) -> Tensor:
        """Product of the named adapters' scales, flattened: [K] (feed-forward) or [N]."""
        s = self.ia3_l[names[0]].flatten()
        for n in names[1:]:
            s = s * self.ia3_l[n].flatten()
        return s

    def _row_scales(self, x: Tensor, sel) -> Tensor:
        """[batch, D] per-row scales for mixed batch ``sel`` (1 for rows without an adapter)."""
        row_names = self._row_names(x.shape[0], sel)  # validated, expanded for beams
        d = self.in_features if self.is_feedforward else self.out_features
        ones = torch.ones(d, dtype=next(iter(self.ia3_l.values())).dtype, device=x.device)
        rows = [self.ia3_l[n].flatten() if n in self.ia3_l else ones for n in row_names]
        return torch.stack(rows)

    @packs_outside_inference_mode
    def _pack(self) -> None:
        d = self.in_features if self.is_feedforward else self.out_features
        self.bank.pack([self.ia3_l[n] for n in self._adapters], d)

    def _traced_scales(self, x: Tensor, M: int):
        """(input_scale, output_scale) for the fused operator from the bank's stack and slot
        tensors, or None when the name-based route must run. Multiplies the active adapters'
        rows one after the other, in PEFT's order (bit-equal to the eager product)."""
        bank = self.bank
        if bank.stale or bank.stack is None or self.disable_adapters or self.merged_adapters:
            return None
        stack = bank.stack
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.ia3_l.values()):
            return None  # training: the name-based route, through the parameters
        none = stack.shape[0] - 1
        ts = bank.state_token_slots(M, x.shape[0] if x.dim() > 1 else 1)  # [1, J] or [M, 1]
        idx = torch.where(ts < 0, none, ts).long()
        if bank.rows is None:
            rows = stack.index_select(0, idx[0])  # [J, D]
            scale = rows[0]
            for j in range(1, rows.shape[0]):
                scale = scale * rows[j]
        else:
            scale = stack.index_select(0, idx[:, 0])  # [M, D]
        return (scale, None) if self.is_feedforward else (None, scale)

    def _forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if torch.compiler.is_compiling():
            if not args and not kwargs and self.kind != "quant" and runs_fused(self.base_layer):
                x2 = x.reshape(-1, self.in_features)
                scales = self._traced_scales(x, x2.shape[0])
                if scales is not None:
                    return self._run_fused(x2, None, None, None, None, None, *scales).reshape(*x.shape[:-1], self.out_features)
        else:
            sel = self._call_selection()
            used = self.active_adapters if sel is None else dict.fromkeys(sel.names)
            if self.bank.needs_pack(used, self.ia3_l):
                self._pack()  # once per state change: ready for a compiled forward
        names, sel = self._names_and_selection(self.ia3_l, x.shape[0])
        if not names:
            return self.base_layer(x, *args, **kwargs)
        mixed = sel is not None
        if mixed:
            scale = self._row_scales(x, sel)  # [B, D]
            scale = scale.view(x.shape[0], *([1] * (x.dim() - 2)), -1)
        else:
            scale = self._scale_vector(names)
        previous_dtype = x.dtype
        fusable = runs_fused(self.base_layer) or _tensor_parallel.fusable(self)  # TP: the operator on local shards
        if args or kwargs or not fusable or (torch.is_grad_enabled() and scale.requires_grad):
            if self.is_feedforward:
                return self.base_layer((x * scale).to(previous_dtype), *args, **kwargs)
            result = self.base_layer(x, *args, **kwargs)
            return (result * scale).to(result.dtype)
        x2 = x.reshape(-1, self.in_features)
        if mixed:
            rows_per = x2.shape[0] // x.shape[0]
            scale = scale.reshape(x.shape[0], -1).repeat_interleave(rows_per, dim=0)
        in_s, out_s = (scale, None) if self.is_feedforward else (None, scale)
        y = self._run_fused(x2, None, None, None, None, None, in_s, out_s)
        return y.reshape(*x.shape[:-1], self.out_features)

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        wanted = self.active_adapters if adapter_names is None else adapter_names  # []: nothing, as in PEFT
        names = [n for n in wanted if n in self.ia3_l and n not in self.merged_adapters]
        if names:
            _tensor_parallel.refuse(self, "merging")
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
        self._set_base_weight(new.to(W.dtype) if self.kind == "quant" else new)
        if not self.is_feedforward and self.base_layer.bias is not None:
            with torch.no_grad():
                self.base_layer.bias.mul_(s.to(self.base_layer.bias.dtype))
