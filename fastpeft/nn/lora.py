"""LoRA (with DoRA, rsLoRA, lora_bias) on a linear-like base: nn.Linear, Conv1D, 4/8-bit.

Parameter names are PEFT's (``lora_A.<name>.weight``, ``lora_B.<name>.weight``,
``lora_magnitude_vector.<name>.weight``) so ``state_dict()`` and checkpoints match PEFT key
for key. The layer keeps PEFT's parameters and its ``bank`` (:mod:`fastpeft.nn.bank`) keeps the
stacks the kernels read; the parameters are *views* into the stacks, so adapter memory is held
once and an optimizer's in-place update is seen by the kernels without repacking. The stacks
are rebuilt lazily (on the next forward) after an adapter is added or deleted, the module is
moved or cast, or a parameter was replaced (seen by its storage pointer).

Forward routes (each written once)
----------------------------------
* the eager fast path: the bank's plan of the last fused forward (:mod:`fastpeft.ops.fastpath`);
* fused: one call of ``torch.ops.fastpeft.adapter_linear`` (or the quantized variant), for
  inference (no gradient needed, no active dropout); under ``torch.compile`` the same call
  from the slot tensors and flags only (:meth:`LoraLinear._forward_traced`);
* unfused: PEFT's own composition (base + ``lora_B(lora_A(dropout(x))) * scaling`` per
  adapter), so dropout and gradients behave exactly as in PEFT. :meth:`_needs_unfused` is the
  one rule choosing it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..parallel import tensor_parallel as _tensor_parallel
from . import dora, lora_init, lora_variants
from . import selection as _selection
from ._base_kinds import adapter_device, has_hooks, runs_fused, weight_nk
from .bank import AdapterBank, Entry
from .base import packs_outside_inference_mode
from .dora import DoraMagnitude
from .linear_base import LinearLayerBase

_is_compiling = torch.compiler.is_compiling

# mixed-batch plans kept per layer (one per names tuple; a new one past this clears them)
MAX_MIXED_PLANS = 16


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _dropout_active(d) -> bool:
    return isinstance(d, nn.Dropout) and d.p > 0


def init_lora_attributes(layer: nn.Module, dora: bool = True) -> None:
    """PEFT's per-adapter containers of a LoRA layer, empty (``lora_A`` / ``lora_B`` /
    ``lora_dropout`` ModuleDicts, the DoRA magnitudes when ``dora``, and the hyper-parameter
    dicts ``r``, ``lora_alpha``, ``scaling``, ``use_rslora``, ``use_dora``, ``lora_bias``): the
    same names on every LoRA layer kind (linear, conv, parameter), so PEFT code reads them alike."""
    layer.lora_A = nn.ModuleDict()
    layer.lora_B = nn.ModuleDict()
    layer.lora_dropout = nn.ModuleDict()
    if dora:
        layer.lora_magnitude_vector = nn.ModuleDict()
        layer._dora_merge_norm = {}
    layer.r, layer.lora_alpha, layer.scaling = {}, {}, {}
    layer.use_rslora, layer.use_dora, layer.lora_bias = {}, {}, {}


class LoraLinear(LinearLayerBase):
    """LoRA/DoRA adapters on a linear-like base (nn.Linear, Conv1D, bitsandbytes 4/8-bit)."""

    adapter_param_dicts = ("lora_A", "lora_B", "lora_magnitude_vector")
    bank_class = AdapterBank
    _unfused_flags = (False, False)  # _static_unfused over (the active adapters, all adapters)
    _any_dora = False  # any DoRA adapter in the layer (compiled forwards read the flag)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        init_lora_attributes(self)
        self._lora_variants: dict = {}  # name -> its LoRA variant (fastpeft.nn.lora_variants), if any

    # ----- adding adapters ---------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
        init_lora_weights=True,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Add a fresh adapter; ``init_lora_weights`` as in PEFT (True: B = 0; "gaussian";
        False: random A and B, for tests; "pissa", "pissa_niter_<n>", "olora" (these replace the
        base weight by the residual) and "orthogonal": :mod:`fastpeft.nn.lora_init`).
        ``dtype``: the adapter's dtype (default: base's)."""
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        method = lora_init.parse(init_lora_weights)
        if method is None and not (init_lora_weights is True or init_lora_weights is False
                                   or (isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian")):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not implemented by fastpeft's layers; "
                             f"use True, False, 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora' or 'orthogonal' "
                             f"(a loaded adapter's weights replace the initialization)")
        if method is not None:
            _tensor_parallel.refuse(self, f"init_lora_weights={init_lora_weights!r}")
            lora_init.check_layer(self, method[0], r, lora_bias)  # before anything changes
        if use_dora and self.base_layer.weight.device.type == "meta":
            raise NotImplementedError(
                "DoRA on a base layer whose weights accelerate offloaded (meta device) is not supported: its "
                "weight norm needs the weights outside the base's own call (PEFT fails there too); keep the DoRA "
                "layers' weights in memory (e.g. in the device_map) or merge the adapter first"
            )
        self._register(name)
        w = self.base_layer.weight
        device = adapter_device(self.base_layer)  # accelerate-offloaded bases: the execution device
        if dtype is None:
            dtype = w.dtype if w.is_floating_point() else torch.float32
        K, N = (self.in_features, self.out_features) if self._tp is None else (self._tp.K, self._tp.N)  # TP: made whole
        self._set_config(name, r, lora_alpha, use_rslora, use_dora, lora_bias,
                         nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity())
        if method is not None:  # PEFT's modules, init and dtype path; the base may become the residual
            self.lora_A[name], self.lora_B[name] = lora_init.init_factors(self, *method, r, self.scaling[name], dtype)
            self.bank.mark_stale()  # new base weight: no plan or DoRA scale of the other adapters survives
            self.bank.dora = None
        else:
            self.lora_A[name] = nn.Linear(K, r, bias=False, device=device, dtype=dtype)
            self.lora_B[name] = nn.Linear(r, N, bias=lora_bias, device=device, dtype=dtype)
            self._init_weights(name, init_lora_weights)
            if self._tp is not None:  # one initialization on every rank, split to this rank's shards
                _tensor_parallel.adopt(self, name)
        if use_dora:
            with torch.no_grad():
                norm = dora.dora_norm(self, name, dtype)
            self.lora_magnitude_vector[name] = DoraMagnitude(norm.to(dtype))
        self.set_adapter(self._active)  # keep requires_grad consistent

    def _set_config(self, name, r, lora_alpha, use_rslora, use_dora, lora_bias, dropout: nn.Module,
                    scaling: float | None = None) -> None:
        """An adapter's hyper-parameters, as PEFT's ``update_layer`` records them."""
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = lora_scaling(r, lora_alpha, use_rslora) if scaling is None else scaling
        self.use_rslora[name] = bool(use_rslora)
        self.use_dora[name], self.lora_bias[name] = bool(use_dora), bool(lora_bias)
        self.lora_dropout[name] = dropout

    def _init_weights(self, name: str, init) -> None:
        A, B = self.lora_A[name], self.lora_B[name]
        with torch.no_grad():
            if init is False:
                return  # nn.Linear's default init for both: a non-zero delta (PEFT does the same)
            if isinstance(init, str):  # "gaussian" (add_adapter refused the others)
                nn.init.normal_(A.weight, std=1 / self.r[name])
            else:
                nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            nn.init.zeros_(B.weight)
            if B.bias is not None:
                nn.init.zeros_(B.bias)

    def _remove(self, name: str) -> None:
        lora_variants.detach(self, name)
        lora_init.restore_base(self, name)  # a rolled-back injection: the base weight before the init
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.use_dora, self.lora_bias):
            d.pop(name, None)
        if name in self.lora_dropout:
            del self.lora_dropout[name]
        self.bank.dora = None

    # ----- PEFT's scale API (LoraLayer.set_scale / scale_layer / unscale_layer) ------------------
    # The next eager forward sees the new values (the plans check them, the stacks' scales are
    # repacked); a compiled graph after `fastpeft.optimize.prepare(model)` or an eager forward.
    def set_scale(self, adapter: str, scale: float) -> None:
        """``scaling[adapter] = scale * lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
        if adapter not in self.scaling:
            return
        self.scaling[adapter] = scale * lora_scaling(self.r[adapter], self.lora_alpha[adapter],
                                                     self.use_rslora.get(adapter, False))

    def scale_layer(self, scale: float) -> None:
        """Multiply the scaling of the active adapters by ``scale``."""
        if scale == 1:
            return
        for a in self._active:
            if a in self.lora_A:
                self.scaling[a] *= scale

    def unscale_layer(self, scale=None) -> None:
        """Divide the active adapters' scaling by ``scale``, or reset it (``scale=None``)."""
        for a in self._active:
            if a not in self.lora_A:
                continue
            if scale is None:
                self.set_scale(a, 1.0)
            else:
                self.scaling[a] /= scale

    # ----- one adapter's tensors (AdaLoRA overrides) --------------------------------------------
    def _a_weight(self, name: str) -> Tensor:
        """Effective A [r, K] of an adapter (a variant's: e.g. BD-LoRA's dense block-diagonal A)."""
        v = self._lora_variants.get(name)
        return self.lora_A[name].weight if v is None else v.a_weight(self, name)

    def _b_weight(self, name: str) -> Tensor:
        """Effective B [N, r] (a variant's: e.g. KaSA's B * lora_diag)."""
        v = self._lora_variants.get(name)
        return self.lora_B[name].weight if v is None else v.b_weight(self, name)

    def _scale(self, name: str) -> float:
        return self.scaling[name]

    def _watched(self, name: str) -> tuple:
        """The parameters the bank's stacks are built from for ``name``."""
        v = self._lora_variants.get(name)
        return (self.lora_A[name].weight, self.lora_B[name].weight) if v is None else v.watched(self, name)

    def _entry(self, name: str) -> Entry:
        v = self._lora_variants.get(name)
        if v is not None:  # a copy of the variant's effective factors
            return v.entry(self, name)
        A, B = self._watched(name)
        return Entry(A, B, self._scale(name), (A, B))

    def _entry_ready(self, name: str) -> bool:
        """Whether ``name`` is complete (an adapter being added is registered first)."""
        return name in self._adapters and name in self.lora_A and name in self.scaling

    def _delta_weight(self, name: str) -> Tensor:
        """scaling * B @ A as [N, K] in the adapter dtype."""
        return (self._b_weight(name) @ self._a_weight(name)) * self._scale(name)

    def get_delta_weight(self, adapter: str) -> Tensor:
        """PEFT's ``get_delta_weight``: ``scaling * B @ A`` in the base weight's layout."""
        d = self._delta_weight(adapter)
        return d.t() if self.fan_in_fan_out else d

    def _has_dora(self) -> bool:
        return any(self.use_dora.get(n, False) for n in self._adapters)

    @packs_outside_inference_mode
    def _pack(self) -> None:
        """Rebuild the bank's stacks from every adapter (unpaged when any is DoRA)."""
        names = self._adapters
        self.bank.pack([self._entry(n) for n in names], {n: self.scaling[n] for n in names}, paged=not self._has_dora())

    def _dora_scale(self):
        return dora.dora_scale(self)

    # ----- which route ------------------------------------------------------------------------
    def _static_unfused(self, names, mixed: bool) -> bool:
        """The adapters' own reasons for the unfused route (their config only, so compiled code
        reads them as flags): lora_bias, and DoRA after another active adapter (PEFT applies
        DoRA on the running result of the adapters before it; in a mixed batch a row has one)."""
        return any(self.lora_bias.get(n) for n in names) or (
            not mixed and len(names) > 1 and any(self.use_dora.get(n) for n in names)
        ) or any(not self._lora_variants[n].fused for n in names if n in self._lora_variants)

    def _needs_unfused(self, names, mixed: bool, traced: bool = False) -> bool:
        """The one rule for PEFT's unfused route instead of the fused operator: a base whose
        forward is not the plain matmul, a gradient the adapters need, active dropout, or the
        adapters' own reasons (:meth:`_static_unfused`). ``traced`` (torch.compile): over
        every adapter of the layer and from the flags, so the guards never name adapters
        (switching between loaded adapters keeps a compiled graph)."""
        if not runs_fused(self.base_layer) and not _tensor_parallel.fusable(self):
            return True
        scope = self._adapters if traced else names
        if torch.is_grad_enabled() and any(p.requires_grad for n in scope for p in self._params_of(n)):
            return True
        if self.training and any(_dropout_active(self.lora_dropout[n]) for n in scope if n in self.lora_dropout):
            return True
        return self._unfused_flags[mixed] if traced else self._static_unfused(names, mixed)

    def _refresh_slots(self) -> None:
        super()._refresh_slots()
        act = [n for n in self.active_adapters if n in self.lora_A]
        self._unfused_flags = (self._static_unfused(act, False), self._static_unfused(self._adapters, True))
        self._any_dora = self._has_dora()

    # ----- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        lock = self.bank.call_lock
        if lock is None or _is_compiling():
            return self._forward_call(x, *args, **kwargs)
        with lock:  # an offloading bank: no other call evicts this call's adapters meanwhile
            self.bank.prepare_call(self, _selection.current(self))
            return self._forward_call(x, *args, **kwargs)

    def _forward_call(self, x: Tensor, *args, **kwargs) -> Tensor:
        # Eager fast path: the bank's plan (the operator's arguments and what must still hold
        # for them) built by the last fused forward and dropped by every state change
        # (set_adapter, enable/disable, mixed_batch, add/delete, merge, .to(), train/eval,
        # repack); parameters replaced or written behind the layer's back, a needed gradient or
        # another backend choice make the plan answer None. With the compiled extension the
        # plan is C++ (~10 us a layer at decode, docs/perf-notes.md). Compiled code must not
        # read (and guard on) the plans.
        if not args and not kwargs and not _is_compiling():
            bank = self.bank
            fast = y = None
            sel = _selection.current(self)  # this call's mixed batch (None: the active adapters)
            if has_hooks(self._modules["base_layer"]):  # hooks added after the plan: base_layer(x) must run
                bank.drop_plans()
            elif sel is None:
                fast = bank.plan
                y = fast(x) if fast is not None else None
            else:
                fast = bank.mixed_plans.get(sel.names)
                if fast is not None and x.dim() > 0 and x.shape[-1] == self.in_features:
                    M = x.numel() // max(self.in_features, 1)
                    bank.prepare_call(self, sel)
                    y = fast(x, bank.token_slots(M, x.shape[0] if x.dim() > 1 else 1, sel))
            if y is not None:
                return y
            if fast is not None:
                bank.drop_plans()
        return super().forward(x, *args, **kwargs)

    def _forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if _is_compiling():
            return self._forward_traced(x, *args, **kwargs)
        return self._forward_eager(x, *args, **kwargs)

    def _forward_eager(self, x: Tensor, *args, **kwargs) -> Tensor:
        names, sel = self._names_and_selection(self.lora_A, x.shape[0])
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if args or kwargs or self._needs_unfused(names, sel is not None):
            return self._forward_unfused(x, names, *args, **kwargs)
        return self._forward_fused(x, names)

    def _forward_traced(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The forward as torch.compile traces it: reads the slot tensors, the stacks and flags
        kept current by eager state changes, never the adapter names (no recompilation on
        set_adapter / mixed_batch between loaded adapters) and never storage pointers. Falls
        back to the eager routes (traceable, guarded on names) for the rare cases: disabled
        or merged adapters, stale stacks, a quantized base, the unfused rule."""
        bank = self.bank
        if (
            args or kwargs or self.disable_adapters or self.merged_adapters or not bank.ready or self.kind == "quant"
            or self._tp is not None
            or self._needs_unfused(None, bank.rows is not None, traced=True)
        ):
            return self._forward_eager(x, *args, **kwargs)
        x2 = x.reshape(-1, self.in_features)
        ts = bank.state_token_slots(x2.shape[0], x.shape[0] if x.dim() > 1 else 1)
        if ts is None:
            return self.base_layer(x)
        g = None
        if self._any_dora:  # any DoRA slot in the layer (1 for the others): stable across switches
            if bank.dora is None:
                return self._forward_eager(x)
            g = bank.dora[1]
        y = self._run_fused(x2, bank.a, bank.bt, bank.scales, ts, g)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _identity_checks(self, names) -> list:
        # plus the scaling values: a new value in `layer.scaling` (PEFT's set_scale/scale_layer
        # assign one) retires the plan, and the general path repacks the scales
        return super()._identity_checks(names) + [(self.scaling, n, self.scaling[n]) for n in names if n in self.scaling]

    def _forward_fused(self, x: Tensor, names) -> Tensor:
        compiling = _is_compiling()
        bank = self.bank
        sel = self._call_selection()
        if compiling:  # no pointer checks or repacking while tracing: the eager forwards pack
            if not bank.ready:
                return self._forward_unfused(x, names)
        else:
            if sel is not None:
                bank.prepare_call(self, sel)
            if bank.needs_pack(names, self._watched, self.scaling):
                self._pack()
        x2 = x.reshape(-1, self.in_features)
        mixed = None if sel is None else sel.names
        rows, batch = x2.shape[0], x.shape[0] if x.dim() > 1 else 1
        ts = bank.state_token_slots(rows, batch) if compiling else bank.token_slots(rows, batch, sel)
        g = self._dora_scale()
        if g is False:  # under torch.compile without a cached DoRA scale
            return self._forward_unfused(x, names)
        stacks = (bank.a, bank.bt, bank.scales)
        if bank.page_table is not None and mixed is None and len(names) == 1 and not compiling and x.device.type == "cpu":
            *stacks, ts = bank.adapter_view(self.slot_of(names[0]))
        y = self._run_fused(x2, *stacks, ts, g)
        if not compiling and self.kind != "quant" and self._tp is None:
            W, inputs = self._base_weight_nk(), (() if g is None else dora.dora_inputs(self))
            if mixed is None:
                bank.plan = bank.make_plan(self, names, W, stacks, ts, g, inputs)
            else:
                if len(bank.mixed_plans) > MAX_MIXED_PLANS:
                    bank.mixed_plans.clear()
                bank.mixed_plans[mixed] = bank.make_plan(self, names, W, (bank.a, bank.bt, bank.scales), None, g, inputs)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _lora_out(self, name: str, x: Tensor) -> Tensor:
        """PEFT's ``lora_B(lora_A(dropout(x)))`` for one adapter (AdaLoRA overrides)."""
        return self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)))

    def _forward_unfused(self, x: Tensor, names, *args, **kwargs) -> Tensor:
        """PEFT's unfused computation: used for training (dropout, gradients) and odd bases."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        sel = self._call_selection()
        if sel is not None:
            for n, rows in self._row_groups(x.shape[0], names, sel):
                result[rows] = (result[rows] + self._delta(n, x[rows], result[rows], (rows, x.shape[0]))).to(out_dtype)
            return result
        for n in names:
            result = result + self._delta(n, x, result)
        return result.to(out_dtype)

    def _delta(self, name: str, x: Tensor, result: Tensor, where=None) -> Tensor:
        """One adapter's unfused delta: its variant's (fastpeft.nn.lora_variants; ``where``: None,
        or the (row indices, batch size) of the mixed-batch rows ``x`` holds) or :meth:`_adapter_delta`."""
        v = self._lora_variants.get(name)
        return self._adapter_delta(name, x, result) if v is None else v.delta(self, name, x, result, where)

    def _adapter_delta(self, name: str, x: Tensor, result: Tensor) -> Tensor:
        if self._tp is not None:  # on this rank's shards (fastpeft/parallel/tensor_parallel.py)
            return _tensor_parallel.lora_delta(self, name, x, result)
        xl = x.to(self._a_weight(name).dtype)
        if self.use_dora.get(name):
            return dora.dora_delta(self, name, xl, result)
        return self._lora_out(name, xl) * self._scale(name)

    # ----- merging -----------------------------------------------------------------------------
    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        """Fold the adapters (default: the active ones) into the base weight, as PEFT does."""
        wanted = self.active_adapters if adapter_names is None else adapter_names  # []: nothing, as in PEFT
        names = [n for n in wanted if n in self.lora_A and n not in self.merged_adapters]
        if names:
            _tensor_parallel.refuse(self, "merging")
        lora_variants.check_merge(self, names)  # aLoRA / Arrow: PEFT's refusal, before anything merges
        for n in names:
            W = weight_nk(self.base_layer)
            orig_dtype = W.dtype
            Wf = W.detach().to(torch.float32)
            delta = self._delta_weight(n).detach().to(torch.float32)
            new = dora.merged_weight(self, n, Wf, delta) if self.use_dora.get(n) else Wf + delta
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {n!r} seems to be broken")
            self._set_base_weight(new.to(orig_dtype))
            self.bank.dora = None
            if self.lora_bias.get(n) and self.base_layer.bias is not None:
                with torch.no_grad():
                    self.base_layer.bias += self.lora_B[n].bias * self._scale(n)
            self.merged_adapters.append(n)
        self.bank.drop_plans()

    def unmerge(self) -> None:
        """Undo :meth:`merge` (in reverse order)."""
        self.bank.drop_plans()
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            W = weight_nk(self.base_layer)
            Wf = W.detach().to(torch.float32)
            delta = self._delta_weight(n).detach().to(torch.float32)
            new = dora.unmerged_weight(self, n, Wf, delta) if self.use_dora.get(n) else Wf - delta
            self._set_base_weight(new.to(W.dtype))
            self.bank.dora = None
            if self.lora_bias.get(n) and self.base_layer.bias is not None:
                with torch.no_grad():
                    self.base_layer.bias -= self.lora_B[n].bias * self._scale(n)

    def extra_repr(self) -> str:
        return f"adapters={self._adapters}, active={self.active_adapters}"
