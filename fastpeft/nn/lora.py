"""LoRA (with DoRA, rsLoRA, lora_bias) and AdaLoRA layers over Linear, Conv1D, 4/8-bit bases.

Parameter names are PEFT's (``lora_A.<name>.weight``, ``lora_B.<name>.weight``,
``lora_magnitude_vector.<name>.weight``, ``lora_E.<name>``, ``ranknum.<name>``) so
``state_dict()`` and checkpoints match PEFT key for key.

Storage for the kernels: all adapters of a layer live in two stacked tensors
``lora_a [S, R, K]`` and ``lora_b [S, R, N]`` (B transposed), R = the largest rank in the
layer, zero-padded. For LoRA the parameters are *views* into those stacks (``A.data`` is
``lora_a[s, :r]``, ``B.data`` is ``lora_b[s, :r].t()``), so adapter memory is held once and an
optimizer's in-place update is seen by the kernels without repacking. The stacks are rebuilt
lazily (on the next forward) after an adapter is added or deleted, the module is moved or
cast, or a parameter was replaced (detected by its storage pointer).

Forward paths
-------------
* inference (no gradient needed, no active dropout): one call of
  ``torch.ops.fastpeft.adapter_linear`` (or the quantized variant) per forward;
* training: PEFT's own composition (base + ``lora_B(lora_A(dropout(x))) * scaling`` per
  adapter), so dropout and gradients behave exactly as in PEFT.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import _schema  # noqa: F401  (defines torch.ops.fastpeft.*)
from ..ops import fastpath as _fastpath
from ..ops.reference import dora_weight_norm
from . import paging
from ._base_kinds import base_kind, fused_forward_ok, in_out_features, weight_nk
from .base import AdapterLayer, packs_outside_inference_mode

_is_compiling = torch.compiler.is_compiling


def _sizes_vary(t: Tensor, *dims: int) -> None:
    """Tell torch.compile that these sizes of ``t`` vary (slot and page counts, padded rank and
    page columns change when adapters are added or deleted): compiled graphs take them as
    symbolic sizes instead of recompiling for each new size."""
    import torch._dynamo

    for d in dims:
        torch._dynamo.maybe_mark_dynamic(t, d)


class DoraMagnitude(nn.Module):
    """Holds DoRA's magnitude vector [N] as ``.weight`` (PEFT's ``lora_magnitude_vector.<name>.weight``)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


def _lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraLinear(AdapterLayer):
    """LoRA/DoRA adapters on a linear-like base (nn.Linear, Conv1D, bitsandbytes 4/8-bit)."""

    adapter_param_dicts = ("lora_A", "lora_B", "lora_magnitude_vector")
    _active_need_composite = False  # flags kept by _refresh_slots for the compiled path
    _all_need_composite = False
    _any_dora = False
    _page_table: Tensor | None = None  # slot -> pages of the stacks (fastpeft.nn.paging); None: unpaged
    _active_pages: Tensor | None = None  # the active slots as pages, while paged
    _slot0: Tensor | None = None  # [[0]]: the slots of a one-adapter view (_adapter_view)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.kind = base_kind(base_layer)
        self.in_features, self.out_features = in_out_features(base_layer)
        self.fan_in_fan_out = self.kind == "conv1d"
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self._packed: dict = {}
        self._dora_cache: dict = {}
        self._dora_merge_norm: dict[str, Tensor] = {}

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
        False: random A and B, for tests). ``dtype``: the adapter's dtype (default: base's)."""
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        self._register(name)
        w = self.base_layer.weight
        device = w.device
        if dtype is None:
            dtype = w.dtype if w.is_floating_point() else torch.float32
        K, N = self.in_features, self.out_features
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = _lora_scaling(r, lora_alpha, use_rslora)
        self.use_rslora[name] = bool(use_rslora)
        self.use_dora[name], self.lora_bias[name] = bool(use_dora), bool(lora_bias)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A[name] = nn.Linear(K, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, N, bias=lora_bias, device=device, dtype=dtype)
        self._init_weights(name, init_lora_weights)
        if use_dora:
            with torch.no_grad():
                norm = self._dora_norm(name, dtype)
            self.lora_magnitude_vector[name] = DoraMagnitude(norm.to(dtype))
        self.set_adapter(self._active)  # keep requires_grad consistent

    def _init_weights(self, name: str, init) -> None:
        A, B = self.lora_A[name], self.lora_B[name]
        with torch.no_grad():
            if init is False:
                return  # nn.Linear's default init for both: a non-zero delta (PEFT does the same)
            if isinstance(init, str) and init.lower() == "gaussian":
                nn.init.normal_(A.weight, std=1 / self.r[name])
            else:
                if init not in (True,) and not isinstance(init, str):
                    raise ValueError(f"init_lora_weights={init!r} is not supported")
                if isinstance(init, str):
                    warnings.warn(
                        f"init_lora_weights={init!r} is not implemented by fastpeft; using PEFT's "
                        f"default (kaiming A, zero B). Adapters trained with it load normally.", stacklevel=2
                    )
                nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            nn.init.zeros_(B.weight)
            if B.bias is not None:
                nn.init.zeros_(B.bias)

    def _remove(self, name: str) -> None:
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.use_dora, self.lora_bias):
            d.pop(name, None)
        if name in self.lora_dropout:
            del self.lora_dropout[name]
        self._dora_cache.clear()

    def _frozen_param(self, name, p):
        return False

    # ----- PEFT's scale API (LoraLayer.set_scale / scale_layer / unscale_layer) ------------------
    # The next eager forward sees the new values (the plans check them, the stacks' scales are
    # repacked); a compiled graph after `fastpeft.optimize.prepare(model)` or an eager forward.
    def set_scale(self, adapter: str, scale: float) -> None:
        """``scaling[adapter] = scale * lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
        if adapter not in self.scaling:
            return
        self.scaling[adapter] = scale * _lora_scaling(self.r[adapter], self.lora_alpha[adapter],
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

    # ----- helpers ------------------------------------------------------------------------------
    def _a_weight(self, name: str) -> Tensor:
        """Effective A [r, K] of an adapter (AdaLoRA overrides)."""
        return self.lora_A[name].weight

    def _b_weight(self, name: str) -> Tensor:
        return self.lora_B[name].weight

    def _scale(self, name: str) -> float:
        return self.scaling[name]

    def _delta_weight(self, name: str) -> Tensor:
        """scaling * B @ A as [N, K] in the adapter dtype."""
        return (self._b_weight(name) @ self._a_weight(name)) * self._scale(name)

    def _dora_norm(self, name: str, dtype: torch.dtype) -> Tensor:
        """||W + s B A|| per output row, computed in ``dtype`` as PEFT does."""
        W = weight_nk(self.base_layer).to(dtype)
        A = self._a_weight(name).to(dtype)
        Bt = self._b_weight(name).t().to(dtype)
        return dora_weight_norm(W, A, Bt.detach(), self._scale(name))

    def _has_dora(self) -> bool:
        return any(self.use_dora.get(n, False) for n in self._adapters)

    # ----- packing for the fused operators ------------------------------------------------------
    @packs_outside_inference_mode
    def _pack(self) -> None:
        names = self._adapters
        K, N = self.in_features, self.out_features
        As = [self._a_weight(n) for n in names]
        Bs = [self._b_weight(n) for n in names]
        dtype = As[0].dtype
        for t in As + Bs:
            dtype = torch.promote_types(dtype, t.dtype)
        device = As[0].device
        ranks = [a.shape[0] for a in As]
        # rows per page (fastpeft.nn.paging): the largest rank (one page per adapter, the plain
        # stacks) unless the ranks differ so much that padding to it wastes memory. DoRA's
        # per-slot output scale does not distribute over pages: DoRA layers stay unpaged.
        c = max(ranks) if self._has_dora() else paging.choose_page_rows(ranks)
        starts = paging.page_starts(ranks, c)
        pages = starts[-1]
        a = torch.zeros(pages, c, K, dtype=dtype, device=device)
        bt = torch.zeros(pages, c, N, dtype=dtype, device=device)
        flat_a, flat_bt = a.view(pages * c, K), bt.view(pages * c, N)  # an adapter's pages are consecutive rows
        ptrs, copies = {}, {}
        with torch.no_grad():
            for s, (n, A, B) in enumerate(zip(names, As, Bs, strict=True)):
                o, r = starts[s] * c, A.shape[0]
                flat_a[o:o + r].copy_(A)
                flat_bt[o:o + r].copy_(B.t())
                if self._aliasable(n) and A.dtype == dtype and B.dtype == dtype and A.device == device and B.device == device:
                    self.lora_A[n].weight.data = flat_a[o:o + r]
                    self.lora_B[n].weight.data = flat_bt[o:o + r].t()
                    ptrs[n] = (self.lora_A[n].weight.data_ptr(), self.lora_B[n].weight.data_ptr())
                elif self._aliasable(n):  # a copy in the stacks: watch the parameters' versions
                    A0, B0 = self.lora_A[n].weight, self.lora_B[n].weight
                    copies[n] = (A0.data_ptr(), B0.data_ptr(), A0._version, B0._version)
        scales = torch.tensor([self._scale(n) for s, n in enumerate(names) for _ in range(starts[s + 1] - starts[s])],
                              dtype=torch.float32, device=device)  # one per page
        _sizes_vary(a, 0, 1)
        _sizes_vary(bt, 0, 1)
        _sizes_vary(scales, 0)
        self._packed = dict(a=a, bt=bt, scales=scales, ptrs=ptrs, copies=copies, versions=self._versions(),
                            scale_src={n: self.scaling[n] for n in names}, starts=starts)
        self._dora_cache.clear()
        self._dirty = False
        self._set_page_table(None if pages == len(names) else paging.build_page_table(ranks, c, device))
        self._invalidate()

    def _set_page_table(self, table: Tensor | None) -> None:
        """Install the slot -> pages map of the stacks just packed (None: one page per slot) and
        bring the page tensors derived from the slot tensors up to date."""
        self._page_table = table
        if table is not None:
            _sizes_vary(table, 0, 1)
        self._slots_cache.clear()  # mixed-batch slots derived through the old table
        self._sync_active_pages()

    def _sync_active_pages(self) -> None:
        """``_active_pages``: the active slots ``[1, J]`` as pages ``[1, J * P_max]`` (None when
        the stacks are unpaged), updated in place when the shape allows (a captured CUDA graph
        reads it, as it reads ``_active_slots``)."""
        table = None if self._dirty else self._page_table
        if table is None or self._active_slots is None:
            self._active_pages = None
            return
        new = paging.slots_to_pages(table, self._active_slots.to(table.device))
        old = self._active_pages
        if old is not None and old.shape == new.shape and old.device == new.device and not old.is_inference():
            old.copy_(new)
        else:
            _sizes_vary(new, 1)
            self._active_pages = new

    def token_slots(self, rows: int, batch: int, device=None) -> Tensor | None:
        """As ``AdapterLayer.token_slots``, in pages when the stacks are paged: ``[1, J * P_max]``
        for the active adapters, ``[rows, P_max]`` in a mixed batch."""
        if self._row_slots is None and self._active_pages is not None:
            return self._active_pages
        return super().token_slots(rows, batch, device)

    def _derive_slots(self, rs: Tensor, rows: int, batch: int) -> Tensor:
        ts = super()._derive_slots(rs, rows, batch)
        table = None if self._dirty else self._page_table  # stale while an add/delete awaits the repack
        return paging.slots_to_pages(table, ts)

    def _aliasable(self, name: str) -> bool:
        return True

    def _versions(self):
        return None

    def _pack_stale(self, names) -> bool:
        if self._dirty or not self._packed:
            return True
        if self._scaling_changed(names):
            return True
        ptrs, copies = self._packed["ptrs"], self._packed["copies"]
        for n in names:
            A, B = self.lora_A[n].weight, self.lora_B[n].weight
            p = ptrs.get(n)
            if p is not None:
                if p[0] != A.data_ptr() or p[1] != B.data_ptr():
                    return True
                continue
            c = copies.get(n)
            if c is None or c != (A.data_ptr(), B.data_ptr(), A._version, B._version):
                return True
        return False

    def _scaling_changed(self, names) -> bool:
        """Whether ``scaling`` changed in place (PEFT's set_scale / scale_layer do) since the
        stacks' scales were made."""
        src = self._packed.get("scale_src")
        return src is not None and any(n in src and self.scaling[n] != src[n] for n in names)

    def _ensure_packed(self, names) -> dict | None:
        """The packed stacks, rebuilt first if stale. Under torch.compile nothing is checked
        or rebuilt (storage pointers cannot be traced): None when the stacks are marked stale,
        and the caller runs the unfused path. Eager forwards (or fastpeft.optimize) pack."""
        if _is_compiling():
            return None if (self._dirty or not self._packed) else self._packed
        if self._pack_stale(names):
            self._pack()
        return self._packed

    def _dora_scale(self, x_dtype: torch.dtype) -> Tensor | None:
        """[S, N] magnitude / ||W + s B A|| (1 for non-DoRA slots), cached per weight change."""
        if not self._has_dora():
            return None
        if _is_compiling():  # no pointers while tracing: the scale cached by an eager forward
            cached = self._dora_cache.get("scale")
            return False if cached is None else cached[1]
        W = self.base_layer.weight
        key_parts = [W.data_ptr(), W._version]
        for n in self._adapters:
            if self.use_dora.get(n):
                for p in (self._a_weight(n), self._b_weight(n), self.lora_magnitude_vector[n].weight):
                    key_parts += [p.data_ptr(), p._version]
        key = tuple(key_parts)
        cached = self._dora_cache.get("scale")
        if cached is not None and cached[0] == key:
            return cached[1]
        packed = self._packed
        dtype = packed["a"].dtype
        rows = []
        with torch.no_grad():
            for n in self._adapters:
                if self.use_dora.get(n):
                    mag = self.lora_magnitude_vector[n].weight
                    rows.append(mag.to(dtype) / self._dora_norm(n, dtype))
                else:
                    rows.append(torch.ones(self.out_features, dtype=dtype, device=packed["a"].device))
            g = torch.stack(rows)
        self._dora_cache["scale"] = (key, g)
        return g

    # ----- forward ------------------------------------------------------------------------------
    def _needs_composite(self, names) -> bool:
        if not fused_forward_ok(self.base_layer):
            return True
        if torch.is_grad_enabled():
            for n in names:
                if n in self.lora_A and any(p.requires_grad for p in self._params_of(n)):
                    return True
        if self.training:
            for n in names:
                d = self.lora_dropout[n] if n in self.lora_dropout else None
                if isinstance(d, nn.Dropout) and d.p > 0:
                    return True
        if any(self.lora_bias.get(n) for n in names):
            return True
        if self._mixed is None and len(names) > 1 and any(self.use_dora.get(n) for n in names):
            return True  # PEFT applies DoRA on the running result of the adapters before it
        return False

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        # Eager fast path: a plan (fastpeft.ops.fastpath: the operator's arguments and what
        # must still hold for them) built by the last fused forward and dropped by every state
        # change (set_adapter, enable/disable, mixed_batch, add/delete, merge, .to(),
        # train/eval, repack); parameters replaced or written behind the layer's back, a needed
        # gradient or another backend choice make the plan answer None. With the compiled
        # extension the plan is C++ (no Python body, no boxed torch.ops call: ~10 us a layer
        # at decode, docs/perf-notes.md). Under torch.compile the op stays one opaque node
        # (_forward_traced).
        if not _is_compiling():  # compiled code must not read (and guard on) the plans
            if not args and not kwargs:
                if self._row_slots is None:
                    fast = self._fast
                    y = fast(x) if fast is not None else None
                else:
                    fast = self._fast_mixed.get(self._mixed)
                    if fast is not None and x.dim() > 0 and x.shape[-1] == self.in_features:
                        M = x.numel() // max(self.in_features, 1)
                        y = fast(x, self.token_slots(M, x.shape[0] if x.dim() > 1 else 1))
                    else:
                        y = None
                if y is not None:
                    return y
                if fast is not None:
                    self._fast, self._fast_mixed = None, {}
            if kwargs and "adapter_names" in kwargs:
                return self._forward_with_row_names(x, args, kwargs)
            return self._forward_eager(x, *args, **kwargs)
        if kwargs and "adapter_names" in kwargs:
            return self._forward_with_row_names(x, args, kwargs)
        return self._forward_traced(x, *args, **kwargs)

    def _forward_eager(self, x: Tensor, *args, **kwargs) -> Tensor:
        names = self._adapters_to_run(self.lora_A)
        if names is None:
            return self.base_layer(x, *args, **kwargs)
        mixed = self._mixed_names
        if not names:
            if mixed is not None:
                self._rows_per_name(x.shape[0])  # validates the batch length
            return self.base_layer(x, *args, **kwargs)
        if args or kwargs or self._needs_composite(names):
            return self._forward_composite(x, names, *args, **kwargs)
        return self._forward_fused(x, names)

    def _refresh_slots(self) -> None:
        super()._refresh_slots()
        # what compiled code needs to know about the used adapters, as flags (not names, so
        # that switching between loaded adapters keeps the guards of a compiled graph true);
        # mixed batches use the flags over all adapters of the layer
        act = [n for n in self.active_adapters if n in self.lora_A]
        self._active_need_composite = any(self.lora_bias.get(n) for n in act) or (
            len(act) > 1 and any(self.use_dora.get(n) for n in act)
        )
        self._all_need_composite = any(self.lora_bias.get(n) for n in self._adapters)
        self._any_dora = any(self.use_dora.get(n) for n in self._adapters)
        self._sync_active_pages()

    def _forward_traced(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The forward as torch.compile traces it: reads the slot tensors, the stacks and flags
        kept current by eager state changes, never the adapter names (no recompilation on
        set_adapter / mixed_batch between loaded adapters) and never storage pointers. Falls
        back to the generic path (traceable, guarded on names) for the rare cases: disabled
        or merged adapters, stale stacks, gradients, dropout, lora_bias."""
        if (
            args or kwargs or self.disable_adapters or self.merged_adapters or self._dirty or not self._packed
            or self.kind == "quant" or not fused_forward_ok(self.base_layer)
            or (self._active_need_composite if self._row_slots is None else self._all_need_composite)
            or (torch.is_grad_enabled() and any(p.requires_grad for p in self._adapter_params()))
            or (self.training and any(isinstance(d, nn.Dropout) and d.p > 0 for d in self.lora_dropout.values()))
        ):
            return self._forward_eager(x, *args, **kwargs)
        K, N = self.in_features, self.out_features
        x2 = x.reshape(-1, K)
        ts = self.token_slots(x2.shape[0], x.shape[0] if x.dim() > 1 else 1)
        if ts is None:
            return self.base_layer(x)
        dora = None
        if self._any_dora:  # any DoRA slot in the layer (1 for the others): stable across switches
            cached = self._dora_cache.get("scale")
            if cached is None:
                return self._forward_eager(x)
            dora = cached[1]
        packed = self._packed
        W = self.base_layer.weight
        W = W.t() if self.kind == "conv1d" else W
        y = torch.ops.fastpeft.adapter_linear(x2, W, self.base_layer.bias, packed["a"], packed["bt"],
                                              packed["scales"], ts, dora, None, None)
        return y.reshape(*x.shape[:-1], N)

    def _identity_checks(self, names) -> list:
        # plus the scaling values: a new value in `layer.scaling` (PEFT's set_scale/scale_layer
        # assign one) retires the plan, and the general path repacks the scales
        return super()._identity_checks(names) + [(self.scaling, n, self.scaling[n]) for n in names if n in self.scaling]

    def _adapter_params(self) -> list:
        return [p for n in self._adapters for p in self._params_of(n)]

    def _forward_fused(self, x: Tensor, names) -> Tensor:
        compiling = _is_compiling()
        packed = self._ensure_packed(names)
        if packed is None:  # under torch.compile with stale stacks: no repacking while tracing
            return self._forward_composite(x, names)
        K, N = self.in_features, self.out_features
        lead = x.shape[:-1]
        x2 = x.reshape(-1, K)
        mixed = self._mixed_names is not None
        ts = self.token_slots(x2.shape[0], x.shape[0] if x.dim() > 1 else 1)
        dora = self._dora_scale(x.dtype)
        if dora is False:  # under torch.compile without a cached DoRA scale
            return self._forward_composite(x, names)
        a, bt, scales = packed["a"], packed["bt"], packed["scales"]
        if self._page_table is not None and not mixed and len(names) == 1 and not compiling and x.device.type == "cpu":
            a, bt, scales, ts = self._adapter_view(names[0])
        args = (a, bt, scales, ts, dora, None, None)
        if self.kind == "quant":
            from ..quant.layers import quantized_adapter_linear

            y = quantized_adapter_linear(self.base_layer, x2, *args)
        else:
            W = self.base_layer.weight
            W = W.t() if self.kind == "conv1d" else W
            y = torch.ops.fastpeft.adapter_linear(x2, W, self.base_layer.bias, *args)
            if not compiling:
                if not mixed:
                    self._fast = self._fast_plan(names, W, dict(packed, a=a, bt=bt, scales=scales), ts, dora)
                else:
                    if len(self._fast_mixed) > 16:
                        self._fast_mixed.clear()
                    self._fast_mixed[self._mixed] = self._fast_plan(names, W, packed, None, dora)
        return y.reshape(*lead, N)

    def _adapter_view(self, name: str):
        """One adapter of paged stacks as a one-slot stack of its own: views ``[1, n * c, K]`` /
        ``[1, n * c, N]`` of its ``n`` consecutive pages, its scale ``[1]`` and slots ``[[0]]``.
        One low-rank product instead of one per page (CPU decode, one adapter of rank 16 in
        pages of 4: 45.6 -> 37.8 us a layer, docs/perf-notes.md). Eager CPU forwards only: a
        CUDA graph captured with these views would not follow set_adapter."""
        packed = self._packed
        s, starts = self.slot_of(name), packed["starts"]
        p0, p1 = starts[s], starts[s + 1]
        a, bt = packed["a"], packed["bt"]
        rows = (p1 - p0) * a.shape[1]
        one = self._slot0  # not in `packed`: compiled code guards on that dict's length
        if one is None or one.device != a.device:
            one = self._slot0 = torch.zeros(1, 1, dtype=torch.int32, device=a.device)
        return (a[p0:p1].view(1, rows, a.shape[2]), bt[p0:p1].view(1, rows, bt.shape[2]),
                packed["scales"][p0:p0 + 1], one)

    def _fast_plan(self, names, W, packed, ts, dora):
        """The eager fast path's plan (fastpeft.ops.fastpath): the operator's arguments, and the
        tensors it checks before re-using them."""
        base = self.base_layer
        # everything a gradient could flow to: the fast path runs only while none is needed
        grad_params = [p for n in names for p in self._params_of(n)] + [base.weight]
        if base.bias is not None:
            grad_params.append(base.bias)
        ptr_ts = [base.weight] + ([base.bias] if base.bias is not None else [])
        ver_ts = []
        aliased = packed["ptrs"]
        for n in names:
            if isinstance(self, AdaLoraLinear):  # the stacks hold A * E: any change means repack
                ps = [self.lora_A[n], self.lora_B[n], self.lora_E[n], self.ranknum[n]]
                ptr_ts += ps
                ver_ts += ps
                continue
            A, B = self.lora_A[n].weight, self.lora_B[n].weight
            ptr_ts += [A, B]  # views of the stacks: in-place updates are seen, swaps are not
            if n not in aliased:  # copies (dtype or device differ from the stacks'): any change
                ver_ts += [A, B]
        if dora is not None:  # the DoRA scale depends on W, the adapters and the magnitudes
            ver_ts += [base.weight, packed["a"], packed["bt"]]
            ver_ts += [self.lora_magnitude_vector[n].weight for n in self._adapters if self.use_dora.get(n)]
        return _fastpath.make_plan(
            grad_params, ptr_ts, ver_ts, self._identity_checks(names), self.in_features, self.out_features, W, base.bias,
            packed["a"], packed["bt"], packed["scales"], ts, dora,
        )

    def _lora_out(self, name: str, x: Tensor) -> Tensor:
        """PEFT's ``lora_B(lora_A(dropout(x)))`` for one adapter (AdaLoRA overrides)."""
        return self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)))

    def _forward_composite(self, x: Tensor, names, *args, **kwargs) -> Tensor:
        """PEFT's unfused computation: used for training (dropout, gradients) and odd bases."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        mixed = self._mixed_names
        if mixed is not None:
            row_names = self._row_names(x.shape[0])  # validated, expanded for beams
            for n in names:
                rows = [i for i, m in enumerate(row_names) if m == n]
                sub = x[rows]
                result[rows] = (result[rows] + self._adapter_delta(n, sub, result[rows])).to(out_dtype)
            return result
        for n in names:
            result = result + self._adapter_delta(n, x, result)
        return result.to(out_dtype)

    def _adapter_delta(self, name: str, x: Tensor, result: Tensor) -> Tensor:
        xl = x.to(self._a_weight(name).dtype)
        scale = self._scale(name)
        if not self.use_dora.get(name):
            return self._lora_out(name, xl) * scale
        # DoRA, as PEFT: g = m / ||W + s B A|| (norm detached), delta = (g-1) base + g s lora
        dropout = self.lora_dropout[name]
        W = weight_nk(self.base_layer).to(xl.dtype)
        lora_weight = (self._b_weight(name) @ self._a_weight(name)).to(xl.dtype)
        norm = torch.linalg.norm(W + scale * lora_weight.detach(), dim=1).to(W.dtype).detach()
        g = (self.lora_magnitude_vector[name].weight / norm).view(1, -1)
        if isinstance(dropout, nn.Identity) or not self.training:
            base = result
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                base = base - bias
        else:
            xl = dropout(xl)
            base = F.linear(xl, W)
        lora = self.lora_B[name](self.lora_A[name](xl))
        return (g - 1) * base + g * lora * scale

    # ----- merging -----------------------------------------------------------------------------
    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        """Fold the adapters (default: the active ones) into the base weight, as PEFT does."""
        wanted = self.active_adapters if adapter_names is None else adapter_names  # []: nothing, as in PEFT
        names = [n for n in wanted if n in self.lora_A and n not in self.merged_adapters]
        for n in names:
            W = weight_nk(self.base_layer)
            orig_dtype = W.dtype
            Wf = W.detach().to(torch.float32)
            delta = self._delta_weight(n).detach().to(torch.float32)
            if self.use_dora.get(n):
                norm = torch.linalg.norm(Wf + delta, dim=1)
                self._dora_merge_norm[n] = norm
                g = self.lora_magnitude_vector[n].weight.detach().float() / norm
                new = g.view(-1, 1) * (Wf + delta)
            else:
                new = Wf + delta
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {n!r} seems to be broken")
            self._set_base_weight(new.to(orig_dtype))
            if self.lora_bias.get(n) and self.base_layer.bias is not None:
                with torch.no_grad():
                    self.base_layer.bias += self.lora_B[n].bias * self._scale(n)
            self.merged_adapters.append(n)
        self._invalidate()

    def unmerge(self) -> None:
        """Undo :meth:`merge` (in reverse order)."""
        self._invalidate()
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            W = weight_nk(self.base_layer)
            Wf = W.detach().to(torch.float32)
            delta = self._delta_weight(n).detach().to(torch.float32)
            if self.use_dora.get(n):
                g = self.lora_magnitude_vector[n].weight.detach().float() / self._dora_merge_norm.pop(n)
                new = Wf / g.view(-1, 1) - delta
            else:
                new = Wf - delta
            self._set_base_weight(new.to(W.dtype))
            if self.lora_bias.get(n) and self.base_layer.bias is not None:
                with torch.no_grad():
                    self.base_layer.bias -= self.lora_B[n].bias * self._scale(n)

    def _set_base_weight(self, w_nk: Tensor) -> None:
        if self.kind == "quant":
            from ..quant.layers import quantized_like

            warnings.warn("merging into a quantized base: dequantize, merge, requantize (rounding errors possible)", stacklevel=2)
            self.base_layer = quantized_like(self.base_layer, w_nk)
            return
        with torch.no_grad():
            if self.kind == "conv1d":
                self.base_layer.weight.copy_(w_nk.t())
            else:
                self.base_layer.weight.copy_(w_nk)
        self._dora_cache.clear()

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def extra_repr(self) -> str:
        return f"adapters={self._adapters}, active={self.active_adapters}"


class AdaLoraLinear(LoraLinear):
    """AdaLoRA (SVD-form) adapters: ``delta = B @ (A * E) * scaling / (ranknum + 1e-5)``.

    PEFT's names: ``lora_A.<name>`` [r, K], ``lora_B.<name>`` [N, r], ``lora_E.<name>`` [r, 1]
    and the non-trainable ``ranknum.<name>`` (not saved in checkpoints). The kernels' stacks
    hold ``A * E`` (a derived copy, rebuilt when A, E or ranknum change).
    """

    adapter_param_dicts = ("lora_A", "lora_B", "lora_E", "ranknum")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()

    def add_adapter(self, name, r, lora_alpha, lora_dropout=0.0, init_lora_weights=True, dtype=None, ranknum=None, **_):
        """``ranknum``: the scaling divisor (PEFT keeps the initial rank there after pruning)."""
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        self._register(name)
        w = self.base_layer.weight
        dtype = dtype or (w.dtype if w.is_floating_point() else torch.float32)
        K, N = self.in_features, self.out_features
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = lora_alpha if lora_alpha > 0 else float(r)
        self.use_dora[name], self.lora_bias[name] = False, False
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        kw = dict(device=w.device, dtype=dtype)
        self.lora_A[name] = nn.Parameter(torch.randn(r, K, **kw))
        self.lora_B[name] = nn.Parameter(torch.randn(N, r, **kw))
        self.lora_E[name] = nn.Parameter(torch.randn(r, 1, **kw))
        ranks = float(ranknum if ranknum is not None else r)
        self.ranknum[name] = nn.Parameter(torch.full((1,), ranks, **kw), requires_grad=False)
        if init_lora_weights:
            with torch.no_grad():
                nn.init.zeros_(self.lora_E[name])
                nn.init.normal_(self.lora_A[name], mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B[name], mean=0.0, std=0.02)
        self.set_adapter(self._active)

    def _frozen_param(self, name, p):
        return p is self.ranknum[name] if name in self.ranknum else False

    def _remove(self, name):
        super()._remove(name)

    def _a_weight(self, name):
        return self.lora_A[name] * self.lora_E[name]

    def _b_weight(self, name):
        return self.lora_B[name]

    def _scale(self, name):
        return self.scaling[name] / (float(self.ranknum[name]) + 1e-5)

    def _aliasable(self, name):
        return False

    def _versions(self):
        return tuple(
            (p.data_ptr(), p._version)
            for n in self._adapters
            for p in (self.lora_A[n], self.lora_B[n], self.lora_E[n], self.ranknum[n])
        )

    def _pack_stale(self, names):
        return (self._dirty or not self._packed or self._packed["versions"] != self._versions()
                or self._scaling_changed(names))

    def _lora_out(self, name, x):
        d = self.lora_dropout[name](x)
        return (d @ (self.lora_A[name] * self.lora_E[name]).T) @ self.lora_B[name].T

    def _adapter_delta(self, name, x, result):
        xl = x.to(self.lora_A[name].dtype)
        return self._lora_out(name, xl) * self.scaling[name] / (self.ranknum[name] + 1e-5)


class LoraEmbedding(AdapterLayer):
    """LoRA on nn.Embedding: ``lora_embedding_A.<name>`` [r, V], ``lora_embedding_B.<name>`` [D, r]."""

    adapter_param_dicts = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = in_out_features(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.use_dora: dict[str, bool] = {}
        self._packed: dict = {}

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
        kw = dict(device=w.device, dtype=dtype)
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = _lora_scaling(r, lora_alpha, use_rslora)
        self.use_dora[name] = False
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        A = torch.empty(r, self.num_embeddings, **kw)
        B = torch.empty(self.embedding_dim, r, **kw)
        with torch.no_grad():
            if init_lora_weights is False:
                nn.init.normal_(A)
                nn.init.normal_(B)
            else:
                nn.init.zeros_(A)
                nn.init.normal_(B)
        self.lora_embedding_A[name] = nn.Parameter(A)
        self.lora_embedding_B[name] = nn.Parameter(B)
        self.set_adapter(self._active)

    def _remove(self, name):
        for d in (self.r, self.lora_alpha, self.scaling, self.use_dora):
            d.pop(name, None)
        if name in self.lora_dropout:
            del self.lora_dropout[name]

    @packs_outside_inference_mode
    def _pack(self):
        names = self._adapters
        As = [self.lora_embedding_A[n] for n in names]
        Bs = [self.lora_embedding_B[n] for n in names]
        dtype, device = As[0].dtype, As[0].device
        R = max(a.shape[0] for a in As)
        a = torch.zeros(len(names), R, self.num_embeddings, dtype=dtype, device=device)
        bt = torch.zeros(len(names), R, self.embedding_dim, dtype=dtype, device=device)
        ptrs = {}
        with torch.no_grad():
            for s, (n, A, B) in enumerate(zip(names, As, Bs, strict=True)):
                r = A.shape[0]
                a[s, :r].copy_(A)
                bt[s, :r].copy_(B.t())
                if A.dtype == dtype and B.dtype == dtype and A.device == device:
                    self.lora_embedding_A[n].data = a[s, :r]
                    self.lora_embedding_B[n].data = bt[s, :r].t()
                    ptrs[n] = (self.lora_embedding_A[n].data_ptr(), self.lora_embedding_B[n].data_ptr())
        scales = torch.tensor([self.scaling[n] for n in names], dtype=torch.float32, device=device)
        _sizes_vary(a, 0, 1)
        _sizes_vary(bt, 0, 1)
        _sizes_vary(scales, 0)
        self._packed = dict(a=a, bt=bt, scales=scales, ptrs=ptrs)
        self._dirty = False

    def _ensure_packed(self, names):
        if _is_compiling():  # no pointer checks while tracing (see LoraLinear._ensure_packed)
            return None if (self._dirty or not self._packed) else self._packed
        stale = self._dirty or not self._packed
        if not stale:
            ptrs = self._packed["ptrs"]
            for n in names:
                p = ptrs.get(n)
                if p is None or p != (self.lora_embedding_A[n].data_ptr(), self.lora_embedding_B[n].data_ptr()):
                    stale = True
                    break
        if stale:
            self._pack()
        return self._packed

    def _embed(self, ids: Tensor, weight: Tensor) -> Tensor:
        b = self.base_layer
        return F.embedding(ids, weight, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if kwargs and "adapter_names" in kwargs:
            return self._forward_with_row_names(x, args, kwargs)
        if _is_compiling() and not (
            args or kwargs or self.disable_adapters or self.merged_adapters or self._dirty or not self._packed
            or not fused_forward_ok(self.base_layer) or self.base_layer.max_norm is not None
            or (torch.is_grad_enabled() and any(p.requires_grad for n in self._adapters for p in self._params_of(n)))
        ):
            # compiled: slot tensors and stacks only, no names (see LoraLinear._forward_traced)
            ids = x.reshape(-1)
            ts = self.token_slots(ids.shape[0], x.shape[0] if x.dim() > 0 else 1)
            packed = self._packed
            y = torch.ops.fastpeft.adapter_embedding(ids, self.base_layer.weight, packed["a"], packed["bt"],
                                                     packed["scales"], ts)
            return y.reshape(*x.shape, self.embedding_dim)
        names = self._adapters_to_run(self.lora_embedding_A)
        if names is None:
            return self.base_layer(x, *args, **kwargs)
        mixed = self._mixed_names
        batch = x.shape[0] if x.dim() > 0 else 1
        if not names:
            if mixed is not None:
                self._rows_per_name(batch)  # validates the batch length
            return self.base_layer(x, *args, **kwargs)
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for n in names for p in self._params_of(n))
        if args or kwargs or needs_grad or not fused_forward_ok(self.base_layer) or self.base_layer.max_norm is not None:
            return self._forward_composite(x, names, *args, **kwargs)
        packed = self._ensure_packed(names)
        if packed is None:
            return self._forward_composite(x, names)
        ids = x.reshape(-1)
        ts = self.token_slots(ids.shape[0], batch, x.device)
        y = torch.ops.fastpeft.adapter_embedding(ids, self.base_layer.weight, packed["a"], packed["bt"], packed["scales"], ts)
        return y.reshape(*x.shape, self.embedding_dim)

    def _forward_composite(self, x, names, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        mixed = self._mixed_names
        if mixed is not None:
            row_names = self._row_names(x.shape[0])  # validated, expanded for beams
            for n in names:
                rows = [i for i, m in enumerate(row_names) if m == n]
                after_a = self._embed(x[rows], self.lora_embedding_A[n].T)
                result[rows] = result[rows] + (after_a @ self.lora_embedding_B[n].T) * self.scaling[n]
            return result
        for n in names:
            after_a = self._embed(x, self.lora_embedding_A[n].T)
            result = result + (after_a @ self.lora_embedding_B[n].T) * self.scaling[n]
        return result.to(out_dtype)

    def _delta_weight(self, name):
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]

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

    def get_base_layer(self):
        return self.base_layer
