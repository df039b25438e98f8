"""``LoraConfig(target_parameters=[...])``: which ``nn.Parameter`` tensors get LoRA, and adding it.

Matching (PEFT 0.21's ``BaseTuner._inject_parameters``): for every module of the model (in
``named_modules()`` order) and each of its own parameters (``named_parameters(recurse=False)``),
the key ``<module path with every '.base_layer' removed>.<parameter name>`` is a target when it
equals one of ``target_parameters`` or ends with ``"." + name`` for one of them (no regex; a str
is refused by the config). So ``"experts.gate_up_proj"`` selects
``model.layers.<i>.mlp.experts.gate_up_proj`` in every layer. ``exclude_modules``,
``layers_to_transform`` and ``modules_to_save`` do not apply to parameters (as in PEFT);
``rank_pattern`` / ``alpha_pattern`` keys are matched against the parameter key.

Injection: a :class:`~fastpeft.nn.lora_param.LoraParam` replaces the module holding the parameter
(a second target on the same module wraps the first layer: PEFT's nesting and key names); a
parameter already wrapped for an earlier adapter gets the new adapter in its layer.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import targeting
from .nn.base import AdapterLayer
from .nn.lora_param import LoraParam
from .tuner import base_children

__all__ = ["find_target_parameters", "inject_parameters"]

# model types PEFT 0.21 has default LoRA target_modules for (peft.utils.constants); with
# target_modules=None PEFT adds those modules next to the parameters
_PEFT_DEFAULT_MODEL_TYPES = frozenset(
    "t5 mt5 bart gpt2 bloom blip-2 opt gptj gpt_neox gpt_neo bert roberta xlm-roberta electra deberta-v2 deberta "
    "layoutlm llama llama4 chatglm gpt_bigcode mpt RefinedWebModel RefinedWeb falcon btlm codegen mistral mixtral "
    "stablelm phi gemma gemma2 gemma3_text gemma4 qwen2 qwen3 nemotron_h rwkv rwkv7".split())
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# LoraConfig fields PEFT 0.21 tags `is_lora_variant` (besides use_dora, velora_config, kasa_config)
_VARIANT_FIELDS = ("alora_invocation_tokens", "monteclora_config", "use_bdlora", "arrow_config")


def strip_base_layer(path: str) -> str:
    """PEFT's rule: every ``.base_layer`` removed from a module path."""
    while ".base_layer" in path:
        prefix, _, suffix = path.rpartition(".base_layer")
        path = prefix + suffix
    return path


def _modules(model: nn.Module):
    """``named_modules()`` without the adapter containers of adapter layers (their ``lora_A``
    Linear layers have a ``weight`` too): an adapter layer is entered through its base only."""
    seen: set = set()

    def walk(m, path):
        if id(m) in seen:
            return
        seen.add(id(m))
        yield path, m
        for name, child in base_children(m):
            if child is not None:
                yield from walk(child, f"{path}.{name}" if path else name)

    yield from walk(model, "")


def find_target_parameters(model: nn.Module, config) -> list[tuple[str, str, str]]:
    """``[(module path, parameter name, key)]`` of the parameters ``config.target_parameters``
    selects, in PEFT's order (the path is where the holding module is now, possibly inside
    LoraParam layers of earlier adapters; ``key`` is the path without ``.base_layer`` plus the name)."""
    targets = sorted(set(config.target_parameters or ()))
    found = []
    for path, module in _modules(model):
        unwrapped = strip_base_layer(path)
        for name, _ in module.named_parameters(recurse=False):
            key = f"{unwrapped}.{name}"
            if key in targets or any(key.endswith(f".{t}") for t in targets):
                found.append((path, name, key))
    return found


def _check_adapters(config, adapter_name: str, configs: dict, model: nn.Module) -> None:
    """PEFT's ``LoraModel._check_new_adapter_config`` for parameter targets (before any matching),
    and the defaults fastpeft cannot reproduce."""
    wanted = set(config.target_parameters)
    for other_name, other in configs.items():
        theirs = getattr(other, "target_parameters", None)
        if other_name != adapter_name and theirs and set(theirs) != wanted:
            raise ValueError(
                "When using multiple adapters with `target_parameters`, all adapters must target the same set of "
                f"parameters, but got {sorted(wanted)} for the new adapter and {sorted(theirs)} for adapter "
                f"'{other_name}'.")
    model_type = targeting._model_type(model)
    if config.target_modules is None and model_type in _PEFT_DEFAULT_MODEL_TYPES:
        raise ValueError(
            f"target_parameters with target_modules=None: PEFT adds its default target_modules for model_type "
            f"'{model_type}' next to the parameters, and fastpeft has no default for it; pass target_modules=[] "
            "(parameters only) or the module names")


def _check_layer_config(config, model_paths: list, model: nn.Module) -> None:
    """PEFT's refusals in ``lora.ParamWrapper``'s constructor (raised once a parameter matched),
    and the initializations fastpeft does not compute for parameters."""
    who = "lora.ParamWrapper (target_parameters)"
    if config.lora_dropout:
        raise ValueError(f"{who} does not work with lora_dropout != 0.")
    fan_in_fan_out = config.fan_in_fan_out  # PEFT's module targets reset it from their base first
    for path in model_paths:
        kind = _kind_of(model.get_submodule(path))
        if kind in ("linear", "quant"):
            fan_in_fan_out = False
        elif kind == "conv1d":
            fan_in_fan_out = True
    if fan_in_fan_out:
        raise ValueError(f"{who} does not work with fan_in_fan_out.")
    if getattr(config, "lora_bias", False):
        raise ValueError(f"{who} does not work with lora_bias=True.")
    if config.use_dora:
        raise ValueError(f"{who} does not work with use_dora=True.")
    for name in ("velora_config", "kasa_config"):
        if getattr(config, name, None) is not None:
            raise ValueError(f"{who} does not work when `{name}` is set.")
    # PEFT's ParamWrapper knows no LoRA variant (its lora_variants is {(): None}): any requested one raises
    variants = [n for n in _VARIANT_FIELDS if getattr(config, n, None)]
    init = config.init_lora_weights
    if init == "mica":  # a variant declared through init_lora_weights
        variants.append("init_lora_weights='mica'")
    if variants:
        raise ValueError(f"{who} does not work with LoRA variants like DoRA: {', '.join(variants)}.")
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva"):
        raise ValueError(
            f"{who}: init_lora_weights={init!r} reads or rewrites `base_layer.weight`, which a parameter target "
            "does not have (PEFT fails there too); use True, False or 'gaussian'")


def _kind_of(module: nn.Module) -> str:
    from .nn._base_kinds import base_kind

    return base_kind(module.base_layer if isinstance(module, AdapterLayer) else module)


def _check_parameter(module: nn.Module, name: str, key: str) -> None:
    p = getattr(module, name)
    if p.dtype not in _FLOAT_DTYPES or type(p).__module__.startswith("bitsandbytes"):
        raise ValueError(f"target_parameters: {key!r} is a {type(p).__name__} of dtype {p.dtype}; fastpeft adds LoRA "
                         "to float16/bfloat16/float32/float64 parameters only (quantized or float8 weights: PEFT "
                         "upcasts them on every call, which fastpeft does not implement)")
    if p.dim() not in (2, 3):
        raise ValueError(f"lora.ParamWrapper was initialized with {p.dim()} dimensional Parameter, but only 2d and "
                         f"3d are supported ({key!r}).")
    if hasattr(module, "parametrizations"):
        raise NotImplementedError(f"target_parameters: the module holding {key!r} has torch parametrizations; LoRA on "
                                  "a parametrized module's parameters is not supported by fastpeft")
    if "forward" in module.__dict__:
        raise NotImplementedError(f"target_parameters: the module holding {key!r} has its forward replaced on the "
                                  "instance (accelerate hooks?); LoRA on its parameters needs the class's forward")


def _no_match(config) -> targeting.NoMatchingModuleError:
    if not config.target_modules:
        return targeting.NoMatchingModuleError(
            "No `target_modules` passed but also no `target_parameters` found. Please check the values for these "
            f"arguments (target_parameters={sorted(config.target_parameters)!r}).")
    return targeting.NoMatchingModuleError(
        f"Target modules {config.target_modules} not found in the base model, and target_parameters="
        f"{sorted(config.target_parameters)!r} matched no parameter. Please check the target modules and try again.")


def inject_parameters(model: nn.Module, config, adapter_name: str, configs: dict, paths: list, created: list,
                      autocast: bool = False, loading: bool = False) -> list[str]:
    """Add adapter ``adapter_name`` to the parameters ``config.target_parameters`` selects (after
    the module targets ``paths`` got theirs), recording each replaced module in ``created`` as
    ``(parent, child name, original)`` for ``fastpeft.tuner.inject``'s rollback. Returns the
    parameter keys. ``loading``: saved weights come next (the init is moot)."""
    _check_adapters(config, adapter_name, configs, model)
    found = find_target_parameters(model, config)
    if not found and not paths:
        raise _no_match(config)
    if found:
        _check_layer_config(config, paths, model)
    elif config.target_parameters:
        warnings.warn(f"target_parameters={sorted(config.target_parameters)} were set but no parameter was matched.",
                      RuntimeWarning, stacklevel=4)
    if config.target_modules and not paths:
        warnings.warn(f"target_modules={config.target_modules} were set but no module was matched.", RuntimeWarning,
                      stacklevel=4)
    init = True if loading or config.init_lora_weights == "eva" else config.init_lora_weights
    keys, added = [], []
    try:
        for path, name, key in found:
            layer = _layer_for(model, path, name, key, created)
            W = layer.get_param()
            dtype = torch.float32 if autocast and W.dtype in (torch.float16, torch.bfloat16) else W.dtype
            r, alpha = targeting.get_rank_and_alpha(key, config)
            layer.add_adapter(adapter_name, r=r, lora_alpha=alpha, use_rslora=config.use_rslora,
                              init_lora_weights=init, dtype=dtype)
            added.append(layer)
            keys.append(key)
    except BaseException:
        # the caller's rollback deletes the adapter through the outermost layers and restores the
        # modules this call replaced; layers of earlier adapters that got it here lose it now
        for layer in added:
            AdapterLayer.delete_adapter(layer, adapter_name)
        raise
    return keys


def _layer_for(model: nn.Module, path: str, name: str, key: str, created: list) -> LoraParam:
    """The LoraParam layer for parameter ``name`` of the module at ``path``: the existing one (an
    earlier adapter's), or a new one replacing that module (recorded in ``created``)."""
    if not path:
        raise ValueError(f"Targeting an nn.Parameter on the top-level module is not supported (parameter '{name}'). ")
    holder_path = strip_base_layer(path)
    holder = model.get_submodule(holder_path)
    if isinstance(holder, AdapterLayer) and not isinstance(holder, LoraParam):
        raise ValueError(
            f"Trying to wrap an `nn.Parameter` of layer '{holder_path}' of type {type(holder.base_layer).__name__}, "
            "which is not a valid target. Make sure that this layer is not also targeted with `target_modules`. "
            "For some models, PEFT will do this automatically, try setting `target_modules=[]` to prevent it.")
    layer = next((m for m in (holder._nest() if isinstance(holder, LoraParam) else [])
                  if m.parameter_name == name), None)
    if layer is None:
        target = model.get_submodule(path)
        base = target.get_base_layer() if isinstance(target, LoraParam) else target
        _check_parameter(base, name, key)
        layer = LoraParam(target, name)
        parent, child = (model.get_submodule(path.rpartition(".")[0]), path.rpartition(".")[2]) if "." in path \
            else (model, path)
        setattr(parent, child, layer)
        created.append((parent, child, target))
    return layer
