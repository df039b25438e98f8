"""LoRA on ``torch.nn.MultiheadAttention`` with PEFT 0.21's semantics (``peft.tuners.lora.layer.MultiheadAttention``).

An adapted attention module ``<P>`` holds two LoRA pairs per adapter, under PEFT's names:

* ``<P>.lora_A.<name>.weight`` [r, E] and ``<P>.lora_B.<name>.weight`` [3E, r]: the delta of the
  packed input projection ``in_proj_weight`` [3E, E] (query, key and value at once);
* ``<P>.base_layer.out_proj.lora_A.<name>.weight`` [r, E] and ``...out_proj.lora_B.<name>.weight``
  [E, r]: the delta of the output projection, held by :class:`MhaOutProjLora`, which wraps the
  attention's own ``out_proj`` (its weight is then ``<P>.base_layer.out_proj.base_layer.weight``).

PyTorch's attention reads ``in_proj_weight`` and ``out_proj.weight`` directly (neither is called
as a module), so a forward runs the base attention's own ``forward`` on a shallow copy whose two
weights are the effective ones (nothing of the shared module is mutated, so concurrent calls
are safe); merging writes the deltas into the base weights in place.

PEFT 0.21 specifics kept here on purpose, so that adapters trained with PEFT give PEFT's outputs:

* the out_proj delta counts **twice** in PEFT's forward and merge (its ``merge`` writes
  ``W + dW`` and then calls ``out_proj.merge``, which adds ``dW`` again; huggingface/peft PR #3774
  proposes the fix). The effective out_proj weight is ``W + 2 s B A`` while its gradient is the
  one of ``W + s B A`` (PEFT's second add is on ``.data``): ``W + d + d.detach()`` here;
* with several active adapters each merge re-reads the weight's ``.data``, so only the last
  active adapter gets gradients (the values are the sum of all of them);
* ``lora_dropout`` has no effect (PEFT merges the weights; it never applies dropout here);
* the base weights get no gradient through the forward (PEFT adds the deltas to ``.data``).

Refused as in PEFT: ``_qkv_same_embed_dim=False`` (separate q/k/v weights), an ``out_proj`` that
is not an ``nn.Linear``, DoRA; refused by fastpeft: ``lora_bias`` (PEFT's merge would add the
bias to out_proj only) and initializations other than True / False / "gaussian". Mixed batches
(which PEFT refuses on this layer) run one attention call per adapter on its rows.
"""
from __future__ import annotations

import copy
import math
import types

import torch
from torch import Tensor, nn

from .base import AdapterLayer
from .lora import lora_scaling

_PLAIN_INITS = "True, False or 'gaussian'"
# nn.MultiheadAttention.forward's parameters after `query`, in order
_MHA_ARGS = ("key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def _lora_delta(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """``scale * B @ A`` [N, K], computed in fp32 for half-precision adapters on CPU (as PEFT does)."""
    half_cpu = A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16)
    if half_cpu:
        return ((B.float() @ A.float()) * scale).to(A.dtype)
    return (B @ A) * scale


def _new_pair(k: int, n: int, r: int, init, device, dtype) -> tuple[nn.Linear, nn.Linear]:
    """PEFT's lora_A [r, k] / lora_B [n, r] of a linear delta, drawn in PEFT's order (nn.Linear's
    own init on the CPU in fp32, then True: kaiming A, zero B; "gaussian": N(0, 1/r) A, zero B;
    False: as drawn), then moved to ``device`` / ``dtype``."""
    A, B = nn.Linear(k, r, bias=False), nn.Linear(r, n, bias=False)
    with torch.no_grad():
        if init is not False:
            if isinstance(init, str):
                nn.init.normal_(A.weight, std=1 / r)
            else:
                nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            nn.init.zeros_(B.weight)
    return A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)


class MhaOutProjLora(AdapterLayer):
    """The ``out_proj`` of an adapted attention: ``base_layer`` is the original linear [E, E],
    ``lora_A.<name>`` [r, E] and ``lora_B.<name>`` [E, r] its adapters. The owning
    :class:`LoraMultiheadAttention` adds, activates, enables, merges and deletes them; the
    attention reads only ``weight`` / ``bias``. Called as a module (PEFT's ``lora.Linear``
    semantics): ``base(x) + sum_active s * B A dropout(x)``."""

    adapter_param_dicts = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Linear):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}  # the owning attention's dict (one scaling per adapter)

    def _forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        names = self._adapters_to_run(self.lora_A)
        if not names:
            return result
        sel = self._call_selection()
        if sel is None:
            groups = [(n, slice(None)) for n in names]
        else:
            groups = self._row_groups(x.shape[0], names, sel)
        out = result
        for n, rows in groups:
            xl = x[rows].to(self.lora_A[n].weight.dtype)
            delta = self.lora_B[n](self.lora_A[n](self.lora_dropout[n](xl))) * self.scaling[n]
            if sel is None:
                out = out + delta
            else:
                out = out.clone() if out is result else out
                out[rows] = out[rows] + delta.to(out.dtype)
        return out.to(result.dtype)

    def delta(self, name: str) -> Tensor:
        """``s * B @ A`` [E, E] of adapter ``name`` (PEFT's ``out_proj.get_delta_weight``)."""
        return _lora_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    def get_delta_weight(self, adapter: str) -> Tensor:
        return self.delta(adapter)


class LoraMultiheadAttention(AdapterLayer):
    """LoRA adapters on an ``nn.MultiheadAttention`` base (see the module docstring). ``forward``
    takes ``nn.MultiheadAttention.forward``'s arguments and returns ``(attn_output,
    attn_weights)`` cast to the query's dtype, as PEFT's layer does."""

    adapter_param_dicts = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.MultiheadAttention):
        if not getattr(base_layer, "_qkv_same_embed_dim", True):
            raise ValueError("LoRA on nn.MultiheadAttention needs the same embed dim for query, key and value "
                             "(_qkv_same_embed_dim=True: one packed in_proj_weight), as in PEFT")
        if not isinstance(base_layer.out_proj, (nn.Linear, MhaOutProjLora)):
            raise TypeError(f"out_proj must be an instance of nn.Linear for LoRA on nn.MultiheadAttention, got "
                            f"{type(base_layer.out_proj).__name__}")
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.embed_dim, 3 * base_layer.embed_dim
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()  # kept for PEFT's attribute; PEFT's MHA never applies it
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self._eff_cache: tuple | None = None  # (key, in_proj [3E, E], out_proj [E, E]) for gradient-free calls

    # ----- PEFT's attribute surface (model code reads these from the attention module) ----------
    embed_dim = property(lambda self: self.base_layer.embed_dim)
    kdim = property(lambda self: self.base_layer.kdim)
    vdim = property(lambda self: self.base_layer.vdim)
    num_heads = property(lambda self: self.base_layer.num_heads)
    head_dim = property(lambda self: self.base_layer.head_dim)
    batch_first = property(lambda self: self.base_layer.batch_first)
    dropout = property(lambda self: self.base_layer.dropout)
    _qkv_same_embed_dim = property(lambda self: self.base_layer._qkv_same_embed_dim)
    in_proj_weight = property(lambda self: self.base_layer.in_proj_weight)
    in_proj_bias = property(lambda self: self.base_layer.in_proj_bias)
    bias_k = property(lambda self: self.base_layer.bias_k)
    bias_v = property(lambda self: self.base_layer.bias_v)
    add_zero_attn = property(lambda self: self.base_layer.add_zero_attn)

    @property
    def out_proj(self) -> nn.Module:
        """The base out-projection linear (PEFT: ``get_base_layer().out_proj.get_base_layer()``)."""
        out = self.base_layer.out_proj
        return out.base_layer if isinstance(out, MhaOutProjLora) else out

    @property
    def weight(self) -> Tensor:  # an attention module has no `weight`: the out_proj's (PEFT's dtype source)
        return self.out_proj.weight

    @property
    def dtype_source(self) -> nn.Module:
        """The module whose weight sets the adapters' dtype (fastpeft.layer_factory.add_to_layer), as PEFT's
        ``_move_adapter_to_device_of_base_layer`` takes the out_proj's for an attention."""
        return self.out_proj

    @property
    def bias(self) -> Tensor | None:
        return self.out_proj.bias

    def merge_masks(self, *args, **kwargs):
        return self.base_layer.merge_masks(*args, **kwargs)

    @property
    def _out(self) -> MhaOutProjLora:
        return self.base_layer.out_proj

    # ----- adapters -----------------------------------------------------------------------------
    def add_adapter(self, name, r, lora_alpha, lora_dropout=0.0, use_rslora=False, use_dora=False,
                    lora_bias=False, init_lora_weights=True, dtype=None) -> None:
        """Add adapter ``name``: LoRA pairs of rank ``r`` on in_proj and out_proj (PEFT's order:
        out_proj's drawn first). ``dtype``: the adapters' dtype (default: out_proj's weight's)."""
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if use_dora:
            raise ValueError("LoraMultiheadAttention does not support DoRA (PEFT neither); set use_dora=False "
                             "or leave the nn.MultiheadAttention out of target_modules")
        if lora_bias:
            raise ValueError("lora_bias is not supported by fastpeft on nn.MultiheadAttention (PEFT's merge would "
                             "fold the bias into out_proj only); set lora_bias=False")
        if not (init_lora_weights is True or init_lora_weights is False
                or (isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian")):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not supported on nn.MultiheadAttention; "
                             f"use {_PLAIN_INITS}")
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} already exists in {type(self).__name__}")
        if self.merged:
            raise ValueError("cannot add an adapter to a merged nn.MultiheadAttention; unmerge it first")
        base = self.base_layer
        w = self.out_proj.weight
        dtype = dtype or w.dtype
        E = base.embed_dim
        wrapped = not isinstance(base.out_proj, MhaOutProjLora)
        if wrapped:
            base.out_proj = MhaOutProjLora(base.out_proj)
            base.out_proj.scaling = self.scaling
        try:
            out_a, out_b = _new_pair(E, E, r, init_lora_weights, w.device, dtype)
            in_a, in_b = _new_pair(E, 3 * E, r, init_lora_weights, w.device, dtype)
        except BaseException:
            if wrapped:
                base.out_proj = self._out.base_layer
            raise
        self._register(name)
        self._out._register(name)
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = lora_scaling(r, lora_alpha, use_rslora)
        self.use_rslora[name], self.use_dora[name], self.lora_bias[name] = bool(use_rslora), False, False
        for layer, (a, b) in ((self._out, (out_a, out_b)), (self, (in_a, in_b))):
            layer.lora_A[name], layer.lora_B[name] = a, b
            layer.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.set_adapter(self._active)

    def _remove(self, name: str) -> None:
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.use_dora, self.lora_bias):
            d.pop(name, None)
        if name in self.lora_dropout:
            del self.lora_dropout[name]
        self._eff_cache = None

    def delete_adapter(self, name: str) -> None:
        """Delete ``name`` from in_proj and out_proj; with no adapter left, the attention gets its
        plain ``out_proj`` back (a rolled-back injection leaves the base module as it was)."""
        if name not in self._adapters:
            return
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting")
        out = self._out
        if name in out.lora_dropout:
            del out.lora_dropout[name]
        out.delete_adapter(name)
        super().delete_adapter(name)
        if not self._adapters:
            self.base_layer.out_proj = out.base_layer

    def set_adapter(self, names) -> None:
        super().set_adapter(names)
        if isinstance(self.base_layer.out_proj, MhaOutProjLora):
            self._out.set_adapter(names)

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        if isinstance(self.base_layer.out_proj, MhaOutProjLora):
            self._out.enable_adapters(enabled)

    def _params_of(self, name: str) -> list[Tensor]:
        out = super()._params_of(name)
        if isinstance(self.base_layer.out_proj, MhaOutProjLora):
            out += self._out._params_of(name)
        return out

    def delta(self, name: str) -> Tensor:
        """``s * B @ A`` [3E, E]: adapter ``name``'s delta of ``in_proj_weight``."""
        return _lora_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    def get_delta_weight(self, adapter: str) -> Tensor:
        """PEFT's ``get_delta_weight``: the in_proj delta [3E, E]."""
        return self.delta(adapter)

    # ----- forward ------------------------------------------------------------------------------
    def _effective_weights(self, names) -> tuple[Tensor, Tensor]:
        """``(in_proj [3E, E], out_proj [E, E])`` with the adapters ``names`` added as PEFT's
        forward-time merge adds them (module docstring); cached while no gradient is needed."""
        base, out = self.base_layer, self._out
        w_in, w_out = base.in_proj_weight, out.base_layer.weight
        grad = torch.is_grad_enabled() and any(p.requires_grad for n in names for p in self._params_of(n))
        key = None
        if not grad:
            ts = [w_in, w_out] + [p for n in names for p in self._params_of(n)]
            key = (tuple(names), tuple((t.data_ptr(), t._version, t.dtype) for t in ts),
                   tuple(self.scaling[n] for n in names))
            hit = self._eff_cache
            if hit is not None and hit[0] == key:
                return hit[1], hit[2]
        dtype = w_out.dtype
        e_in, e_out = w_in.detach(), w_out.detach()
        for n in names:
            e_in = e_in.detach() + self.delta(n).to(dtype)
            d = out.delta(n).to(dtype)
            e_out = e_out.detach() + d + d.detach()  # PEFT 0.21: out_proj's delta counts twice (see above)
        if key is not None:
            self._eff_cache = (key, e_in, e_out)
        return e_in, e_out

    def _attend(self, names, query: Tensor, args: tuple, kwargs: dict):
        """The base attention's forward with the effective weights of ``names`` (no adapter: the
        base module itself), on a shallow copy of the module: hooks, buffers and flags shared."""
        base = self.base_layer
        if not names:
            return self._run_plain(query, args, kwargs)
        e_in, e_out = self._effective_weights(names)
        proxy = copy.copy(base)
        proxy.__dict__["_parameters"] = {**base._parameters, "in_proj_weight": e_in}
        proxy.__dict__["_modules"] = {**base._modules,
                                      "out_proj": types.SimpleNamespace(weight=e_out, bias=self._out.base_layer.bias)}
        return proxy(query, *args, **kwargs)

    def _run_plain(self, query: Tensor, args: tuple, kwargs: dict):
        """The base attention alone (its out_proj read through the wrapper's ``weight``/``bias``)."""
        return self.base_layer(query, *args, **kwargs)

    def _forward(self, query: Tensor, *args, **kwargs):
        dtype = query.dtype
        names = self._adapters_to_run(self.lora_A)
        sel = self._call_selection() if names is not None else None
        if names is None:
            result = self._run_plain(query, args, kwargs)
        elif sel is not None:
            result = self._forward_mixed(names, sel, query, args, kwargs)
        else:
            result = self._attend(names, query, args, kwargs)
        attn, weights = result
        return attn.to(dtype), (weights.to(dtype) if weights is not None else None)

    def _forward_mixed(self, names, sel, query: Tensor, args: tuple, kwargs: dict):
        """A mixed batch: one attention call per adapter on its batch rows (rows of no adapter of
        this layer: the base attention), the outputs put back in row order."""
        if query.dim() != 3:
            raise ValueError(f"mixed batch: {type(self).__name__} got an unbatched query of shape "
                             f"{tuple(query.shape)}; a mixed batch needs one adapter per batch row")
        if len(args) > len(_MHA_ARGS):
            raise TypeError(f"nn.MultiheadAttention.forward takes at most {len(_MHA_ARGS) + 1} positional arguments")
        bound = dict(zip(_MHA_ARGS, args, strict=False))
        clash = sorted(set(bound) & set(kwargs))
        if clash:
            raise TypeError(f"nn.MultiheadAttention.forward got multiple values for {clash}")
        bound.update(kwargs)
        bdim = 0 if self.base_layer.batch_first else 1
        B = query.shape[bdim]
        row_names = self._row_names(B, sel)
        groups: dict = {}
        for i, n in enumerate(row_names):
            groups.setdefault(n if n in self.lora_A else None, []).append(i)
        outs, weights = None, None
        for n, rows in groups.items():
            idx = torch.tensor(rows, device=query.device)
            part = self._rows_call(bound, query, bdim, idx, B)
            res = self._attend([n] if n is not None else [], part["query"], (), {k: v for k, v in part.items()
                                                                                  if k != "query"})
            a, w = res
            if outs is None:
                shape = list(a.shape)
                shape[bdim] = B
                outs = a.new_zeros(shape)
                weights = None if w is None else w.new_zeros((B, *w.shape[1:]))
            outs = outs.index_copy(bdim, idx, a.to(outs.dtype))
            if w is not None:
                weights = weights.index_copy(0, idx, w.to(weights.dtype))
        return outs, weights

    def _rows_call(self, bound: dict, query: Tensor, bdim: int, idx: Tensor, B: int) -> dict:
        """The forward's arguments restricted to batch rows ``idx`` (query/key/value along the
        batch dim, key_padding_mask [B, S] and a 3-D attn_mask [B * heads, L, S] along theirs;
        a 2-D attn_mask is shared). Keeps ``query is key is value`` (PyTorch's fast path)."""
        part = dict(bound)
        part["query"] = query.index_select(bdim, idx)
        for name, src in (("key", "query"), ("value", "key")):
            t = bound.get(name)
            if t is None:
                continue
            prev = query if src == "query" else bound.get("key")
            part[name] = part[src] if t is prev else t.index_select(bdim, idx)
        kpm = bound.get("key_padding_mask")
        if kpm is not None and kpm.dim() == 2:
            part["key_padding_mask"] = kpm.index_select(0, idx)
        mask = bound.get("attn_mask")
        if mask is not None and mask.dim() == 3:
            h = self.base_layer.num_heads
            part["attn_mask"] = mask.reshape(B, h, *mask.shape[1:]).index_select(0, idx).reshape(-1, *mask.shape[1:])
        return part

    # ----- merging ------------------------------------------------------------------------------
    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        """Fold the adapters (default: the active ones) into ``in_proj_weight`` and out_proj's
        weight in place, as PEFT 0.21 does (out_proj: ``W + dW``, then ``+ dW`` again)."""
        wanted = self.active_adapters if adapter_names is None else adapter_names
        names = [n for n in wanted if n in self.lora_A and n not in self.merged_adapters]
        base = self.base_layer
        for n in names:
            out = self._out
            w_in, w_out = base.in_proj_weight, out.base_layer.weight
            with torch.no_grad():
                d_in, d_out = self.delta(n).to(w_out.dtype), out.delta(n).to(w_out.dtype)
                if safe_merge and not (torch.isfinite(w_in + d_in).all() and torch.isfinite(w_out + d_out).all()):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {n} seems to be broken")
                w_in += d_in
                w_out += d_out
                w_out += d_out
            self.merged_adapters.append(n)
            out.merged_adapters.append(n)
        self._eff_cache = None

    def unmerge(self) -> None:
        """Undo :meth:`merge` in PEFT's order (each adapter's in_proj and first out_proj delta in
        reverse, then the second out_proj deltas in reverse)."""
        if not self.merged_adapters:
            return
        base, out = self.base_layer, self._out
        with torch.no_grad():
            while self.merged_adapters:
                n = self.merged_adapters.pop()
                base.in_proj_weight -= self.delta(n).to(out.base_layer.weight.dtype)
                out.base_layer.weight -= out.delta(n).to(out.base_layer.weight.dtype)
            while out.merged_adapters:
                n = out.merged_adapters.pop()
                out.base_layer.weight -= out.delta(n).to(out.base_layer.weight.dtype)
        self._eff_cache = None

    def extra_repr(self) -> str:
        return f"adapters={self._adapters}, active={self.active_adapters}"


def mha_layer_for(method: str, module: nn.MultiheadAttention, path: str) -> LoraMultiheadAttention:
    """The adapter layer for a targeted ``nn.MultiheadAttention`` (LoRA only, as in PEFT)."""
    if method != "lora":
        raise ValueError(f"target module {path!r} is an nn.MultiheadAttention: {method} does not support it "
                         f"(PEFT neither); only LoRA adapts nn.MultiheadAttention")
    return LoraMultiheadAttention(module)
