"""LoRA on a raw ``nn.Parameter`` (``LoraConfig(target_parameters=[...])``), e.g. MoE expert stacks.

PEFT's ``lora.ParamWrapper`` semantics, key for key:

* one :class:`LoraParam` per targeted parameter; several targets on one module nest (the one
  made later wraps the earlier one), so state-dict keys are PEFT's:
  ``<m>.lora_A.<adapter>.weight`` for the outer target, ``<m>.base_layer.lora_A.<adapter>.weight``
  for the inner one, ``<m>.base_layer.base_layer.<param>`` for the base tensors;
* a parameter ``W`` of shape ``[E, d1, d2]`` holds ``E`` experts (``[out, in]`` -> ``E = 1``).
  ``lora_A`` is ``nn.Linear(in, r * E)`` (weight ``[r * E, in]``, rows expert-major: expert
  ``e`` is rows ``e * r ... e * r + r - 1``) and ``lora_B`` is ``nn.Linear(r * E, out)``
  (weight ``[out, r * E]``, columns rank-major: expert ``e`` is columns ``e, e + E, ...``).
  For a 3-D ``W`` not marked ``is_transposed`` by its module (Mixtral, Qwen3-MoE store
  ``[E, out, in]``) ``in = d2, out = d1`` and ``delta[e] = B_e @ A_e``; for ``is_transposed``
  modules (gpt-oss stores ``[E, in, out]``) ``in = d1, out = d2`` and ``delta[e] = (B_e @ A_e).T``;
* the module's own forward runs with ``W' = W + sum_a scaling_a * delta_a`` in place of ``W``.
  PEFT registers and removes a parametrization on every call and recomputes ``W'`` each time.
  Here the forward calls the module through a per-call stand-in whose ``_parameters`` hold
  ``W'`` (:func:`call_with`): nothing on the module changes, so concurrent calls with other
  adapters do not meet, and ``W'`` is cached per adapter set (:class:`ParamBank`) until one of
  its inputs changes (storage pointer or ``_version`` of ``W``, ``A``, ``B``; the scaling).
  A call that needs gradients recomputes it with autograd, exactly PEFT's formula, uncached.

Refused as in PEFT (``ValueError`` "... does not work with ..."): ``lora_dropout``, ``use_dora``,
``lora_bias``, ``fan_in_fan_out``; parameters other than 2-D / 3-D. PEFT refuses mixed batches
on these layers; fastpeft runs them: each adapter's rows (tokens) go through the module in
their own call (:meth:`LoraParam._forward_mixed`).
"""
from __future__ import annotations

import math
import threading

import torch
from torch import Tensor, nn

from .base import AdapterLayer
from .lora import init_lora_attributes
from .slots import SlotTable, rows_per_name

# Cached W' per layer (one per adapter set; a mixed batch of n adapters uses n). Each entry is as
# large as the parameter (e.g. a whole expert stack): the cost of a forward at the base model's
# speed. 0 disables the cache (every call recomputes W', as PEFT does). Per layer:
# ``layer.max_cached_weights``.
MAX_CACHED_WEIGHTS = 4
_BUILD_LOCK = threading.Lock()  # two threads missing the cache at once build W' once each, never half


class ParamBank(SlotTable):
    """The slot bookkeeping every AdapterLayer has (no stacks), plus the cached ``W'``:
    ``weights[names] = (key, W')`` where ``key`` is what ``W'`` was computed from."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: dict = {}

    def __getstate__(self):  # copies and pickles start without the cache (it is only a cache)
        state = super().__getstate__()
        state["weights"] = {}
        return state

    def mark_stale(self) -> None:  # a state change (load_weights, .to(), add/delete): drop W'
        super().mark_stale()
        self.weights = {}

    def nbytes(self) -> int:
        return sum(w.nbytes for _, w in self.weights.values())


def call_with(module: nn.Module, overrides: dict, args: tuple, kwargs: dict):
    """``module(*args, **kwargs)`` with ``getattr(module, name)`` giving ``overrides[name]``
    for this call only. The call goes to a shallow copy of the module (same submodules, buffers,
    hooks; its own ``_parameters`` dict), so the module itself never changes: other threads'
    calls and ``state_dict()`` keep seeing the base parameter."""
    if not overrides:
        return module(*args, **kwargs)
    if "forward" in module.__dict__:
        raise NotImplementedError(
            f"{type(module).__name__} has its forward replaced on the instance (e.g. accelerate's hooks for "
            "device_map / offloading); LoRA on its parameters (target_parameters) needs the class's forward")
    stand_in = object.__new__(type(module))
    state = stand_in.__dict__
    state.update(module.__dict__)
    params = dict(module._parameters)
    params.update(overrides)
    state["_parameters"] = params
    return stand_in(*args, **kwargs)


def _rows(t, T: int, idx: Tensor):
    """Rows ``idx`` of a per-row argument (a tensor with ``T`` leading rows); anything else as is."""
    return t.index_select(0, idx) if isinstance(t, Tensor) and t.dim() and t.shape[0] == T else t


class LoraParam(AdapterLayer):
    """LoRA adapters on the parameter ``parameter_name`` of ``base_layer`` (PEFT's ParamWrapper).

    ``base_layer`` is the module holding the parameter, or another :class:`LoraParam` of the same
    module (nesting, see the module docstring). ``get_base_layer()`` is the holding module.
    State changes called on a layer (set_adapter, enable/disable, merge, unmerge, delete) also
    apply to the layers it wraps, and a forward computes the whole nest's weights for one call of
    the holding module: the model-level walk (``fastpeft.tuner.adapter_layers``) meets the
    outermost layer only.
    """

    adapter_param_dicts = ("lora_A", "lora_B")
    bank_class = ParamBank

    def __init__(self, base_layer: nn.Module, parameter_name: str):
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        shape = tuple(self.get_param().shape)
        if len(shape) == 3:
            experts, fin, fout = shape
        elif len(shape) == 2:
            experts, fin, fout = 1, shape[1], shape[0]
        else:
            raise ValueError(f"lora.ParamWrapper was initialized with {len(shape)} dimensional Parameter, but only "
                             f"2d and 3d are supported (parameter {parameter_name!r}).")
        # PEFT: 3-D parameters are [E, out, in] unless the module says `is_transposed` ([E, in, out])
        swap = len(shape) == 3 and not getattr(self.get_base_layer(), "is_transposed", False)
        self.num_experts = experts
        self.in_features, self.out_features = (fout, fin) if swap else (fin, fout)
        self._did_swap_in_out_features = swap  # PEFT's attribute name
        self.fan_in_fan_out = False
        self.max_cached_weights = MAX_CACHED_WEIGHTS
        init_lora_attributes(self, dora=False)  # lora_dropout: Identity per adapter, as PEFT (no dropout here)

    # ----- the parameter and the nest ---------------------------------------------------------
    # (the per-call lookups read the modules' dicts directly: nn.Module.__getattr__ costs ~0.3 us a
    # lookup, and a call makes a dozen per layer)
    def get_base_layer(self) -> nn.Module:
        """The module that holds the parameter (through nested LoraParam layers), as PEFT."""
        m = self._modules["base_layer"]
        while isinstance(m, LoraParam):
            m = m._modules["base_layer"]
        return m

    def get_param(self) -> Tensor:
        """The targeted base parameter ``W``."""
        return getattr(self.get_base_layer(), self.parameter_name)

    def _nest(self) -> list[LoraParam]:
        """This layer and the LoraParam layers it wraps, outermost first."""
        out, m = [], self
        while isinstance(m, LoraParam):
            out.append(m)
            m = m._modules["base_layer"]
        return out

    def _factors(self, name: str) -> tuple[Tensor, Tensor]:
        """``(lora_A[name].weight, lora_B[name].weight)``."""
        return (self._modules["lora_A"]._modules[name]._parameters["weight"],
                self._modules["lora_B"]._modules[name]._parameters["weight"])

    def _slot_device(self) -> torch.device:
        return self.get_param().device

    # ----- adding adapters ----------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, lora_alpha: float, use_rslora: bool = False,
                    init_lora_weights=True, dtype: torch.dtype | None = None) -> None:
        """Add adapter ``name`` of rank ``r`` per expert: ``lora_A [r * E, in]``, ``lora_B
        [out, r * E]``, scaling ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). Init as PEFT's
        ``reset_lora_parameters``: True: A kaiming-uniform, B = 0; "gaussian": A ~ N(0, 1/r),
        B = 0; False: ``nn.Linear``'s default for both (a non-zero delta). ``dtype``: the
        adapter's (default: the parameter's)."""
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        gaussian = isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian"
        if not (init_lora_weights is True or init_lora_weights is False or gaussian):
            raise ValueError(
                f"init_lora_weights={init_lora_weights!r} with target_parameters: PEFT's initializations from the base "
                "weight read `base_layer.weight`, which a parameter target does not have; use True, False or "
                "'gaussian' (a loaded adapter's weights replace the initialization)")
        W = self.get_param()
        if dtype is None:
            dtype = W.dtype
        self._register(name)
        rows = r * self.num_experts
        self.lora_A[name] = nn.Linear(self.in_features, rows, bias=False, device=W.device, dtype=dtype)
        self.lora_B[name] = nn.Linear(rows, self.out_features, bias=False, device=W.device, dtype=dtype)
        self.lora_dropout[name] = nn.Identity()
        self.r[name], self.lora_alpha[name], self.use_rslora[name] = r, lora_alpha, bool(use_rslora)
        self.scaling[name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.use_dora[name] = self.lora_bias[name] = False
        with torch.no_grad():
            if init_lora_weights is not False:
                A = self.lora_A[name].weight
                if gaussian:
                    nn.init.normal_(A, std=1 / r)
                else:
                    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B[name].weight)
        self.bank.mark_stale()
        AdapterLayer.set_adapter(self, self._active)  # requires_grad of the new adapter

    def _remove(self, name: str) -> None:
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.use_dora, self.lora_bias):
            d.pop(name, None)
        if name in self.lora_dropout:
            del self.lora_dropout[name]
        self.bank.mark_stale()

    # ----- PEFT's delta ---------------------------------------------------------------------------
    def get_delta_factors(self, name: str):
        """``(lhs, rhs, scaling)`` with ``delta = scaling * lhs @ rhs`` batched over experts, in
        the parameter's dtype: PEFT's single-adapter form (one ``baddbmm``)."""
        A, B = self._factors(name)
        E = self.num_experts
        A = A.reshape(E, -1, A.shape[-1])  # [E, r, in]
        B = B.reshape(B.shape[0], -1, E).permute(2, 0, 1)  # [E, out, r]
        lhs, rhs = (B, A) if self._did_swap_in_out_features else (A.transpose(-2, -1), B.transpose(-2, -1))
        W = self.get_param()
        return lhs.to(W.dtype), rhs.to(W.dtype), self.scaling[name]

    def get_delta_weight(self, name: str) -> Tensor:
        """``scaling * delta`` in ``W``'s layout and dtype (PEFT's ``get_delta_weight``)."""
        A, B = self._factors(name)
        E = self.num_experts
        if E == 1:  # PEFT's Linear.get_delta_weight: half precision on the CPU is multiplied in fp32
            half_cpu = B.device.type == "cpu" and B.dtype in (torch.float16, torch.bfloat16)
            delta = ((B.float() @ A.float()) if half_cpu else (B @ A)) * self.scaling[name]
            delta = delta.to(B.dtype)
        else:
            A3 = A.reshape(E, -1, A.shape[-1])  # [E, r, in]
            B3 = B.reshape(B.shape[0], -1, E)  # [out, r, E]
            spec = "o r e, e r i -> e o i" if self._did_swap_in_out_features else "o r e, e r i -> e i o"
            delta = torch.einsum(spec, B3, A3) * self.scaling[name]
        W = self.get_param()
        return delta.to(W.device, W.dtype)

    def _compose(self, W: Tensor, names) -> Tensor:
        """``W'`` for the adapters ``names``, with PEFT's arithmetic (so outputs and gradients
        match it): one adapter on experts: ``baddbmm(W, lhs, rhs, alpha=scaling)``; else
        ``W + (delta_1 + delta_2 + ...)``."""
        if len(names) == 1 and self.num_experts > 1:
            lhs, rhs, s = self.get_delta_factors(names[0])
            with torch.autocast(device_type=W.device.type, enabled=False):
                return torch.baddbmm(W, lhs, rhs, alpha=s)
        delta = None
        for n in names:
            d = self.get_delta_weight(n)
            delta = d if delta is None else delta + d
        return W + delta

    def _key(self, W: Tensor, names) -> tuple:
        """What ``W'`` for ``names`` is made of: storage pointers and versions of ``W``, ``A``, ``B``
        (an optimizer step or ``load_state_dict`` bumps the version, ``.to()`` or assigning a new
        tensor moves the pointer) and the scaling values. Writes through ``.data`` bypass the
        version counter: call ``layer.bank.mark_stale()`` after them."""
        key = [W.data_ptr(), W._version, W.dtype]
        for n in names:
            A, B = self._factors(n)
            key += (self.scaling[n], A.data_ptr(), A._version, B.data_ptr(), B._version)
        return tuple(key)

    def effective_weight(self, names) -> Tensor:
        """``W'`` for the adapters ``names`` (this layer's, in order). Under autograd with a
        trainable input (an adapter or ``W``): computed fresh so gradients flow as in PEFT.
        Otherwise cached per ``names`` until the key (:meth:`_key`) changes."""
        W = self.get_param()
        if torch.is_grad_enabled() and (W.requires_grad or any(
                t.requires_grad for n in names for t in self._factors(n))):
            return self._compose(W, names)
        names = tuple(names)
        bank = self.bank
        key = self._key(W, names)
        hit = bank.weights.get(names)
        if hit is not None and hit[0] == key:
            return hit[1]
        with _BUILD_LOCK:
            if torch.is_inference_mode_enabled():  # a normal tensor: later training-mode calls may use it
                with torch.inference_mode(False), torch.no_grad():
                    w = self._compose(W, names)
            else:
                with torch.no_grad():
                    w = self._compose(W, names)
            limit = self.max_cached_weights
            if limit > 0:
                weights = dict(bank.weights)  # readers of the old dict are not disturbed
                weights.pop(names, None)
                while len(weights) >= limit:
                    weights.pop(next(iter(weights)))
                weights[names] = (key, w)
                bank.weights = weights
        return w

    # ----- which adapters a call applies ----------------------------------------------------------
    def _own_names(self) -> list:
        """This layer's adapters for a plain call: [] when disabled (a merged layer is unmerged
        first, as PEFT) or merged; else the active ones it holds."""
        if self._disabled:
            if self.merged_adapters:
                self._unmerge_own()
            return []
        if self.merged_adapters:
            return []
        held = self._modules["lora_A"]._modules
        return [n for n in self._active if n in held]

    def _overrides(self, nest, name_of) -> dict:
        """``{parameter name: W'}`` for the layers of ``nest``; ``name_of(layer)``: its adapters."""
        out = {}
        for layer in nest:
            names = name_of(layer)
            if names:
                out[layer.parameter_name] = layer.effective_weight(names)
        return out

    # ----- forward --------------------------------------------------------------------------------
    @torch.compiler.disable  # a per-call stand-in module: eager only (PEFT: graph breaks expected)
    def _forward(self, x: Tensor, *args, **kwargs):
        nest = self._nest()
        base = nest[-1]._modules["base_layer"]
        sel = self._call_selection()
        if sel is None:
            return call_with(base, self._overrides(nest, LoraParam._own_names), (x, *args), kwargs)
        return self._forward_mixed(nest, base, sel, x, args, kwargs)

    def _forward_mixed(self, nest, base, sel, x: Tensor, args: tuple, kwargs: dict):
        """A mixed batch: one call of the module per adapter, on that adapter's rows. ``x`` is
        ``[batch, ...]`` (one name per batch row, or per ``k`` consecutive rows for beams) or, as
        MoE blocks flatten it, ``[batch * seq, hidden]``: each name then covers ``T / n``
        consecutive tokens. Every tensor argument with ``T`` leading rows is split the same way
        (the router's indices and weights); the module must treat rows independently, as
        expert layers do. Measured: docs/perf-notes.md (a two-adapter batch costs about two
        calls on half the rows each)."""
        active = [layer for layer in nest if not layer.disable_adapters]
        for layer in nest:
            if layer.disable_adapters and layer.merged_adapters:
                layer._unmerge_own()
        if any(layer.merged_adapters for layer in active):
            raise ValueError("cannot use a mixed batch while adapters are merged; call unmerge_adapter() first")
        T, n = x.shape[0], len(sel.names)
        if x.dim() >= 3:
            per = rows_per_name(n, T, type(self).__name__, sel.repeat)
        elif T % n == 0 and T:
            per = T // n
        else:
            raise ValueError(f"mixed batch: got {n} adapter names for an input of {T} rows (tokens) in "
                             f"{type(self).__name__}; the rows must split evenly into one block per name")
        row_names = [m for m in sel.names for _ in range(per)]
        groups = {}
        for i, m in enumerate(row_names):
            groups.setdefault(m, []).append(i)

        def overrides(name):
            return self._overrides(active, lambda layer: [name] if name in layer.lora_A else [])

        if len(groups) == 1:
            return call_with(base, overrides(row_names[0]), (x, *args), kwargs)
        outs, order = [], []
        for name, rows in groups.items():
            idx = torch.tensor(rows, device=x.device)
            y = call_with(base, overrides(name), tuple(_rows(a, T, idx) for a in (x, *args)),
                          {k: _rows(v, T, idx) for k, v in kwargs.items()})
            if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != len(rows):
                raise TypeError(f"mixed batch: {type(base).__name__}'s forward returned "
                                f"{type(y).__name__} instead of a tensor with one row per input row")
            outs.append(y)
            order.append(idx)
        inverse = torch.argsort(torch.cat(order))
        return torch.cat(outs)[inverse]

    # ----- state changes: this layer and the ones it wraps ----------------------------------------
    def set_adapter(self, names) -> None:
        for layer in self._nest():
            AdapterLayer.set_adapter(layer, names)

    @property
    def disable_adapters(self) -> bool:
        return self._disabled

    @disable_adapters.setter
    def disable_adapters(self, value: bool) -> None:
        for layer in self._nest():
            layer._disabled = bool(value)
            layer.bank.drop_plans()

    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled

    @property
    def merged(self) -> bool:
        return any(layer.merged_adapters for layer in self._nest())

    def _params_of(self, name: str) -> list[Tensor]:
        return [p for layer in self._nest() for p in AdapterLayer._params_of(layer, name)]

    def delete_adapter(self, name: str) -> None:
        nest = self._nest()
        merged = [layer for layer in nest if name in layer.merged_adapters]
        if merged:
            raise ValueError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting")
        for layer in nest:
            AdapterLayer.delete_adapter(layer, name)

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        """Add the adapters' deltas (default: the active ones) to the base parameters in place,
        as PEFT (``W += delta`` in ``W``'s dtype); ``safe_merge``: checked for NaN/inf first."""
        for layer in self._nest():
            wanted = layer.active_adapters if adapter_names is None else adapter_names
            layer._merge_own([n for n in wanted if n in layer.lora_A and n not in layer.merged_adapters], safe_merge)

    def _merge_own(self, names, safe_merge: bool) -> None:
        W = self.get_param()
        for n in names:
            with torch.no_grad():
                delta = self.get_delta_weight(n)
                if safe_merge:
                    new = W.detach().clone() + delta.to(W.dtype)
                    if not torch.isfinite(new).all():
                        raise ValueError(f"NaNs detected in the merged weights. The adapter {n} seems to be broken")
                    W.copy_(new)
                else:
                    W.add_(delta)
            self.merged_adapters.append(n)

    def unmerge(self) -> None:
        for layer in self._nest():
            layer._unmerge_own()

    def _unmerge_own(self) -> None:
        W = self.get_param()
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            with torch.no_grad():
                W.sub_(self.get_delta_weight(n).to(W.dtype))

    def extra_repr(self) -> str:
        return (f"parameter_name={self.parameter_name!r}, experts={self.num_experts}, in={self.in_features}, "
                f"out={self.out_features}, adapters={self._adapters}, active={self.active_adapters}")
