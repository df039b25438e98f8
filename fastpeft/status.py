"""PEFT's status reports: ``get_layer_status`` / ``get_model_status``, with the same dataclasses
and fields (``peft.peft_model.TunerLayerStatus`` / ``TunerModelStatus``) and the same rules for
"irregular" values, for a ``fastpeft.PeftModel`` or any model with fastpeft adapter layers.

``module_type`` names a layer as PEFT's repr does (``lora.Linear``, ``lora.Embedding``,
``ia3.Linear``, ``adalora.SVDLinear``...), so code that reads it works unchanged.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal

from torch import nn

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


# fastpeft layer class -> PEFT's module type for the same kind of layer
_PEFT_NAMES = {"LoraLinear": "lora.Linear", "LoraEmbedding": "lora.Embedding", "IA3Linear": "ia3.Linear",
               "AdaLoraLinear": "adalora.SVDLinear", "LoraConv": "lora.Conv", "IA3Conv": "ia3.Conv",
               "AdaLoraConv2d": "adalora.SVDConv2d", "LoraMultiheadAttention": "lora.MultiheadAttention",
               "MhaOutProjLora": "lora.Linear", "LoraParam": "lora.ParamWrapper",
               "TrainableTokensWrapper": "TrainableTokensLayer"}
_ADAPTER_MODEL = {"LORA": "LoraModel", "IA3": "IA3Model", "ADALORA": "AdaLoraModel"}


def _inner(model: nn.Module) -> nn.Module:
    from .peft_model import PeftModel

    return model.base_model.model if isinstance(model, PeftModel) else model


def _module_type(layer) -> str:
    name = type(layer).__name__
    if name == "LoraConv":
        return f"lora.{type(layer.base_layer).__name__}"
    if name == "IA3Conv":
        return f"ia3.{type(layer.base_layer).__name__}"
    return _PEFT_NAMES.get(name, name)


def _quant_backend(layer) -> str | None:
    from .nn._base_kinds import base_kind

    base = getattr(layer, "base_layer", None)
    if base is None or base_kind(base) != "quant":
        return None
    return "bnb 4bit" if "4bit" in type(base).__name__ else "bnb 8bit"


def _one_of(values: set):
    return values.pop() if len(values) == 1 else "irregular"


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One :class:`TunerLayerStatus` per adapter layer (modules_to_save copies included), in
    module order, as ``peft.get_layer_status``. Raises ValueError when the model has none."""
    from .nn.modules_to_save import ModulesToSaveWrapper
    from .tuner import active_adapters, adapter_layers

    inner = _inner(model)
    # names as PEFT's: relative to the tuner for a PeftModel ("model.<path>"), else to the model
    root = model.base_model if inner is not model else model
    names = {id(m): n for n, m in root.named_modules()}
    # PEFT's layers report the names set active on the model, also those a layer does not hold
    model_active = list(active_adapters(inner))
    out = []
    for layer in adapter_layers(inner):
        grads: dict[str, list[bool]] = collections.defaultdict(list)
        devices: dict[str, set[str]] = collections.defaultdict(set)
        for adapter in layer.adapter_names:
            for p in layer._params_of(adapter):
                grads[adapter].append(p.requires_grad)
                devices[adapter].add(p.device.type)
        requires_grad = {k: True if all(v) else False if not any(v) else "irregular" for k, v in grads.items() if v}
        wrapper = isinstance(layer, ModulesToSaveWrapper)
        name = names.get(id(layer), "")
        if type(layer).__name__ == "TrainableTokensWrapper":  # PEFT reports the layer inside its wrapper
            name += ".token_adapter"
        out.append(TunerLayerStatus(
            name=name,
            module_type=_module_type(layer),
            enabled=not layer.disable_adapters,
            active_adapters=list(layer.active_adapters) if wrapper else model_active,
            merged_adapters=[] if wrapper else list(layer.merged_adapters),
            requires_grad=requires_grad,
            available_adapters=sorted(layer.adapter_names),
            devices={k: sorted(v) for k, v in devices.items()},
            quantization_backend=None if wrapper else _quant_backend(layer),
        ))
    if not out:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you "
                         "have PEFT adapters injected in the model.")
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The whole model's :class:`TunerModelStatus`, as ``peft.get_model_status``: a field whose
    layers disagree reads ``"irregular"``."""
    from .config import peft_type_name
    from .peft_model import PeftModel
    layers = get_layer_status(model)
    if isinstance(model, PeftModel):
        base_type = type(model.get_base_model()).__name__
        trainable, total = model.get_nb_trainable_parameters()
        peft_types = {k: peft_type_name(c) for k, c in model.peft_config.items()}
        kinds = set(peft_types.values())
        adapter_type = _ADAPTER_MODEL.get(kinds.pop(), "LoraModel") if len(kinds) == 1 else "irregular"
    else:
        base_type = type(model).__name__ if _is_transformers(model) else "other"  # (with_adapters keeps the name)
        trainable, total = count_parameters(model)
        peft_types = {}
        adapter_type = "None"
    merged_all = set().union(*(s.merged_adapters for s in layers))
    merged: list[str] | Irregular = sorted(merged_all)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_all for s in layers):
        merged = "irregular"
    grads: dict[str, list] = collections.defaultdict(list)
    for s in layers:
        for k, v in s.requires_grad.items():
            grads[k].append(v)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for s in layers:
        for k, v in s.devices.items():
            devices[k].update(v)
    actives = {tuple(s.active_adapters) for s in layers}
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_one_of({s.enabled for s in layers}),
        active_adapters=[] if not actives else list(actives.pop()) if len(actives) == 1 else "irregular",
        merged_adapters=merged,
        requires_grad={k: True if all(v is True for v in vals) else False if all(v is False for v in vals)
                       else "irregular" for k, vals in grads.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={k: sorted(v) for k, v in devices.items()},
        quantization_backend=_one_of({s.quantization_backend for s in layers}),
    )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts as PEFT's ``get_nb_trainable_parameters``: every
    parameter of ``named_parameters()`` once (modules_to_save copies and originals both), a
    bitsandbytes 4-bit parameter counted as 2 values per stored byte."""
    trainable = total = 0
    for _, p in model.named_parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            storage = getattr(p, "quant_storage", None)
            n = n * 2 * (p.element_size() if hasattr(p, "element_size") else
                         (storage.itemsize if storage is not None else 1))
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def _is_transformers(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)
