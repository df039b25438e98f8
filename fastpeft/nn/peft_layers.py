"""fastpeft's layers with PEFT's layer interface: what ``fastpeft.optimize`` puts in place of PEFT's.

Each ``Optimized*`` class is a fastpeft layer (:mod:`fastpeft.nn`) with PEFT's ``BaseTunerLayer`` /
``LoraLayer`` methods, signatures and meanings in front (:class:`_PeftLayerAPI`), registered as a
virtual subclass of PEFT's layer class (``abc.ABCMeta.register``) so PEFT's and Transformers'
model-level code keeps driving it. ``Layer.from_peft(peft_layer)`` builds one holding the PEFT
layer's base module and adapter modules / parameters (the same objects). PEFT is imported only
when one of these is made.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ._base_kinds import base_kind
from .adalora import AdaLoraLinear
from .base import AdapterLayer
from .ia3 import IA3Linear
from .lora import LoraLinear
from .lora_embedding import LoraEmbedding

__all__ = ["OptimizedLoraLinear", "OptimizedAdaLoraLinear", "OptimizedLoraEmbedding", "OptimizedIA3Linear",
           "peft_classes", "register_with_peft", "unsupported_reason"]

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
        self.bank.mark_stale()

    def _cast_input_dtype(self, x, dtype):
        if x is None or x.dtype == dtype:
            return x
        return x.to(dtype)

    def get_base_weight(self) -> Tensor:
        return self.get_base_layer().weight.data

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def _peft_fields(self, **empty) -> None:
        """PEFT's ``LoraLayer`` attributes that fastpeft's layers do not use but PEFT's code reads:
        the containers in ``empty`` (name -> factory: e.g. a linear layer's empty
        ``lora_embedding_A``), the variants, the caches and the layer kwargs."""
        for name, make in empty.items():
            setattr(self, name, make())
        self.lora_variant: dict = {}
        self._caches: dict = {}
        self.kwargs: dict = {}

    def _adopt_peft_state(self, m: nn.Module) -> None:
        """After the adapters of PEFT layer ``m`` were taken over: its activity as PEFT had it
        (names kept as set, also those this layer does not hold), the disabled flag, the
        training flag and the hooks registered on it."""
        active = m.active_adapter
        self._active = [active] if isinstance(active, str) else list(active)
        self._disabled = bool(m.disable_adapters)
        self.bank.mark_stale()
        self._refresh_slots()
        self.training = m.training
        for attr in _HOOK_ATTRS:
            hooks = getattr(m, attr, None)
            if hooks:
                setattr(self, attr, hooks)


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


class OptimizedLoraLinear(_PeftLayerAPI, LoraLinear):
    """fastpeft's fused LoRA/DoRA linear layer with PEFT's ``lora.Linear`` interface."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "use_rslora", "lora_bias")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self._peft_fields(lora_embedding_A=nn.ParameterDict, lora_embedding_B=nn.ParameterDict)  # empty on linears
        self.is_target_conv_1d_layer = self.kind == "conv1d"

    @classmethod
    def from_peft(cls, m: nn.Module) -> OptimizedLoraLinear:
        """The fastpeft layer holding PEFT ``lora.Linear`` ``m``'s base module and its adapter
        modules and parameters (the same objects)."""
        new = cls(m.base_layer)
        for name in m.lora_A:
            new._register(name)
            use_dora = bool(m.use_dora.get(name, False)) or name in m.lora_variant
            new._set_config(name, m.r[name], m.lora_alpha[name], bool(m.use_rslora.get(name, False)), use_dora,
                            bool(m.lora_bias.get(name, False)), m.lora_dropout[name], scaling=m.scaling[name])
            new.lora_A[name] = m.lora_A[name]
            new.lora_B[name] = m.lora_B[name]
            if name in m.lora_magnitude_vector:
                new.lora_magnitude_vector[name] = m.lora_magnitude_vector[name]
            if name in m.lora_variant:
                new.lora_variant[name] = m.lora_variant[name]
        new.is_target_conv_1d_layer = getattr(m, "is_target_conv_1d_layer", new.kind == "conv1d")
        new._caches = dict(getattr(m, "_caches", {}))
        new._adopt_peft_state(m)
        return new

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


class OptimizedAdaLoraLinear(_PeftLayerAPI, AdaLoraLinear):
    """fastpeft's fused AdaLoRA layer with PEFT's ``adalora.SVDLinear`` interface."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_E", "lora_embedding_A", "lora_embedding_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "ranknum")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self._peft_fields(lora_embedding_A=nn.ParameterDict, lora_embedding_B=nn.ParameterDict, use_rslora=dict)

    @classmethod
    def from_peft(cls, m: nn.Module) -> OptimizedAdaLoraLinear:
        """The fastpeft layer holding PEFT ``adalora.SVDLinear`` ``m``'s base and parameters."""
        new = cls(m.base_layer)
        for name in m.lora_A:
            new._register(name)
            new._set_config(name, m.r[name], m.lora_alpha[name], False, False, False, m.lora_dropout[name],
                            scaling=m.scaling[name])
            for d in ("lora_A", "lora_B", "lora_E", "ranknum"):
                getattr(new, d)[name] = getattr(m, d)[name]
        new._adopt_peft_state(m)
        return new

    def update_layer(self, adapter_name: str, r: int, lora_alpha, config, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"adding AdaLoRA adapter {adapter_name!r}: r={r}; fastpeft's layers need r > 0")
        self.add_adapter(adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=config.lora_dropout,
                         init_lora_weights=config.init_lora_weights, ranknum=r)
        self.set_adapter(list(self._active), inference_mode=config.inference_mode)


class OptimizedLoraEmbedding(_PeftLayerAPI, LoraEmbedding):
    """fastpeft's fused LoRA embedding with PEFT's ``lora.Embedding`` interface."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "use_rslora", "lora_bias")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self._peft_fields(lora_A=nn.ModuleDict, lora_B=nn.ModuleDict, lora_magnitude_vector=nn.ModuleDict,  # empty
                          use_rslora=dict, lora_bias=dict)
        self.fan_in_fan_out = False

    @classmethod
    def from_peft(cls, m: nn.Module) -> OptimizedLoraEmbedding:
        """The fastpeft layer holding PEFT ``lora.Embedding`` ``m``'s base and parameters."""
        new = cls(m.base_layer)
        for name in m.lora_embedding_A:
            new._register(name)
            new._set_config(name, m.r[name], m.lora_alpha[name], bool(m.use_rslora.get(name, False)), m.lora_dropout[name],
                            scaling=m.scaling[name])
            new.use_rslora[name] = bool(m.use_rslora.get(name, False))
            new.lora_bias[name] = False
            new.lora_embedding_A[name] = m.lora_embedding_A[name]
            new.lora_embedding_B[name] = m.lora_embedding_B[name]
        new._adopt_peft_state(m)
        return new

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


class OptimizedIA3Linear(_PeftLayerAPI, IA3Linear):
    """fastpeft's fused IA3 layer with PEFT's ``ia3.Linear`` interface."""

    adapter_layer_names = ("ia3_l",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, is_feedforward: bool):
        super().__init__(base_layer, is_feedforward)
        self.is_target_conv_1d_layer = self.kind == "conv1d"

    @classmethod
    def from_peft(cls, m: nn.Module) -> OptimizedIA3Linear:
        """The fastpeft layer holding PEFT ``ia3.Linear`` ``m``'s base and parameters."""
        new = cls(m.base_layer, is_feedforward=m.is_feedforward)
        for name, p in m.ia3_l.items():
            new._register(name)
            new.ia3_l[name] = p
        new._adopt_peft_state(m)
        return new

    def update_layer(self, adapter_name: str, config=None, **kwargs) -> None:
        init = True if config is None else config.init_ia3_weights
        self.add_adapter(adapter_name, init_ia3_weights=init)
        self.set_adapter(list(self._active), inference_mode=bool(getattr(config, "inference_mode", False)))

    def reset_ia3_parameters(self, adapter_name: str) -> None:
        if adapter_name in self.ia3_l:
            with torch.no_grad():
                self.ia3_l[adapter_name].fill_(1.0)


_registered = False


def register_with_peft() -> None:
    """Make PEFT's isinstance checks (``LoraLayer``, ``AdaLoraLayer``, ``IA3Layer``, hence
    ``BaseTunerLayer``) accept the compat layers, so PEFT's model code drives them."""
    global _registered
    if _registered:
        return
    from peft.tuners.adalora.layer import AdaLoraLayer
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.lora.layer import LoraLayer

    LoraLayer.register(OptimizedLoraLinear)
    LoraLayer.register(OptimizedLoraEmbedding)
    AdaLoraLayer.register(OptimizedAdaLoraLinear)
    IA3Layer.register(OptimizedIA3Linear)
    _registered = True



def peft_classes() -> dict:
    """PEFT's layer classes fastpeft replaces -> the fastpeft class that replaces each."""
    from peft.tuners.adalora.layer import SVDLinear
    from peft.tuners.ia3.layer import Linear as IA3PeftLinear
    from peft.tuners.lora.layer import Embedding as LoraPeftEmbedding
    from peft.tuners.lora.layer import Linear as LoraPeftLinear

    return {LoraPeftLinear: OptimizedLoraLinear, LoraPeftEmbedding: OptimizedLoraEmbedding,
            SVDLinear: OptimizedAdaLoraLinear, IA3PeftLinear: OptimizedIA3Linear}


def unsupported_reason(cls: type, m: nn.Module) -> str | None:
    """Why PEFT layer ``m`` cannot become a ``cls`` layer (None: it can)."""
    base = m.base_layer
    bk = base_kind(base)
    if cls is OptimizedLoraEmbedding:
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
    if cls is OptimizedLoraLinear:
        from peft.tuners.lora.variants import DoraLinearVariant

        other = {n: type(v).__name__ for n, v in m.lora_variant.items() if type(v) is not DoraLinearVariant}
        if other:
            return f"LoRA variant(s) {other} (fastpeft computes LoRA, rsLoRA, DoRA and lora_bias)"
    if getattr(m, "fan_in_fan_out", bk == "conv1d") != (bk == "conv1d"):
        return f"fan_in_fan_out={m.fan_in_fan_out} does not match its {type(base).__name__} base"
    return None
