"""LoRA (rsLoRA, DoRA, ``lora_bias``) on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``, and AdaLoRA
on ``nn.Conv2d``, with PEFT 0.21's parameters, shapes and outputs.

For a base convolution ``C_in -> C_out`` with kernel ``k`` (d spatial dims), stride, padding
and ``g`` groups, PEFT's (and so the state dict's) parameters of adapter ``<name>`` are

* ``lora_A.<name>``: a convolution ``C_in -> r`` with the base's kernel size, stride and
  padding, dilation 1, groups 1, no bias: ``weight [r, C_in, *k]``;
* ``lora_B.<name>``: a 1x1 convolution ``r -> C_out`` with the base's groups (``r % g == 0``,
  else PEFT's error) and a bias when ``lora_bias``: ``weight [C_out, r / g, 1, ...]``;
* ``lora_magnitude_vector.<name>.weight`` (DoRA): ``[1, C_out, 1, ...]``;
* AdaLoRA (Conv2d only, as PEFT): ``lora_A [r, C_in * kh * kw]``, ``lora_E [r, 1]``,
  ``lora_B [C_out, r]`` and ``ranknum [1]`` (not saved).

With ``g = 1``, ``lora_B(lora_A(x)) == conv(x, dK)`` for the kernel ``dK = (B [C_out, r] @ A
[r, C_in * prod(k)]).view(W.shape)``, and DoRA's output ``b + m / ||W + s dK|| * conv(x, W + s
dK)``: so the active adapters fold into one kernel ``W'`` and bias ``b'`` (in PEFT's order, DoRA
applied to the running result of the adapters before it) and inference is one convolution.

Routes (:meth:`LoraConv._needs_unfused` is the one rule):

* cached kernel (inference: no gradient needed for the adapters or the base, no active dropout,
  ``groups == 1``, a plain conv base without hooks, eager): ``W'``/``b'`` cached in the bank per
  adapter tuple (a mixed batch: one per adapter, its rows gathered), rebuilt when the base
  weight or bias, an adapter tensor (storage pointer, object or ``_version``: in-place optimizer
  steps and ``copy_`` count) or a scaling value changed; ``bank.mark_stale()`` (load, ``.to()``,
  merge, delete) drops them. Writes through ``.data`` bump no version: they are not seen, as
  for the other caches of fastpeft's layers. Measured (docs/perf-notes.md, "Convolutions", one
  CPU thread): a Stable-Diffusion conv (320 -> 320, 3x3, 32x32, batch 2, r 8) at 1.00-1.02x the
  base conv with the cached kernel vs 1.18-1.42x for PEFT's composition; a small Conv1d at
  1.10-1.13x vs 1.9-2.8x.
* unfused: PEFT's composition (``base(x) + lora_B(lora_A(dropout(x))) * s`` per adapter, DoRA
  per PEFT's formula), for training, dropout, grouped convolutions and ``torch.compile``.

Refused (``ValueError`` naming the option): ``padding_mode`` other than ``"zeros"`` (PEFT's
adapter convolutions pad with zeros, so their output would not match the base's padding and a
merge would change the outputs); LoRA on a base with ``dilation > 1`` (PEFT's ``lora_A`` has no
dilation: its output has another size and PEFT fails in forward); AdaLoRA with ``groups > 1``
(PEFT's kernel reshape fails) or on Conv1d / Conv3d (PEFT refuses). As PEFT: merging with
``groups > 1`` raises ``NotImplementedError``; DoRA with ``groups > 1`` computes its norm from
PEFT's ``B.view(-1, r) @ A.view(r, -1)`` reshaped to the grouped weight's shape.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base_kinds import adapter_device, base_kind, runs_fused
from .base import PACK_LOCK, AdapterLayer, packs_outside_inference_mode
from .dora import DoraMagnitude
from .lora import LoraLinear, _dropout_active, init_lora_attributes, lora_scaling
from .slots import SlotTable

_CONV = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}
_CONV_FN = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}

# cached kernels per layer (one per adapter tuple; a mixed batch needs one per distinct adapter
# and runs PEFT's composition beyond this): each is a copy of the base weight (3.7 MB for a
# 320x320 3x3 fp32 conv), so the bound keeps a UNet's many adapted convs from holding many copies
MAX_CACHED_KERNELS = 4


def _stamp(t: Tensor | None) -> tuple | None:
    """What identifies a tensor's current values cheaply: object, storage, version."""
    return None if t is None else (id(t), t.data_ptr(), t._version, t.dtype)


class KernelBank(SlotTable):
    """The conv layers' storage: ``kernels``, an LRU of ``names -> (check, W', b')`` (the folded
    kernel of an adapter tuple and the stamps of what it was built from); dropped by every
    state change that marks the bank stale."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: OrderedDict = OrderedDict()

    def __getstate__(self):
        state = super().__getstate__()  # copies and pickles start without kernels (a cache)
        state["kernels"] = OrderedDict()
        return state

    def mark_stale(self) -> None:
        super().mark_stale()
        self.kernels = OrderedDict()

    def drop_stacks(self) -> None:
        self.mark_stale()

    def holds_stacks(self) -> bool:
        return bool(self.kernels)

    def nbytes(self) -> int:
        return sum(w.nbytes + (0 if b is None else b.nbytes) for _, w, b in self.kernels.values())

    def lookup(self, names: tuple, check: tuple):
        with PACK_LOCK:
            hit = self.kernels.get(names)
            if hit is None or hit[0] != check:
                return None
            self.kernels.move_to_end(names)
            return hit[1], hit[2]

    def store(self, names: tuple, check: tuple, w: Tensor, b: Tensor | None) -> None:
        with PACK_LOCK:
            self.kernels[names] = (check, w, b)
            self.kernels.move_to_end(names)
            while len(self.kernels) > MAX_CACHED_KERNELS:
                self.kernels.popitem(last=False)


def check_conv_base(base: nn.Module, method: str, where: str = "") -> None:
    """Refuse a base convolution whose options the adapter convolutions cannot follow."""
    at = f" (module {where!r})" if where else ""
    if base.padding_mode != "zeros":
        raise ValueError(
            f"{method} on a {type(base).__name__} with padding_mode={base.padding_mode!r}{at} is not supported: PEFT's "
            f"adapter convolutions pad with zeros, so the adapter would not see the base's padding and merging would "
            f"change the outputs; only padding_mode='zeros' bases can be adapted"
        )


class LoraConv(AdapterLayer):
    """LoRA / DoRA / ``lora_bias`` adapters on an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``."""

    adapter_param_dicts = ("lora_A", "lora_B", "lora_magnitude_vector")
    bank_class = KernelBank
    method = "LoRA"

    def __init__(self, base_layer: nn.Module, where: str = ""):
        if base_kind(base_layer) != "conv":
            raise TypeError(f"{type(self).__name__} adapts nn.Conv1d/2d/3d, got {type(base_layer).__name__}")
        self._check_base(base_layer, where)
        super().__init__(base_layer)
        self.kind = "conv"
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self._kernel_dim = base_layer.weight.dim()
        self.fan_in_fan_out = False
        init_lora_attributes(self)

    def _check_base(self, base: nn.Module, where: str) -> None:
        check_conv_base(base, self.method, where)
        if any(d != 1 and k != 1 for d, k in zip(base.dilation, base.kernel_size, strict=True)):
            raise ValueError(
                f"LoRA on a {type(base).__name__} with dilation={base.dilation}"
                + (f" (module {where!r})" if where else "")
                + " is not supported: PEFT's lora_A convolution has no dilation, so its output does not match "
                "the base's (PEFT fails in forward); do not target this layer"
            )

    # ----- adding adapters ---------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, use_rslora: bool = False,
                    use_dora: bool = False, lora_bias: bool = False, init_lora_weights=True,
                    dtype: torch.dtype | None = None) -> None:
        """Add a fresh adapter; ``init_lora_weights`` as PEFT (True: kaiming A, B = 0;
        "gaussian": A ~ N(0, 1/r), B = 0; False: the convolutions' default init)."""
        base = self.base_layer
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not (init_lora_weights is True or init_lora_weights is False
                or (isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian")):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not implemented by fastpeft's conv layers; "
                             f"use True, False or 'gaussian'")
        if r % base.groups:
            raise ValueError(
                f"Targeting a {type(base).__name__} with groups={base.groups} and rank {r}. Currently, support is limited "
                "to conv layers where the rank is divisible by groups. Either choose a different rank or do not target "
                "this specific layer."
            )
        if base.groups > 1:
            warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.", stacklevel=2)
        if lora_bias and base.bias is None:
            warnings.warn(f"`lora_bias=True` was passed but the targeted layer of type {type(base).__name__} has no "
                          "bias. This means that merging LoRA weights won't be possible.", stacklevel=2)
        self._register(name)
        w = base.weight
        dtype = dtype or (w.dtype if w.is_floating_point() else torch.float32)
        kw = dict(device=adapter_device(self.base_layer), dtype=dtype)
        self._set_config(name, r, lora_alpha, use_rslora, use_dora, lora_bias,
                         nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity())
        conv, ones = _CONV[self._kernel_dim], (1,) * (self._kernel_dim - 2)
        self.lora_A[name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False, **kw)
        self.lora_B[name] = conv(r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias, **kw)
        if init_lora_weights is not False:
            with torch.no_grad():
                if isinstance(init_lora_weights, str):
                    nn.init.normal_(self.lora_A[name].weight, std=1 / r)
                else:
                    nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B[name].weight)
                if lora_bias:
                    nn.init.zeros_(self.lora_B[name].bias)
        if use_dora:
            with torch.no_grad():
                norm = self._dora_weight_norm(name, w.detach(), torch.promote_types(w.dtype, dtype))
            self.lora_magnitude_vector[name] = DoraMagnitude(norm.to(dtype))
        self.set_adapter(self._active)

    def _set_config(self, name, r, lora_alpha, use_rslora, use_dora, lora_bias, dropout: nn.Module,
                    scaling: float | None = None) -> None:
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = lora_scaling(r, lora_alpha, use_rslora) if scaling is None else scaling
        self.use_rslora[name], self.use_dora[name], self.lora_bias[name] = bool(use_rslora), bool(use_dora), bool(lora_bias)
        self.lora_dropout[name] = dropout

    def _remove(self, name: str) -> None:
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.use_dora, self.lora_bias,
                  self._dora_merge_norm):
            d.pop(name, None)
        if name in self.lora_dropout:
            del self.lora_dropout[name]

    # PEFT's scale API, with LoraLinear's meaning (the kernels' checks include the scaling)
    set_scale = LoraLinear.set_scale
    scale_layer = LoraLinear.scale_layer
    unscale_layer = LoraLinear.unscale_layer

    # ----- one adapter's tensors (AdaLoRA overrides) --------------------------------------------
    def _scale(self, name: str) -> float:
        return self.scaling[name]

    def _watched(self, name: str) -> tuple:
        """The tensors a kernel folded from ``name`` depends on (read through the containers'
        dicts: this runs on every cached-kernel forward)."""
        mods = self._modules
        A, B = mods["lora_A"]._modules[name]._parameters, mods["lora_B"]._modules[name]._parameters
        out = (A["weight"], B["weight"])
        if B.get("bias") is not None:
            out += (B["bias"],)
        mag = mods["lora_magnitude_vector"]._modules.get(name)
        return out if mag is None else out + (mag._parameters["weight"],)

    def _delta_weight(self, name: str) -> Tensor:
        """``s * dK`` in the base weight's shape, computed in float32 (groups 1 only)."""
        if self.base_layer.groups > 1:
            raise NotImplementedError(f"the delta of a LoRA adapter on a conv with groups={self.base_layer.groups} "
                                      f"is not a kernel of the base's shape (PEFT cannot compute it either)")
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        r = A.shape[0]
        dk = B.reshape(B.shape[0], r).float() @ A.reshape(r, -1).float()
        return dk.reshape(self.base_layer.weight.shape) * self._scale(name)

    def get_delta_weight(self, adapter: str) -> Tensor:
        """PEFT's ``get_delta_weight``: ``s * dK`` in the base weight's layout, adapter dtype."""
        return self._delta_weight(adapter).to(self.lora_A[adapter].weight.dtype)

    def _dora_lora_weight(self, name: str) -> Tensor:
        """PEFT's DoRA lora weight ``(B.view(-1, r) @ A.view(r, -1))`` reshaped to W's shape."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        r = A.shape[0]
        return (B.reshape(-1, r) @ A.reshape(r, -1)).reshape(self.base_layer.weight.shape)

    def _dora_weight_norm(self, name: str, W: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``||W + s * lora_weight||`` per output channel as ``[1, C_out, 1, ...]`` (detached)."""
        lw = self._dora_lora_weight(name).detach()
        if dtype is not None:
            W, lw = W.to(dtype), lw.to(dtype)
        full = W + self._scale(name) * lw
        return full.norm(p=2, dim=tuple(range(1, full.dim())), keepdim=True).transpose(1, 0).detach()

    # ----- which route ------------------------------------------------------------------------
    def _needs_unfused(self, names, sel) -> bool:
        """PEFT's composition instead of the cached kernel: compiling, a grouped or non-plain
        base (a subclass with its own forward, hooks), a gradient the adapters or the base need,
        active dropout, or a mixed batch of more adapters than the cache holds."""
        base = self.base_layer
        if torch.compiler.is_compiling() or base.groups > 1 or not runs_fused(base):
            return True
        if torch.is_grad_enabled() and (any(p.requires_grad for n in names for p in self._params_of(n))
                                        or any(p.requires_grad for p in base._parameters.values() if p is not None)):
            return True
        if self.training and any(_dropout_active(self.lora_dropout[n]) for n in names if n in self.lora_dropout):
            return True
        return sel is not None and len(names) > MAX_CACHED_KERNELS

    # ----- forward ------------------------------------------------------------------------------
    def _forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        names, sel = self._names_and_selection(self.lora_A, x.shape[0])
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if args or kwargs or self._needs_unfused(names, sel):
            return self._forward_unfused(x, names, sel, *args, **kwargs)
        base = self.base_layer
        if sel is None:
            w, b = self._kernel(tuple(names))
            return base._conv_forward(x, w, b)
        groups: dict = {}  # adapter (None: the base) -> its rows, in first-seen order
        for i, n in enumerate(self._row_names(x.shape[0], sel)):
            groups.setdefault(n if n in self.lora_A else None, []).append(i)
        kernels = {n: (base.weight, base.bias) if n is None else self._kernel((n,)) for n in groups}
        if len(groups) == 1:
            return base._conv_forward(x, *kernels[next(iter(groups))])
        out = None
        for n, rows in groups.items():
            idx = torch.tensor(rows, device=x.device)
            y = base._conv_forward(x.index_select(0, idx), *kernels[n])
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out.index_copy_(0, idx, y)
        return out

    def _kernel(self, names: tuple) -> tuple:
        """The folded kernel and bias of ``names`` (cached; rebuilt when what it came from changed)."""
        params = self.base_layer._parameters
        check = [_stamp(params["weight"]), _stamp(params.get("bias"))]
        for n in names:
            check.append(self._scale(n))
            check.extend(map(_stamp, self._watched(n)))
        check = tuple(check)
        hit = self.bank.lookup(names, check)
        if hit is None:
            hit = self._build_kernel(names)
            self.bank.store(names, check, *hit)
        return hit

    @packs_outside_inference_mode
    def _build_kernel(self, names: tuple) -> tuple:
        with torch.no_grad():
            base = self.base_layer
            W0 = base.weight.detach().float()
            b0 = None if base.bias is None else base.bias.detach().float()
            w, b = W0, b0
            for n in names:
                w, b = self._fold(n, W0, b0, w, b)
            dtype = base.weight.dtype
            return w.to(dtype).contiguous(), None if b is None else b.to(dtype if base.bias is None else base.bias.dtype)

    def _fold(self, name: str, W0: Tensor, b0: Tensor | None, w: Tensor, b: Tensor | None) -> tuple:
        """One more adapter on the running kernel ``w`` / bias ``b`` (float32): LoRA adds
        ``s * dK`` (and ``s * b_B``); DoRA, on the running result as PEFT: ``w <- g * (w + s dK)``,
        ``b <- b0 + g * (b - b0) + g * s * b_B``, ``g = m / ||W0 + s dK||``."""
        s = self._scale(name)
        delta = self._delta_weight(name).detach().float()
        lb = self.lora_B[name].bias.detach().float() if self.lora_bias.get(name) else None
        if not self.use_dora.get(name):
            return w + delta, b if lb is None else (0 if b is None else b) + s * lb
        g = (self.lora_magnitude_vector[name].weight.detach().float() / self._dora_weight_norm(name, W0)).reshape(-1)
        w = g.view(-1, *([1] * (w.dim() - 1))) * (w + delta)
        if b is not None or lb is not None:
            zero = 0 if b0 is None else b0
            b = zero + g * ((zero if b is None else b) - zero) + (0 if lb is None else g * s * lb)
        return w, b

    @packs_outside_inference_mode
    def _pack(self) -> None:
        """``fastpeft.optimize.prepare``: build the active adapters' kernel now."""
        names = tuple(n for n in self.active_adapters if n in self.lora_A)
        if names and not self.merged and self.base_layer.groups == 1:
            self._kernel(names)
        self.bank.stale = False

    def _forward_unfused(self, x: Tensor, names, sel, *args, **kwargs) -> Tensor:
        """PEFT's composition: training (dropout, gradients), grouped convs, odd bases."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        if sel is not None:
            for n, rows in self._row_groups(x.shape[0], names, sel):
                result[rows] = (result[rows] + self._adapter_delta(n, x[rows], result[rows])).to(out_dtype)
            return result
        for n in names:
            result = result + self._adapter_delta(n, x, result)
        return result.to(out_dtype)

    def _adapter_delta(self, name: str, x: Tensor, result: Tensor) -> Tensor:
        xl = x.to(self.lora_A[name].weight.dtype)
        if self.use_dora.get(name):
            return self._dora_delta(name, xl, result)
        return self.lora_B[name](self.lora_A[name](self.lora_dropout[name](xl))) * self._scale(name)

    def _dora_delta(self, name: str, xl: Tensor, result: Tensor) -> Tensor:
        """PEFT's DoRA delta on a conv: ``(g - 1) * base + g * s * lora_B(lora_A(x))`` with
        ``g = m / ||W + s lora_weight||`` (detached) and ``base`` the base output without its bias
        (with active dropout: the base conv of the dropped-out input)."""
        base, dropout = self.base_layer, self.lora_dropout[name]
        W = base.weight
        g = self.lora_magnitude_vector[name].weight / self._dora_weight_norm(name, W)
        if isinstance(dropout, nn.Identity) or not self.training:
            base_out = result
            if base.bias is not None:
                base_out = base_out - base.bias.view(1, -1, *([1] * (result.dim() - 2)))
        else:
            xl = dropout(xl)
            base_out = _CONV_FN[self._kernel_dim](xl, W.to(xl.dtype), None, base.stride, base.padding, base.dilation,
                                                  base.groups)
        return (g - 1) * base_out + g * self.lora_B[name](self.lora_A[name](xl)) * self._scale(name)

    # ----- merging -----------------------------------------------------------------------------
    def _unmerged_weight(self) -> Tensor:
        """The base weight (float32) with the merged adapters taken out (DoRA's norm needs it)."""
        W = self.base_layer.weight.detach().float()
        for n in reversed(self.merged_adapters):
            delta = self._delta_weight(n).detach().float()
            W = W / self._merge_factor(n) - delta if self.use_dora.get(n) else W - delta
        return W

    def _merge_factor(self, name: str) -> Tensor:
        g = self.lora_magnitude_vector[name].weight.detach().float() / self._dora_merge_norm[name]
        return g.reshape(-1, *([1] * (self._kernel_dim - 1)))

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        """Fold the adapters (default: the active ones) into the base weight and bias, as PEFT."""
        wanted = self.active_adapters if adapter_names is None else adapter_names
        names = [n for n in wanted if n in self.lora_A and n not in self.merged_adapters]
        if not names:
            return
        base = self.base_layer
        if base.groups > 1:
            raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")
        if base.bias is None and any(self.lora_bias.get(n) for n in names):
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
        for n in names:
            W = base.weight
            Wf = W.detach().float()
            delta = self._delta_weight(n).detach().float()
            if self.use_dora.get(n):
                W0 = self._unmerged_weight()
                self._dora_merge_norm[n] = (W0 + delta).norm(p=2, dim=tuple(range(1, W0.dim())), keepdim=True).transpose(1, 0)
                new = self._merge_factor(n) * (Wf + delta)
            else:
                new = Wf + delta
            new_bias = None
            if self.lora_bias.get(n):
                new_bias = base.bias.detach().float() + self.lora_B[n].bias.detach().float() * self._scale(n)
            if safe_merge and not (torch.isfinite(new).all() and (new_bias is None or torch.isfinite(new_bias).all())):
                self._dora_merge_norm.pop(n, None)
                raise ValueError(f"NaNs detected in the merged weights. The adapter {n} seems to be broken")
            with torch.no_grad():
                W.copy_(new.to(W.dtype))
                if new_bias is not None:
                    base.bias.copy_(new_bias.to(base.bias.dtype))
            self.merged_adapters.append(n)
        self.bank.mark_stale()

    def unmerge(self) -> None:
        """Undo :meth:`merge`, last merged first."""
        base = self.base_layer
        while self.merged_adapters:
            n = self.merged_adapters[-1]
            Wf = base.weight.detach().float()
            delta = self._delta_weight(n).detach().float()
            new = Wf / self._merge_factor(n) - delta if self.use_dora.get(n) else Wf - delta
            with torch.no_grad():
                base.weight.copy_(new.to(base.weight.dtype))
                if self.lora_bias.get(n) and base.bias is not None:
                    base.bias.sub_((self.lora_B[n].bias.detach().float() * self._scale(n)).to(base.bias.dtype))
            self._dora_merge_norm.pop(n, None)
            self.merged_adapters.pop()
        self.bank.mark_stale()

    def extra_repr(self) -> str:
        return f"adapters={self._adapters}, active={self.active_adapters}"


def conv_layer_for(method: str, module: nn.Module, path: str, is_feedforward: bool = False) -> AdapterLayer:
    """The fastpeft layer for ``method`` ("lora", "adalora", "ia3") on the convolution ``module``
    at ``path`` (PEFT's coverage: LoRA on Conv1d/2d/3d, AdaLoRA on Conv2d, IA3 on Conv2d/3d)."""
    if method == "lora":
        return LoraConv(module, path)
    if method == "adalora":
        from .adalora_conv import AdaLoraConv2d

        return AdaLoraConv2d(module, path)
    if method == "ia3":
        from .ia3_conv import IA3Conv

        return IA3Conv(module, is_feedforward, path)
    raise ValueError(f"{method} on convolutions is not supported (module {path!r})")
