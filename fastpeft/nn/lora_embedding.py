"""LoRA on nn.Embedding: ``lora_embedding_A.<name>`` [r, V], ``lora_embedding_B.<name>`` [D, r],
and for DoRA ``lora_magnitude_vector.<name>.weight`` [D] (:mod:`fastpeft.nn.dora_embedding`).

The bank's stacks are ``a [S, R, V]`` and ``bt [S, R, D]`` (B transposed; unpaged), read by
``torch.ops.fastpeft.adapter_embedding``; the parameters are views of their rows. A DoRA
adapter runs fused when it is a row's only adapter (one active adapter, or a mixed batch): the
lookup times its per-slot scale ``g`` [D]; after another active adapter, or with a gradient, it
runs PEFT's unfused steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import _schema  # noqa: F401  (defines torch.ops.fastpeft.*)
from . import dora_embedding
from ._base_kinds import adapter_device, in_out_features, runs_fused
from .bank import AdapterBank, Entry
from .base import AdapterLayer, packs_outside_inference_mode
from .lora import lora_scaling

_is_compiling = torch.compiler.is_compiling


class LoraEmbedding(AdapterLayer):
    """LoRA adapters on an ``nn.Embedding`` base."""

    adapter_param_dicts = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    bank_class = AdapterBank

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = in_out_features(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA: name -> DoraMagnitude ([D] weight)
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.use_dora: dict[str, bool] = {}
        self._dora_cache: dict = {}  # name -> (key, g [D]): see dora_embedding.scale_of
        self._dora_merge_norm: dict[str, Tensor] = {}  # name -> the norm its merge used

    def add_adapter(self, name, r, lora_alpha, lora_dropout=0.0, use_rslora=False, use_dora=False,
                    lora_bias=False, init_lora_weights=True, dtype=None):
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if lora_bias:
            raise ValueError("lora_bias is not supported on embedding layers (PEFT neither)")
        self._register(name)
        w = self.base_layer.weight
        dtype = dtype or w.dtype
        kw = dict(device=adapter_device(self.base_layer), dtype=dtype)
        self._set_config(name, r, lora_alpha, use_rslora, nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity(),
                         use_dora=use_dora)
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
        if use_dora:  # PEFT: after the move to the base's device and dtype
            mag = dora_embedding.new_magnitude(self, name)
            self.lora_magnitude_vector[name] = mag.to(dtype=self.lora_embedding_A[name].dtype)
        self.set_adapter(self._active)

    def _set_config(self, name, r, lora_alpha, use_rslora, dropout: nn.Module, scaling: float | None = None,
                    use_dora: bool = False) -> None:
        """An adapter's hyper-parameters (as ``LoraLinear._set_config``, without bias)."""
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = lora_scaling(r, lora_alpha, use_rslora) if scaling is None else scaling
        self.use_dora[name] = bool(use_dora)
        self.lora_dropout[name] = dropout

    def _remove(self, name):
        for d in (self.r, self.lora_alpha, self.scaling, self.use_dora, self._dora_cache, self._dora_merge_norm):
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
        (the lookup renormalizes the weight), an ``embed_scale``, or a gradient the adapters need."""
        return (not runs_fused(self.base_layer) or self.base_layer.max_norm is not None
                or getattr(self.base_layer, "embed_scale", None) is not None
                or (torch.is_grad_enabled() and any(p.requires_grad for n in names for p in self._params_of(n))))

    def _forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        bank = self.bank
        if _is_compiling() and not (args or kwargs or self.disable_adapters or self.merged_adapters or not bank.ready
                                    or self._needs_unfused(self._adapters) or self._has_dora(self._adapters)):
            # compiled: slot tensors and stacks only, no names (see LoraLinear._forward_traced)
            return self._forward_fused(x)
        names, sel = self._names_and_selection(self.lora_embedding_A, x.shape[0] if x.dim() > 0 else 1)
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if args or kwargs or self._needs_unfused(names) or (self._has_dora(names) and (_is_compiling() or (
                sel is None and len(names) > 1))):  # DoRA after another adapter: PEFT's sequential steps
            return self._forward_unfused(x, names, *args, **kwargs)
        if _is_compiling():
            if not bank.ready:  # no repacking while tracing
                return self._forward_unfused(x, names)
        elif bank.needs_pack(names, self._watched, self.scaling):
            self._pack()
        return self._forward_fused(x, names if self._has_dora(names) else None)

    def _has_dora(self, names) -> bool:
        return any(self.use_dora.get(n, False) for n in names)

    def _embed_scale(self) -> Tensor | None:
        """The base's ``embed_scale`` (e.g. Gemma's scaled embeddings) as a tensor, or None: PEFT
        multiplies the adapters' output by it too (``_get_embed_scale``)."""
        base = self.base_layer
        scale = getattr(base, "embed_scale", None)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
        if isinstance(scale, Tensor):
            if scale.numel() != 1:
                raise ValueError(f"embed_scale of {type(base).__name__} has {scale.numel()} elements; PEFT (and "
                                 f"fastpeft) expect a scalar")
            return scale
        return None

    def _forward_fused(self, x: Tensor, dora_names=None) -> Tensor:
        """One call of ``torch.ops.fastpeft.adapter_embedding`` on the bank's stacks; with
        ``dora_names`` (the adapters of the call, some DoRA, one per row) the result times each
        row's DoRA scale (:func:`fastpeft.nn.dora_embedding.slot_scales`)."""
        bank = self.bank
        ids = x.reshape(-1)
        rows, batch = ids.shape[0], x.shape[0] if x.dim() > 0 else 1
        ts = bank.state_token_slots(rows, batch) if _is_compiling() else bank.token_slots(rows, batch, self._call_selection())
        y = torch.ops.fastpeft.adapter_embedding(ids, self.base_layer.weight, bank.a, bank.bt, bank.scales, ts)
        if dora_names is not None:
            if self._call_selection() is None:  # one adapter (several with DoRA run unfused)
                g = dora_embedding.scale_of(self, dora_names[0])
            else:
                g = dora_embedding.slot_scales(self)[ts[:, 0].long()]
            y = (y * g).to(y.dtype)
        return y.reshape(*x.shape, self.embedding_dim)

    def _forward_unfused(self, x, names, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        embed_scale = self._embed_scale()
        sel = self._call_selection()
        if sel is not None:
            for n, rows in self._row_groups(x.shape[0], names, sel):
                result[rows] = self._adapter_step(n, x[rows], result[rows], embed_scale).to(out_dtype)
            return result
        for n in names:
            result = self._adapter_step(n, x, result, embed_scale)
        return result.to(out_dtype)

    def _adapter_step(self, n: str, x: Tensor, result: Tensor, embed_scale: Tensor | None) -> Tensor:
        """PEFT's step of adapter ``n`` on the running output ``result`` of the lookup of ``x``."""
        if self.use_dora.get(n):
            return dora_embedding.apply(self, n, x, result, embed_scale)
        out = (self._embed(x, self.lora_embedding_A[n].T) @ self.lora_embedding_B[n].T) * self.scaling[n]
        if embed_scale is not None:
            out = out * embed_scale.to(out.dtype)
        return result + out

    def _delta_weight(self, name):
        """scaling * (B @ A).T as [V, D], the base weight's layout."""
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]

    def get_delta_weight(self, adapter: str) -> Tensor:
        """PEFT's ``get_delta_weight``."""
        return self._delta_weight(adapter)

    def merge(self, adapter_names=None, safe_merge=False):
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n in self.lora_embedding_A and n not in self.merged_adapters]
        base0 = None
        for n in names:
            with torch.no_grad():
                w = self.base_layer.weight
                if self.use_dora.get(n):
                    base0 = dora_embedding.base_weight_before_merges(self) if base0 is None else base0
                    new = dora_embedding.merged(self, n, w, base0)
                else:
                    new = w + self._delta_weight(n).to(w.dtype)
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(f"NaNs detected in the merged weights; adapter {n!r} seems to be broken")
                self.base_layer.weight.copy_(new)
            self.merged_adapters.append(n)

    def unmerge(self):
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            with torch.no_grad():
                w = self.base_layer.weight
                if self.use_dora.get(n):
                    w.copy_(dora_embedding.unmerged(self, n, w))
                else:
                    w -= self._delta_weight(n).to(w.dtype)
