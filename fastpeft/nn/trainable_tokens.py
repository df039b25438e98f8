"""Trainable tokens (LoRA's ``trainable_token_indices``): a few rows of an embedding matrix train.

PEFT's ``TrainableTokensWrapper`` / ``TrainableTokensLayer``, with PEFT's module layout, so the
state-dict keys are PEFT's::

    <P>.token_adapter.base_layer.weight                 the frozen base weight [V, D]
    <P>.token_adapter.trainable_tokens_delta.<adapter>  the adapter's rows [n_tokens, D]

Row ``k`` of ``trainable_tokens_delta[a]`` *replaces* (not adds to) row ``token_indices[a][k]`` of the
base weight while adapter ``a`` runs; it starts as a copy of that row (so a new adapter changes
nothing). On an ``nn.Embedding`` base the looked-up vectors of the listed tokens are the delta
rows (times the base's ``embed_scale`` if it has one, e.g. Gemma); on an ``nn.Linear`` base
(an LM head, ``weight`` [V, D]) the logits of the listed tokens are ``x @ delta.T``.

Weight tying: an output layer whose weight *is* the input embedding's (``tie_word_embeddings``)
gets a *tied* wrapper that holds no state of its own: it shares the source wrapper's
``trainable_tokens_delta`` container (so its state-dict key exists, as in PEFT, but the file
holds the rows once, under the input embedding), its token lists and its merge state.

The forward does not build the merged ``[V, D]`` matrix PEFT builds on every call: it runs the
base layer and overwrites the listed tokens' rows (embedding) or columns (LM head), which gives
PEFT's outputs and gradients. The exact PEFT formula (the merged matrix in ``F.embedding``) runs
where the lookup's own options would make them differ (``max_norm``, ``scale_grad_by_freq``,
``sparse``, a ``padding_idx`` among the listed tokens).

Several active adapters on one layer apply together when their token lists are disjoint
(overlapping lists raise, as PEFT's layer does); in a mixed batch each row uses its own adapter's
rows, and rows of adapters without tokens on this layer get the base rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterLayer

__all__ = ["TrainableTokensLayer", "TrainableTokensWrapper", "check_token_indices"]


def check_token_indices(ids, where: str) -> list[int]:
    """``ids`` as a list of distinct non-negative ints, else ValueError naming ``where``. PEFT
    accepts repeated or negative ids, but then which value a row takes is undefined (its
    ``index_copy`` with repeated indices) or the forward fails."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
        raise ValueError(f"trainable_token_indices for {where!r} must be a list of token ids, got {ids!r}")
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad:
        raise ValueError(f"trainable_token_indices for {where!r}: token ids must be non-negative ints, got {bad[:5]}")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if list(ids).count(i) > 1})
        raise ValueError(f"trainable_token_indices for {where!r} repeats token id(s) {dup[:5]}: PEFT's result for "
                         "a repeated row is undefined; list each token once")
    if not ids:
        raise ValueError(f"trainable_token_indices for {where!r} is empty")
    return [int(i) for i in ids]


def _base_kind(base: nn.Module) -> str:
    """"embedding" or "linear": the bases whose forward this layer reproduces; else ValueError."""
    if isinstance(base, nn.Embedding):
        if type(base).forward is nn.Embedding.forward or hasattr(base, "embed_scale"):
            return "embedding"
    elif isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward:
        if base.bias is not None:
            raise ValueError("trainable_token_indices on an nn.Linear with a bias is not supported by fastpeft: "
                             "PEFT's TrainableTokensLayer drops the bias there (F.linear(x, W))")
        return "linear"
    raise ValueError(f"trainable_token_indices cannot be applied to modules of type {type(base).__name__}: "
                     "fastpeft trains token rows of nn.Embedding (plain, or scaled by embed_scale) and of tied "
                     "bias-free nn.Linear LM heads")


class TrainableTokensLayer(nn.Module):
    """PEFT's ``token_adapter``: ``base_layer``, ``trainable_tokens_delta`` (ParameterDict adapter ->
    [n_tokens, D]) and ``token_indices`` (adapter -> list of n_tokens row ids). A tied layer
    (``tied`` given) registers the very same container and dict as ``tied``'s."""

    def __init__(self, base_layer: nn.Module, tied: TrainableTokensLayer | None = None):
        super().__init__()
        self.base_layer = base_layer
        self._tied = [tied] if tied is not None else []  # a list: not a submodule (not saved twice)
        if tied is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.token_indices: dict[str, list[int]] = {}
        else:
            self.trainable_tokens_delta = tied.trainable_tokens_delta
            self.token_indices = tied.token_indices

    @property
    def tied_adapter(self) -> TrainableTokensLayer | None:
        return self._tied[0] if self._tied else None

    def forward(self, *args, **kwargs):
        raise RuntimeError("TrainableTokensLayer is the state of a TrainableTokensWrapper; call the wrapper")


class TrainableTokensWrapper(AdapterLayer):
    """Trainable token rows on an embedding (or a tied LM head), any number of named adapters.

    ``source``: the input embedding's wrapper this one is tied to (its base weight is the same
    tensor); the tied wrapper adds no parameters and follows the source's merges.
    """

    adapter_param_dicts = ("trainable_tokens_delta",)

    def __init__(self, base_layer: nn.Module, source: TrainableTokensWrapper | None = None):
        nn.Module.__init__(self)
        self._kind = _base_kind(base_layer)
        self.token_adapter = TrainableTokensLayer(base_layer, None if source is None else source.token_adapter)
        self._source = [source] if source is not None else []
        self._init_adapter_state()
        if source is not None:
            self.merged_adapters = source.merged_adapters  # one weight, one merge state
        self._originals: dict[str, Tensor] = {}  # rows a merge overwrote, per adapter
        self._lookup_cache: dict = {}

    # ----- PEFT's attributes ---------------------------------------------------------------
    @property
    def base_layer(self) -> nn.Module:  # noqa: D401 - PEFT compatibility
        return self.token_adapter.base_layer

    @property
    def trainable_tokens_delta(self) -> nn.ParameterDict:
        return self.token_adapter.trainable_tokens_delta

    @property
    def token_indices(self) -> dict[str, list[int]]:
        return self.token_adapter.token_indices

    @property
    def tied_source(self) -> TrainableTokensWrapper | None:
        """The input embedding's wrapper this one is tied to, or None."""
        return self._source[0] if self._source else None

    @property
    def weight(self) -> Tensor:
        """As PEFT's wrapper: the base weight with the active adapters' rows written in (a new
        [V, D] tensor), or the base weight itself when none applies (disabled, merged, none)."""
        w = self.base_layer.weight
        if self.disable_adapters or self.merged:
            return w
        names = [n for n in self.active_adapters if n in self.trainable_tokens_delta]
        return self._merged_weight(names) if names else w

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name.startswith("_") or not modules or "token_adapter" not in modules:
                raise
            return getattr(modules["token_adapter"].base_layer, name)  # num_embeddings, padding_idx, ...

    # ----- adapters ---------------------------------------------------------------------------
    def add_adapter(self, name: str, token_indices=None, **others) -> None:
        """Add adapter ``name`` training rows ``token_indices`` (of the base weight) here; a tied
        wrapper takes no indices (it uses the source's). Other keyword arguments are another
        method's (LoRA's r, lora_alpha ...): refused."""
        if others:
            raise ValueError(
                "this module holds trainable tokens (trainable_token_indices); LoRA on it is not supported "
                "(PEFT refuses LoRA and trainable tokens on one module too): leave it out of target_modules")
        src = self.tied_source
        if src is not None:
            if token_indices is not None:
                raise ValueError("a tied trainable-tokens layer uses its input embedding's token_indices")
            if name not in self.trainable_tokens_delta:
                raise ValueError(f"adapter {name!r} has no trainable tokens on the input embedding this layer is tied to")
            self._register(name)
            self._lookup_cache.clear()
            self.set_adapter(self._active)
            return
        ids = check_token_indices(token_indices, name)
        w = self.base_layer.weight
        rows = w.shape[0]
        if max(ids) >= rows:
            raise ValueError(f"trainable_token_indices of adapter {name!r}: token id {max(ids)} is out of range for "
                             f"a weight of {rows} rows")
        self._register(name)
        with torch.no_grad():
            values = w[torch.tensor(ids, device=w.device)].detach().clone()
        self.token_indices[name] = ids
        self.trainable_tokens_delta[name] = nn.Parameter(values, requires_grad=True)
        self._lookup_cache.clear()
        self.set_adapter(self._active)

    def _remove(self, name: str) -> None:
        if self.tied_source is None:
            self.token_indices.pop(name, None)
        self._originals.pop(name, None)
        self._lookup_cache.clear()

    def _apply(self, fn, *args, **kwargs):
        self._lookup_cache.clear()  # index tensors follow the weight's device
        return super()._apply(fn, *args, **kwargs)

    # ----- lookups ------------------------------------------------------------------------------
    def _index(self, name: str, device) -> Tensor:
        """The adapter's row ids [n] as a long tensor on ``device`` (cached)."""
        key = ("index", name, device)
        t = self._lookup_cache.get(key)
        if t is None:
            t = self._lookup_cache[key] = torch.tensor(self.token_indices[name], dtype=torch.long, device=device)
        return t

    def _hits(self, name: str, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(hit, slot)`` of the same shape as ``ids``: whether each id is one of the adapter's
        tokens, and then its row in the delta (0 elsewhere)."""
        key = ("sorted", name, ids.device, ids.dtype)
        cached = self._lookup_cache.get(key)
        if cached is None:
            idx = self._index(name, ids.device)
            ordered, order = torch.sort(idx)
            cached = self._lookup_cache[key] = (ordered.to(ids.dtype), order)
        ordered, order = cached
        pos = torch.searchsorted(ordered, ids).clamp_(max=ordered.numel() - 1)
        return ordered[pos] == ids, order[pos]

    def _check_overlap(self, names) -> None:
        """PEFT's ``_check_overlapping_tokens``: adapters applied together (merged ones
        included) must list disjoint tokens."""
        seen: set = set()
        for n in dict.fromkeys([*self.merged_adapters, *names]):
            ids = set(self.token_indices[n])
            if seen & ids:
                raise ValueError(
                    f"Token indices of adapter {n} are already defined and would result in undefined merging "
                    "behavior. Only disjunct token indices are currently supported.")
            seen |= ids

    def _merged_weight(self, names) -> Tensor:
        """The base weight with the rows of ``names`` replaced (PEFT's ``get_merged_weights``)."""
        w = self.base_layer.weight
        for n in names:
            w = w.index_copy(0, self._index(n, w.device), self.trainable_tokens_delta[n].to(w))
        return w

    def _exact(self, names) -> bool:
        """Whether PEFT's formula must run (lookup options under which overwriting rows differs)."""
        b = self.base_layer
        if self._kind != "embedding":
            return False
        if b.max_norm is not None or b.scale_grad_by_freq or b.sparse:
            return True
        return b.padding_idx is not None and any(b.padding_idx in self.token_indices[n] for n in names)

    def _embed_scale(self) -> Tensor | None:
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is None:
            return None
        w = self.base_layer.weight
        if isinstance(scale, (int, float)):
            return torch.tensor(scale, device=w.device, dtype=w.dtype)
        if isinstance(scale, Tensor) and scale.numel() == 1:
            return scale
        raise ValueError(f"embed_scale of {type(self.base_layer).__name__} must be a scalar, got shape {tuple(scale.shape)}")

    def _run(self, x: Tensor, names, base_out: Tensor | None = None) -> Tensor:
        """The layer's output for input ``x`` with the rows of ``names`` (disjoint) in place.
        ``base_out``: the base layer's output for ``x`` when already computed."""
        b = self.base_layer
        if self._exact(names):  # PEFT's formula
            out = F.embedding(x, self._merged_weight(names), b.padding_idx, b.max_norm, b.norm_type,
                              b.scale_grad_by_freq, b.sparse)
            scale = self._embed_scale()
            return out if scale is None else out * scale.to(out.dtype)
        out = b(x) if base_out is None else base_out
        if self._kind == "embedding":
            scale = self._embed_scale()
            for n in names:
                hit, slot = self._hits(n, x)
                rows = self.trainable_tokens_delta[n].to(b.weight.dtype)[slot]  # [*x.shape, D]
                if scale is not None:
                    rows = rows * scale.to(rows.dtype)
                out = torch.where(hit.unsqueeze(-1), rows.to(out.dtype), out)
            return out
        for n in names:  # a bias-free LM head: the listed tokens' logits come from the delta rows
            cols = F.linear(x, self.trainable_tokens_delta[n].to(b.weight.dtype))  # [..., n_tokens]
            out = out.index_copy(out.dim() - 1, self._index(n, out.device), cols.to(out.dtype))
        return out

    def _forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        names = self._adapters_to_run(self.trainable_tokens_delta)
        sel = self._call_selection()
        if not names:
            if sel is not None and names is not None:
                self._rows_per_name(x.shape[0] if x.dim() > 0 else 1, sel)  # validates the batch length
            return self.base_layer(x, *args, **kwargs)
        if args or kwargs:
            raise TypeError(f"{type(self).__name__}: the base layer's extra arguments are not supported while trainable "
                            f"tokens apply (PEFT drops them); got {len(args)} positional, {sorted(kwargs)}")
        if sel is None:
            if len(names) > 1:
                self._check_overlap(names)
            return self._run(x, names)
        result = self.base_layer(x)
        for n, rows in self._row_groups(x.shape[0], names, sel):
            if rows:
                idx = torch.tensor(rows, device=x.device)
                part = self._run(x[idx], [n], None if self._exact([n]) else result[idx])
                result = result.index_copy(0, idx, part.to(result.dtype))
        return result

    # ----- merging ----------------------------------------------------------------------------
    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        """Write the adapters' rows into the base weight (PEFT's merge: rows replaced; a tied
        wrapper merges through its source, once for both since the weight is shared)."""
        src = self.tied_source
        if src is not None:
            src.merge(adapter_names, safe_merge=safe_merge)
            return
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n in self.trainable_tokens_delta and n not in self.merged_adapters]
        names = list(dict.fromkeys(names))
        if not names:
            return
        self._check_overlap(names)
        w = self.base_layer.weight
        with torch.no_grad():
            if safe_merge:  # checked on a copy first: a broken adapter leaves the weight as it was
                merged = w
                for n in names:
                    merged = merged.index_copy(0, self._index(n, w.device), self.trainable_tokens_delta[n].to(w))
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs detected in the merged weights. The adapter {n} seems to be broken")
            for n in names:
                idx = self._index(n, w.device)
                self._originals[n] = w[idx].clone()
                w.index_copy_(0, idx, self.trainable_tokens_delta[n].to(w))
                self.merged_adapters.append(n)

    def unmerge(self) -> None:
        """Put back the rows the merges overwrote (latest merge first)."""
        src = self.tied_source
        if src is not None:
            src.unmerge()
            return
        w = self.base_layer.weight
        with torch.no_grad():
            while self.merged_adapters:
                n = self.merged_adapters.pop()
                original = self._originals.pop(n, None)
                if original is not None:
                    w.index_copy_(0, self._index(n, w.device), original.to(w))

    def get_delta_weight(self, adapter: str) -> Tensor:
        """The adapter's rows [n_tokens, D] (they replace rows ``token_indices[adapter]``)."""
        return self.trainable_tokens_delta[adapter]
