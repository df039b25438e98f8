"""``fastpeft.optimize(model)``: PEFT's adapter layers replaced in place by fastpeft's fused ones.

Takes a model adapted by the ``peft`` library itself (a ``peft.PeftModel``, or a Transformers
model whose adapters came through its ``load_adapter`` / ``add_adapter``) and swaps each
supported PEFT layer for a fastpeft layer that

* wraps the **same** base module (no copy of the base weights: ``data_ptr`` is unchanged);
* holds the **same** adapter modules and ``nn.Parameter`` objects (``lora_A.<name>`` etc.): an
  optimizer or any other reference to them stays valid; their storage moves into the layer's
  per-slot stacks (``param.data`` becomes a view of the stack, so adapter memory is held once);
* keeps the adapter names, their order, the active adapters, the scaling (also after
  ``set_scale``), the disabled state, dropout modules, ``requires_grad`` flags and forward hooks;
* gives the same outputs (fp32: equal to PEFT's unfused computation up to rounding).

The new layers are registered as (virtual) subclasses of PEFT's layer classes
(``peft.tuners.lora.LoraLayer``, ``AdaLoraLayer``, ``IA3Layer``; ``abc.ABCMeta.register``) and
implement PEFT's layer methods with PEFT's signatures, so PEFT's and Transformers' model-level
code keeps driving them: ``set_adapter``, ``disable_adapter()``, ``enable/disable_adapters``,
``active_adapters``, ``forward/generate(adapter_names=...)`` (PEFT's forward hooks pass
``adapter_names`` to each layer), ``merge_adapter`` / ``unmerge_adapter`` /
``merge_and_unload``, ``delete_adapter``, ``save_pretrained`` (same state-dict keys), and adapters
added later through PEFT's ``add_adapter`` / ``load_adapter`` (PEFT's injection finds an existing
layer and calls its ``update_layer``, which adds the adapter to the fastpeft layer).

What is replaced (PEFT 0.21): ``peft.tuners.lora.layer.Linear`` (LoRA, rsLoRA, DoRA,
``lora_bias``) and ``peft.tuners.lora.layer.Embedding`` (LoRA) on ``nn.Linear``, Transformers
``Conv1D`` and ``nn.Embedding`` bases; ``peft.tuners.adalora.layer.SVDLinear``;
``peft.tuners.ia3.layer.Linear``. PEFT's ``ModulesToSaveWrapper`` is **kept**: it runs a full
copy of a module, there is nothing to fuse, and PEFT's saving/loading code recognises it by its
class (``fastpeft.mixed_batch`` passes it the per-row names). Any other PEFT layer (other LoRA
variants, quantized-base PEFT classes, convolutions, other tuners) is left as it is and still
works through PEFT; ``strict=True`` turns that into an error.

Merged layers are refused (``ValueError`` naming them): unmerge first (``unmerge_adapter()``),
or call ``merge_and_unload()`` if you do not need the adapters any more. The check runs on every
layer before anything is replaced, so a failed call leaves the model untouched.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ._progress import progress
from .nn import AdaLoraLinear as _AdaLoraLinear
from .nn import IA3Linear as _IA3Linear
from .nn import LoraEmbedding as _LoraEmbedding
from .nn import LoraLinear as _LoraLinear
from .nn._base_kinds import base_kind
from .nn.base import AdapterLayer

__all__ = ["optimize", "LoraLinear", "AdaLoraLinear", "LoraEmbedding", "IA3Linear", "prepare"]

_HOOK_ATTRS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks",
)


class _PeftLayerAPI:
    """PEFT's ``BaseTunerLayer`` / ``LoraLayer`` interface, with PEFT's signatures and meanings,
    on a fastpeft layer. Mixed in front of the fastpeft class by the compat classes below."""

    frozen_peft_weight_names: dict = {}
    quantization_backend = None
    cast_input_dtype_enabled = True
    ephemeral_gpu_offload = False

    # ----- PEFT's state attributes ------------------------------------------------------------
    @property
    def active_adapter(self):
        # PEFT keeps the names as set, also those this layer does not hold (Transformers'
        # active_adapters() reads them from the first tuner layer it finds)
        return list(self._active)

    @property
    def active_adapters(self) -> list:
        return list(self._active)

    @property
    def _active_adapter(self):
        return list(self._active)

    @_active_adapter.setter
    def _active_adapter(self, value) -> None:
        AdapterLayer.set_adapter(self, value)

    @property
    def _disable_adapters(self) -> bool:
        return self.disable_adapters

    @_disable_adapters.setter
    def _disable_adapters(self, value: bool) -> None:
        self.disable_adapters = value

    # ----- PEFT's methods ----------------------------------------------------------------------
    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names)  # active: requires_grad=True, the others False
        if inference_mode:
            for n in self._active:
                if n in self._adapters:
                    for p in self._params_of(n):
                        p.requires_grad_(False)

    def enable_adapters(self, enabled: bool) -> None:
        # as PEFT: enabling makes the active adapters trainable again, disabling freezes all
        if enabled:
            self.set_adapter(list(self._active))
        else:
            for n in self._adapters:
                for p in self._params_of(n):
                    p.requires_grad_(False)
        super().enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        # PEFT's rule: a deleted active adapter is replaced by the remaining active ones, else by
        # the first (sorted) adapter left in the layer; the same on every layer
        was_active = adapter_name in self._active
        if adapter_name in self._adapters:
            super().delete_adapter(adapter_name)
        getattr(self, "lora_variant", {}).pop(adapter_name, None)
        if not was_active:
            return
        remaining = [a for a in self._active if a != adapter_name]
        if remaining:
            self.set_adapter(remaining)
            return
        available = self._all_available_adapter_names()
        if available:
            warnings.warn(
                f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {available[0]}.", stacklevel=2
            )
            self.set_adapter(available[0])
        else:
            self.set_adapter([])

    def merge(self, safe_merge: bool = False, adapter_names: list | None = None) -> None:
        super().merge(adapter_names=adapter_names, safe_merge=safe_merge)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for n in self._adapters:
            if n in names:
                for p in self._params_of(n):
                    if not self._frozen_param(n, p):
                        p.requires_grad_(requires_grad)

    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:
        """PEFT's hook, deliberately a no-op: fastpeft layers already keep their fixed tensors
        (AdaLoRA's ranknum) frozen in ``set_adapter``."""

    def _all_available_adapter_names(self) -> list:
        return sorted(self._adapters)

    def _get_available_adapters(self) -> set:
        return set(self._adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # fastpeft creates adapters on the base's device; a move replaces storage: repack
        self._dirty = True

    def _cast_input_dtype(self, x, dtype):
        if x is None or x.dtype == dtype:
            return x
        return x.to(dtype)

    def get_base_weight(self) -> Tensor:
        return self.get_base_layer().weight.data

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False


def _check_lora_config(config, where: str) -> None:
    """Refuse what the fastpeft layers do not compute (with PEFT's meaning) for a new adapter."""
    import dataclasses

    init = getattr(config, "init_lora_weights", True)
    if not (init is True or init is False or (isinstance(init, str) and init.lower() == "gaussian")):
        raise ValueError(
            f"{where}: init_lora_weights={init!r} is not supported on a layer optimized by fastpeft "
            f"(it would change the base weights or needs PEFT's initializer); add the adapter before "
            f"fastpeft.optimize(), or load a trained adapter (its weights replace the initialization)"
        )
    for f in dataclasses.fields(config):
        if f.metadata.get("is_lora_variant") and f.name != "use_dora" and getattr(config, f.name, None):
            raise ValueError(
                f"{where}: the LoRA variant {f.name}={getattr(config, f.name)!r} is not supported by "
                f"fastpeft's layers; only plain LoRA, rsLoRA, DoRA and lora_bias are"
            )


class LoraLinear(_PeftLayerAPI, _LoraLinear):
    """fastpeft's fused LoRA/DoRA linear layer with PEFT's ``lora.Linear`` interface."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "use_rslora", "lora_bias")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()  # PEFT's LoraLayer has them (empty) on linears
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_variant: dict = {}
        self._caches: dict = {}
        self.kwargs: dict = {}
        self.is_target_conv_1d_layer = self.kind == "conv1d"

    def update_layer(self, adapter_name: str, r: int, lora_alpha, config, **kwargs) -> None:
        """PEFT's hook for an adapter added to an existing layer (``add_adapter``/``load_adapter``)."""
        _check_lora_config(config, f"adding adapter {adapter_name!r}")
        if kwargs.get("tied_adapter"):
            raise ValueError(f"adding adapter {adapter_name!r}: tied LoRA adapters are not supported by fastpeft")
        self.add_adapter(
            adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora, use_dora=config.use_dora, lora_bias=config.lora_bias,
            init_lora_weights=config.init_lora_weights,
        )
        if config.use_dora:
            from peft.tuners.lora.variants import DoraLinearVariant

            self.lora_variant[adapter_name] = DoraLinearVariant()
        self.set_adapter(list(self._active), inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter: str) -> Tensor:
        """PEFT's ``get_delta_weight``: ``scaling * B @ A`` in the base weight's layout."""
        d = self._delta_weight(adapter)
        return d.t() if self.fan_in_fan_out else d


class AdaLoraLinear(_PeftLayerAPI, _AdaLoraLinear):
    """fastpeft's fused AdaLoRA layer with PEFT's ``adalora.SVDLinear`` interface."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_E", "lora_embedding_A", "lora_embedding_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "ranknum")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.use_rslora: dict = {}
        self.lora_variant: dict = {}
        self._caches: dict = {}
        self.kwargs: dict = {}

    def update_layer(self, adapter_name: str, r: int, lora_alpha, config, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"adding AdaLoRA adapter {adapter_name!r}: r={r}; fastpeft's layers need r > 0")
        self.add_adapter(adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=config.lora_dropout,
                         init_lora_weights=config.init_lora_weights, ranknum=r)
        self.set_adapter(list(self._active), inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter: str) -> Tensor:
        d = self._delta_weight(adapter)
        return d.t() if self.fan_in_fan_out else d


class LoraEmbedding(_PeftLayerAPI, _LoraEmbedding):
    """fastpeft's fused LoRA embedding with PEFT's ``lora.Embedding`` interface."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "use_rslora", "lora_bias")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()  # PEFT's LoraLayer has them (empty) on embeddings
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.use_rslora: dict = {}
        self.lora_bias: dict = {}
        self.lora_variant: dict = {}
        self._caches: dict = {}
        self.kwargs: dict = {}
        self.fan_in_fan_out = False

    def update_layer(self, adapter_name: str, r: int, lora_alpha, config, **kwargs) -> None:
        _check_lora_config(config, f"adding adapter {adapter_name!r}")
        if config.use_dora:
            raise ValueError(f"adding adapter {adapter_name!r}: DoRA on embeddings is not supported by fastpeft")
        self.add_adapter(adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=config.lora_dropout,
                         use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights)
        self.use_rslora[adapter_name] = bool(config.use_rslora)
        self.lora_bias[adapter_name] = False
        self.set_adapter(list(self._active), inference_mode=config.inference_mode)

    def _remove(self, name: str) -> None:
        super()._remove(name)
        self.use_rslora.pop(name, None)
        self.lora_bias.pop(name, None)

    def get_delta_weight(self, adapter: str) -> Tensor:
        return self._delta_weight(adapter)


class IA3Linear(_PeftLayerAPI, _IA3Linear):
    """fastpeft's fused IA3 layer with PEFT's ``ia3.Linear`` interface."""

    adapter_layer_names = ("ia3_l",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, is_feedforward: bool):
        super().__init__(base_layer, is_feedforward)
        self.is_target_conv_1d_layer = self.kind == "conv1d"

    def update_layer(self, adapter_name: str, config=None, **kwargs) -> None:
        init = True if config is None else config.init_ia3_weights
        self.add_adapter(adapter_name, init_ia3_weights=init)
        self.set_adapter(list(self._active), inference_mode=bool(getattr(config, "inference_mode", False)))

    def reset_ia3_parameters(self, adapter_name: str) -> None:
        if adapter_name in self.ia3_l:
            with torch.no_grad():
                self.ia3_l[adapter_name].fill_(1.0)


_registered = False


def _register_with_peft() -> None:
    """Make PEFT's isinstance checks (``LoraLayer``, ``AdaLoraLayer``, ``IA3Layer``, hence
    ``BaseTunerLayer``) accept the compat layers, so PEFT's model code drives them."""
    global _registered
    if _registered:
        return
    from peft.tuners.adalora.layer import AdaLoraLayer
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.lora.layer import LoraLayer

    LoraLayer.register(LoraLinear)
    LoraLayer.register(LoraEmbedding)
    AdaLoraLayer.register(AdaLoraLinear)
    IA3Layer.register(IA3Linear)
    _registered = True


# ----- conversion -------------------------------------------------------------------------------
def _peft_classes() -> dict:
    from peft.tuners.adalora.layer import SVDLinear
    from peft.tuners.ia3.layer import Linear as IA3PeftLinear
    from peft.tuners.lora.layer import Embedding as LoraPeftEmbedding
    from peft.tuners.lora.layer import Linear as LoraPeftLinear

    return {LoraPeftLinear: "lora", LoraPeftEmbedding: "embedding", SVDLinear: "adalora", IA3PeftLinear: "ia3"}


def _unsupported_reason(kind: str, m: nn.Module) -> str | None:
    """Why PEFT layer ``m`` cannot become a fastpeft layer (None: it can)."""
    base = m.base_layer
    bk = base_kind(base)
    if kind == "embedding":
        if bk != "embedding":
            return f"base {type(base).__name__} is not an nn.Embedding"
        if getattr(base, "embed_scale", None) is not None:
            return "scaled embeddings (embed_scale) are not supported"
        if m.lora_variant:
            return f"LoRA variant(s) {sorted(type(v).__name__ for v in m.lora_variant.values())} on an embedding"
        if getattr(m, "tp_layer", None) is not None or getattr(m, "input_fns", None):
            return "tensor-parallel embeddings are not supported"
        return None
    if bk not in ("linear", "conv1d"):
        return f"base {type(base).__name__} is not an nn.Linear or transformers Conv1D"
    if kind == "lora":
        from peft.tuners.lora.variants import DoraLinearVariant

        other = {n: type(v).__name__ for n, v in m.lora_variant.items() if type(v) is not DoraLinearVariant}
        if other:
            return f"LoRA variant(s) {other} (fastpeft computes LoRA, rsLoRA, DoRA and lora_bias)"
    if getattr(m, "fan_in_fan_out", bk == "conv1d") != (bk == "conv1d"):
        return f"fan_in_fan_out={m.fan_in_fan_out} does not match its {type(base).__name__} base"
    return None


def _carry_module_state(old: nn.Module, new: AdapterLayer) -> None:
    new.training = old.training
    for attr in _HOOK_ATTRS:
        hooks = getattr(old, attr, None)
        if hooks:
            setattr(new, attr, hooks)


def _convert(kind: str, m: nn.Module) -> AdapterLayer:
    """A fastpeft layer holding PEFT layer ``m``'s base module and adapter modules/parameters."""
    if kind == "ia3":
        new = IA3Linear(m.base_layer, is_feedforward=m.is_feedforward)
        for name, p in m.ia3_l.items():
            new._register(name)
            new.ia3_l[name] = p
    elif kind == "adalora":
        new = AdaLoraLinear(m.base_layer)
        for name in m.lora_A:
            new._register(name)
            new.r[name], new.lora_alpha[name], new.scaling[name] = m.r[name], m.lora_alpha[name], m.scaling[name]
            new.use_dora[name], new.lora_bias[name] = False, False
            new.lora_dropout[name] = m.lora_dropout[name]
            for d in ("lora_A", "lora_B", "lora_E", "ranknum"):
                getattr(new, d)[name] = getattr(m, d)[name]
    elif kind == "embedding":
        new = LoraEmbedding(m.base_layer)
        for name in m.lora_embedding_A:
            new._register(name)
            new.r[name], new.lora_alpha[name], new.scaling[name] = m.r[name], m.lora_alpha[name], m.scaling[name]
            new.use_dora[name], new.lora_bias[name] = False, False
            new.use_rslora[name] = bool(m.use_rslora.get(name, False))
            new.lora_dropout[name] = m.lora_dropout[name]
            new.lora_embedding_A[name] = m.lora_embedding_A[name]
            new.lora_embedding_B[name] = m.lora_embedding_B[name]
    else:
        new = LoraLinear(m.base_layer)
        for name in m.lora_A:
            new._register(name)
            new.r[name], new.lora_alpha[name], new.scaling[name] = m.r[name], m.lora_alpha[name], m.scaling[name]
            new.use_dora[name] = bool(m.use_dora.get(name, False)) or name in m.lora_variant
            new.lora_bias[name] = bool(m.lora_bias.get(name, False))
            new.use_rslora[name] = bool(m.use_rslora.get(name, False))
            new.lora_dropout[name] = m.lora_dropout[name]
            new.lora_A[name] = m.lora_A[name]
            new.lora_B[name] = m.lora_B[name]
            if name in m.lora_magnitude_vector:
                new.lora_magnitude_vector[name] = m.lora_magnitude_vector[name]
            if name in m.lora_variant:
                new.lora_variant[name] = m.lora_variant[name]
        new.is_target_conv_1d_layer = getattr(m, "is_target_conv_1d_layer", new.kind == "conv1d")
        new._caches = dict(getattr(m, "_caches", {}))
    # activity as PEFT had it (names kept as set, also those this layer does not hold)
    active = m.active_adapter
    new._active = [active] if isinstance(active, str) else list(active)
    new._disabled = bool(m.disable_adapters)
    new._dirty = True
    new._refresh_slots()
    _carry_module_state(m, new)
    return new


def _replace_everywhere(model: nn.Module, mapping: dict) -> None:
    """Put ``mapping[id(old)]`` wherever ``old`` is a child (shared modules included)."""
    for parent in list(model.modules()):
        for cname, child in list(parent._modules.items()):
            if child is not None and id(child) in mapping:
                setattr(parent, cname, mapping[id(child)])


def prepare(model: nn.Module) -> nn.Module:
    """Pack the adapter stacks of every fastpeft layer now (and DoRA's scales), so that the
    next call does not pay for it and ``torch.compile`` finds them ready (a compiled forward
    cannot repack: with stale stacks it runs the unfused path). Returns ``model``."""
    for m in model.modules():
        if isinstance(m, AdapterLayer) and m._adapters and hasattr(m, "_pack") and not m.merged:
            if not (m._dirty or not m._packed):
                continue
            m._pack()
            if isinstance(m, _LoraLinear) and m._has_dora():
                m._dora_scale(None)
    return model


def optimize(model: nn.Module, *, strict: bool = False, pack: bool = True, progressbar: bool | None = None) -> nn.Module:
    """Replace PEFT's adapter layers of ``model`` by fastpeft's fused layers, in place.

    ``model``: a ``peft.PeftModel``, a Transformers model with PEFT adapters (``load_adapter``),
    or any module containing PEFT tuner layers. Returns ``model`` (the same object).

    ``strict``: raise instead of warning when a PEFT layer cannot be replaced (it is then left
    as it is and keeps working through PEFT). ``pack``: build the fused stacks now
    (:func:`prepare`) rather than on the first forward. ``progressbar``: a bar over the layers
    (None: only for more than 64 of them; ``HF_HUB_DISABLE_PROGRESS_BARS=1`` hides it).

    Raises ``ValueError`` (before changing anything) for merged layers.
    """
    try:
        import peft  # noqa: F401
    except ImportError:  # nothing made by peft can be in the model
        return model
    _register_with_peft()
    classes = _peft_classes()
    from peft.tuners.tuners_utils import BaseTunerLayer

    plan, merged, skipped = [], [], []
    seen = set()
    for path, m in model.named_modules():
        if id(m) in seen or isinstance(m, AdapterLayer):
            continue
        seen.add(id(m))
        kind = classes.get(type(m))
        if kind is None:
            if isinstance(m, BaseTunerLayer):
                skipped.append((path, f"{type(m).__module__}.{type(m).__name__} has no fastpeft counterpart"))
            continue
        if m.merged:
            merged.append(path)
            continue
        reason = _unsupported_reason(kind, m)
        if reason is not None:
            skipped.append((path, reason))
            continue
        plan.append((path, kind, m))
    if merged:
        raise ValueError(
            f"fastpeft.optimize: {len(merged)} layer(s) have adapters merged into the base weights, e.g. "
            f"{merged[:3]}; call unmerge_adapter() first (or merge_and_unload() if the adapters are no longer needed)"
        )
    if skipped:
        msg = "; ".join(f"{p}: {r}" for p, r in skipped[:5]) + (f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else "")
        if strict:
            raise ValueError(f"fastpeft.optimize(strict=True): {len(skipped)} PEFT layer(s) cannot be replaced: {msg}")
        warnings.warn(f"fastpeft.optimize: {len(skipped)} PEFT layer(s) left as they are (they still work): {msg}", stacklevel=2)
    mapping = {id(m): _convert(kind, m) for _, kind, m in progress(plan, "Optimizing PEFT layers", enabled=progressbar)}
    _replace_everywhere(model, mapping)
    if pack:
        prepare(model)
    _reoptimize_after_adding(model, strict)
    return model


_reoptimizing_classes: dict = {}


def _reoptimize_after_adding(model: nn.Module, strict: bool) -> None:
    """Give ``model`` (a ``peft.PeftModel`` or a Transformers model) ``add_adapter`` and
    ``load_adapter`` methods that call the originals, then :func:`optimize` again: an adapter on
    a layer that is already fastpeft's goes in through ``update_layer``; one on a module that had
    no adapter yet gets a PEFT layer from PEFT's injection, which this turns into fastpeft's."""
    model._fastpeft_strict = strict
    cls = type(model)
    if getattr(cls, "_fastpeft_reoptimizes", False):
        return
    names = [n for n in ("add_adapter", "load_adapter") if callable(getattr(cls, n, None))]
    if not names:
        return
    new_cls = _reoptimizing_classes.get(cls)
    if new_cls is None:
        attrs = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_fastpeft_reoptimizes": True,
                 "__reduce_ex__": _reduce_reoptimizing}
        for n in names:
            attrs[n] = _reoptimizing(getattr(cls, n))
        new_cls = type(cls.__name__, (cls,), attrs)
        _reoptimizing_classes[cls] = new_cls
    model.__class__ = new_cls


def _reduce_reoptimizing(self, protocol):
    """Pickle support: the class made by :func:`_reoptimize_after_adding` cannot be pickled by
    reference (it carries its base's name), so the model is pickled as its base class and
    turned back into the re-optimizing class when unpickled."""
    base = type(self).__mro__[1]
    return _unpickle_reoptimizing, (base, self.__getstate__())


def _unpickle_reoptimizing(base: type, state: dict) -> nn.Module:
    model = base.__new__(base)
    model.__setstate__(state)
    _reoptimize_after_adding(model, getattr(model, "_fastpeft_strict", False))
    return model


def _reoptimizing(original):
    def method(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        # pack=False: adding many adapters one by one must not repack every layer each time;
        # the stacks are packed on the next forward (or by prepare(), before torch.compile)
        optimize(self, strict=getattr(self, "_fastpeft_strict", False), pack=False)
        return out

    method.__name__ = original.__name__
    method.__doc__ = original.__doc__
    return method


# ``fastpeft/__init__.py`` binds ``fastpeft.optimize`` to the function above; this makes
# ``fastpeft.optimize.prepare(model)`` reach the helper too.
optimize.prepare = prepare
