"""LoRA on nn.Embedding: ``lora_embedding_A.<name>`` [r, V], ``lora_embedding_B.<name>`` [D, r].

The bank's stacks are ``a [S, R, V]`` and ``bt [S, R, D]`` (B transposed; unpaged), read by
``torch.ops.fastpeft.adapter_embedding``; the parameters are views of their rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import _schema  # noqa: F401  (defines torch.ops.fastpeft.*)
from ._base_kinds import adapter_device, in_out_features, runs_fused
from .bank import AdapterBank, Entry
from .base import AdapterLayer, packs_outside_inference_mode
from .lora import lora_scaling

_is_compiling = torch.compiler.is_compiling


class LoraEmbedding(AdapterLayer):
    """LoRA adapters on an ``nn.Embedding`` base."""

    adapter_param_dicts = ("lora_embedding_A", "lora_embedding_B")
    bank_class = AdapterBank

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = in_out_features(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.use_dora: dict[str, bool] = {}

    def add_adapter(self, name, r, lora_alpha, lora_dropout=0.0, use_rslora=False, use_dora=False,
                    lora_bias=False, init_lora_weights=True, dtype=None):
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if use_dora:
            raise ValueError("DoRA on embeddings is not supported by fastpeft yet; use_dora=False for embedding layers")
        if lora_bias:
            raise ValueError("lora_bias is not supported on embedding layers (PEFT neither)")
        self._register(name)
        w = self.base_layer.weight
        dtype = dtype or w.dtype
        kw = dict(device=adapter_device(self.base_layer), dtype=dtype)
        self._set_config(name, r, lora_alpha, use_rslora, nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity())
        # PEFT's draws, in its order: randn A, randn B (CPU, default dtype), then for any init but
        # False (also "gaussian", "pissa...", "olora", "orthogonal": PEFT's Embedding has no branch
        # for them) A = 0 and B normal; then moved to the base's device and dtype
        A = torch.randn((r, self.num_embeddings))
        B = torch.randn((self.embedding_dim, r))
        with torch.no_grad():
            if init_lora_weights is not False:
                nn.init.zeros_(A)
                nn.init.normal_(B)
        if w.is_floating_point():
            A, B = A.to(w.dtype), B.to(w.dtype)
        self.lora_embedding_A[name] = nn.Parameter(A.to(**kw))
        self.lora_embedding_B[name] = nn.Parameter(B.to(**kw))
        self.set_adapter(self._active)

    def _set_config(self, name, r, lora_alpha, use_rslora, dropout: nn.Module, scaling: float | None = None) -> None:
        """An adapter's hyper-parameters (as ``LoraLinear._set_config``, without DoRA and bias)."""
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = lora_scaling(r, lora_alpha, use_rslora) if scaling is None else scaling
        self.use_dora[name] = False
        self.lora_dropout[name] = dropout

    def _remove(self, name):
        for d in (self.r, self.lora_alpha, self.scaling, self.use_dora):
            d.pop(name, None)
        if name in self.lora_dropout:
            del self.lora_dropout[name]

    def _watched(self, name: str) -> tuple:
        return (self.lora_embedding_A[name], self.lora_embedding_B[name])

    @packs_outside_inference_mode
    def _pack(self):
        names = self._adapters
        entries = [Entry(*self._watched(n), self.scaling[n], self._watched(n)) for n in names]
        self.bank.pack(entries, {n: self.scaling[n] for n in names}, paged=False)

    def _embed(self, ids: Tensor, weight: Tensor) -> Tensor:
        b = self.base_layer
        return F.embedding(ids, weight, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)

    def _needs_unfused(self, names) -> bool:
        """PEFT's unfused route: a base whose forward is not the plain lookup, ``max_norm``
        (the lookup renormalizes the weight), or a gradient the adapters need."""
        return (not runs_fused(self.base_layer) or self.base_layer.max_norm is not None
                or (torch.is_grad_enabled() and any(p.requires_grad for n in names for p in self._params_of(n))))

    def _forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        bank = self.bank
        if _is_compiling() and not (args or kwargs or self.disable_adapters or self.merged_adapters or not bank.ready
                                    or self._needs_unfused(self._adapters)):
            # compiled: slot tensors and stacks only, no names (see LoraLinear._forward_traced)
            return self._forward_fused(x)
        names = self._adapters_to_run(self.lora_embedding_A)
        if names is None:
            return self.base_layer(x, *args, **kwargs)
        sel = self._call_selection()
        if not names:
            if sel is not None:
                self._rows_per_name(x.shape[0] if x.dim() > 0 else 1, sel)  # validates the batch length
            return self.base_layer(x, *args, **kwargs)
        if args or kwargs or self._needs_unfused(names):
            return self._forward_unfused(x, names, *args, **kwargs)
        if _is_compiling():
            if not bank.ready:  # no repacking while tracing
                return self._forward_unfused(x, names)
        elif bank.needs_pack(names, self._watched, self.scaling):
            self._pack()
        return self._forward_fused(x)

    def _forward_fused(self, x: Tensor) -> Tensor:
        """One call of ``torch.ops.fastpeft.adapter_embedding`` on the bank's stacks."""
        bank = self.bank
        ids = x.reshape(-1)
        rows, batch = ids.shape[0], x.shape[0] if x.dim() > 0 else 1
        ts = bank.state_token_slots(rows, batch) if _is_compiling() else bank.token_slots(rows, batch, self._call_selection())
        y = torch.ops.fastpeft.adapter_embedding(ids, self.base_layer.weight, bank.a, bank.bt, bank.scales, ts)
        return y.reshape(*x.shape, self.embedding_dim)

    def _forward_unfused(self, x, names, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        sel = self._call_selection()
        if sel is not None:
            for n, rows in self._row_groups(x.shape[0], names, sel):
                after_a = self._embed(x[rows], self.lora_embedding_A[n].T)
                result[rows] = result[rows] + (after_a @ self.lora_embedding_B[n].T) * self.scaling[n]
            return result
        for n in names:
            after_a = self._embed(x, self.lora_embedding_A[n].T)
            result = result + (after_a @ self.lora_embedding_B[n].T) * self.scaling[n]
        return result.to(out_dtype)

    def _delta_weight(self, name):
        """scaling * (B @ A).T as [V, D], the base weight's layout."""
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]

    def get_delta_weight(self, adapter: str) -> Tensor:
        """PEFT's ``get_delta_weight``."""
        return self._delta_weight(adapter)

    def merge(self, adapter_names=None, safe_merge=False):
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n in self.lora_embedding_A and n not in self.merged_adapters]
        for n in names:
            with torch.no_grad():
                new = self.base_layer.weight + self._delta_weight(n).to(self.base_layer.weight.dtype)
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(f"NaNs detected in the merged weights; adapter {n!r} seems to be broken")
                self.base_layer.weight.copy_(new)
            self.merged_adapters.append(n)

    def unmerge(self):
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            with torch.no_grad():
                self.base_layer.weight -= self._delta_weight(n).to(self.base_layer.weight.dtype)
