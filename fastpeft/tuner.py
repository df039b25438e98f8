"""Model-level adapter operations on any ``nn.Module`` (the engine behind PeftModel and the mixin).

The adapters' configs live in ``model.peft_config`` (a dict name -> config), as in PEFT and
Transformers. Every operation that can fail on bad input validates before it changes the
model, or rolls its change back, so a failed call leaves the model working as before.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from . import checkpoint, replication, targeting
from ._locks import changes
from ._progress import progress
from .config import AdaLoraConfig, IA3Config, LoraConfig, PeftConfig
from .layer_factory import add_to_layer as _add_to_layer
from .layer_factory import init_needs_peft as _init_needs_peft
from .layer_factory import new_layer as _new_layer
from .nn import AdapterLayer, ModulesToSaveWrapper
from .nn.base import BASE_NAMES
from .nn.selection import Selection, inside, selecting


def _configs(model: nn.Module) -> dict:
    cfg = getattr(model, "peft_config", None)
    if cfg is None:
        cfg = {}
        model.peft_config = cfg
    return cfg


def adapter_layers(model: nn.Module):
    """The adapter layers of ``model`` in ``model.modules()`` order. Does not walk the adapter
    containers of LoRA/IA3 layers (``lora_A.<name>`` ...): with hundreds of adapters they are
    most of the modules, and no adapter layer lives there."""
    out, seen = [], set()

    def walk(m):
        if id(m) in seen:
            return
        seen.add(id(m))
        if isinstance(m, AdapterLayer):
            out.append(m)
            if not isinstance(m, ModulesToSaveWrapper):
                return
        for child in m._modules.values():
            if child is not None:
                walk(child)

    walk(model)
    return out


def _method(config: PeftConfig) -> str:
    if isinstance(config, AdaLoraConfig):
        return "adalora"
    if isinstance(config, LoraConfig):
        return "lora"
    if isinstance(config, IA3Config):
        return "ia3"
    raise TypeError(f"unsupported config type {type(config).__name__}; expected LoraConfig, IA3Config or AdaLoraConfig")


def _parent(model: nn.Module, path: str):
    if "." in path:
        parent_path, child = path.rsplit(".", 1)
        return model.get_submodule(parent_path), child
    return model, path


@changes
def inject(model: nn.Module, config: PeftConfig, adapter_name: str = "default",
           autocast_adapter_dtype: bool = False, weights: dict | None = None, finish=None) -> list[str]:
    """Add adapter ``adapter_name`` described by ``config`` to ``model`` in place, and fill it
    from ``weights`` (a PEFT-format state dict) when given. ``finish()``: the caller's last step
    (e.g. freezing the new adapter), rolled back with the rest when it raises.

    Returns the module paths that got the adapter. Raises (model unchanged: every layer it
    created is unwrapped again) for a duplicate name, a config of another method than the
    model's existing adapters, a config that targets nothing, or weights that do not fit.
    """
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    configs = _configs(model)
    if adapter_name in configs:
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    method = _method(config)
    for other_name, other in configs.items():
        if _method(other) != method:
            raise ValueError(
                f"cannot add a {method} adapter next to {_method(other)} adapter {other_name!r}: "
                f"one model holds adapters of one method"
            )
    from .nn import lora_init

    init = getattr(config, "init_lora_weights", True)
    if method == "lora" and _init_needs_peft(init) and weights is None:
        raise ValueError(
            f"init_lora_weights={init!r}: fastpeft does not implement this initialization for a new adapter "
            "(PEFT's needs data, gradients or a quantizer: eva, corda, loftq, lora_ga, mica); create the adapter "
            "with True, False, 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora' or 'orthogonal', or load an adapter "
            "trained with it (its saved weights replace the initialization)"
        )
    if method == "lora" and weights is not None and configs and any(  # PEFT's load_adapter warning
            lora_init.changes_base(getattr(c, "init_lora_weights", True)) for c in [config, *configs.values()]):
        warnings.warn("PiSSA / OLoRA change the base weights of the model and should thus not be used with other "
                      "adapters; consider converting the adapter into a normal LoRA adapter", stacklevel=3)
    if method == "lora" and lora_init.changes_base(init):
        finish = lora_init.after_success(model, adapter_name, finish)  # the base copies live until then
    if method == "lora":  # LoRA variants (aLoRA, Arrow, BD-LoRA, KaSA): model-level checks (fastpeft/nn/lora_variants)
        from .nn import lora_variants

        finish = lora_variants.before_inject(model, configs, adapter_name, config, finish)
    config = targeting.prepare_config(config, model)
    # ----- layer_replication: PEFT's replicate_layers before targeting (fastpeft/replication.py) -----
    undo_replication = replication.apply(model, config, configs)
    try:
        paths = targeting.find_target_modules(model, config)
        # map 'x.base_layer' (the base inside an existing adapter layer) to the layer itself
        paths = list(dict.fromkeys(p[: -len(".base_layer")] if p.endswith(".base_layer") else p for p in paths))
        save_paths = targeting.find_modules_to_save(model, config) if getattr(config, "modules_to_save", None) else []
    except BaseException:
        undo_replication()
        raise
    # ----- end layer_replication -----
    created: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, child name, original) to undo
    configs[adapter_name] = config
    base_flags = [(p, p.requires_grad) for _, p in _base_named_parameters(model)]  # restored on failure
    try:
        for path in paths:
            module = model.get_submodule(path)
            if isinstance(module, ModulesToSaveWrapper):
                continue
            if not isinstance(module, AdapterLayer):
                layer = _new_layer(method, module, path, config)
                parent, child = _parent(model, path)
                setattr(parent, child, layer)
                created.append((parent, child, module))
                module = layer
            _add_to_layer(module, method, adapter_name, path, config, autocast_adapter_dtype, loading=weights is not None)
        # ----- target_parameters: LoRA on nn.Parameters (fastpeft/targeting_params.py) -----
        if getattr(config, "target_parameters", None):
            from .targeting_params import inject_parameters

            inject_parameters(model, config, adapter_name, configs, paths, created, autocast=autocast_adapter_dtype,
                              loading=weights is not None)
        # ----- end target_parameters -----
        # ----- trainable_token_indices: trainable embedding rows (fastpeft/targeting_tokens.py) -----
        if getattr(config, "trainable_token_indices", None) is not None:
            from .targeting_tokens import inject_trainable_tokens

            inject_trainable_tokens(model, config, adapter_name, save_paths, created)
        # ----- end trainable_token_indices -----
        for path in save_paths:
            module = model.get_submodule(path)
            if not isinstance(module, ModulesToSaveWrapper):
                wrapper = ModulesToSaveWrapper(module)
                parent, child = _parent(model, path)
                setattr(parent, child, wrapper)
                created.append((parent, child, module))
                module = wrapper
            module.add_adapter(adapter_name)
        if len(configs) == 1:
            set_adapter(model, adapter_name)
        else:
            current = active_adapters(model)
            for layer in adapter_layers(model):
                layer.set_adapter(current)
        enabled = not any(layer.disable_adapters for layer in adapter_layers(model))
        for layer in adapter_layers(model):
            layer.enable_adapters(enabled)
        if weights is not None:
            load_weights(model, weights, adapter_name, config)
        _freeze_base(model)
        if finish is not None:
            finish()
    except BaseException:  # KeyboardInterrupt too: all or nothing, then re-raised
        _remove_adapter_from_layers(model, adapter_name)
        for parent, child, original in reversed(created):
            setattr(parent, child, original)
        undo_replication()  # layer_replication: the original stack of layers again
        configs.pop(adapter_name, None)
        if not configs:
            model._fastpeft_active = []
        else:
            for layer in adapter_layers(model):
                layer.set_adapter(active_adapters(model))
        for p, flag in base_flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        raise
    return paths


def base_children(m: nn.Module):
    """(name, child) pairs a walk of the *base* model enters below ``m``: a modules_to_save
    wrapper's original module, an adapter layer's base layer, any other module's children (the
    adapter containers, e.g. ``lora_A`` Linear layers, are never entered)."""
    if isinstance(m, ModulesToSaveWrapper):
        return [("original_module", m.original_module)]
    if isinstance(m, AdapterLayer):
        return [("base_layer", m.base_layer)]
    return m._modules.items()


def _base_named_parameters(model: nn.Module):
    """(name, parameter) of the parameters outside the adapters, as ``named_parameters`` names
    them; adapter layers are entered only through their base module, so the cost does not grow
    with the number of adapters."""
    seen: set = set()

    def walk(m, prefix):
        for n, p in m._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield prefix + n, p
        for cn, c in base_children(m):
            if c is not None:
                yield from walk(c, prefix + cn + ".")

    yield from walk(model, "")


def _freeze_base(model: nn.Module) -> None:
    """Only adapter parameters train (and biases per the configs' ``bias`` mode, as PEFT)."""
    bias_modes = {getattr(c, "bias", "none") for c in _configs(model).values()}
    for n, p in _base_named_parameters(model):
        trainable = False
        if "all" in bias_modes and (n == "bias" or n.endswith(".bias")):  # PEFT: not e.g. "gate_up_proj_bias"
            trainable = True
        elif "lora_only" in bias_modes and n.endswith("base_layer.bias"):
            trainable = True
        if p.requires_grad != trainable:
            p.requires_grad_(trainable)


def _remove_adapter_from_layers(model: nn.Module, adapter_name: str) -> None:
    for layer in adapter_layers(model):
        if adapter_name in layer._adapters:
            if adapter_name in layer.merged_adapters:
                layer.unmerge()
            layer.delete_adapter(adapter_name)


# ----- state ----------------------------------------------------------------------------------
@changes
def load_weights(model: nn.Module, file_sd: dict, adapter_name: str, config: PeftConfig) -> None:
    """Copy a PEFT-format state dict into adapter ``adapter_name`` (already injected).

    Raises ValueError (before copying anything) for keys that match no module, shapes that
    differ from the model's (another rank or hidden size), or a file with no weight for it.
    """
    own = model.state_dict(keep_vars=True)
    mapped, unexpected = checkpoint.adapter_keys_to_model_keys(file_sd, adapter_name, config, own.keys())
    if unexpected:
        raise ValueError(
            f"adapter {adapter_name!r}: {len(unexpected)} weight(s) match no module of the model, e.g. "
            f"{unexpected[:3]}; is this adapter for another model?"
        )
    if not mapped:
        raise ValueError(f"adapter {adapter_name!r}: the weights file holds no weight for this adapter")
    from .parallel.sharded_state import local_entries

    mapped = local_entries(model, mapped)  # tensor-parallel layers: this rank's pieces of the full tensors
    for key, t in mapped.items():
        target = own[key]
        if tuple(target.shape) != tuple(t.shape):
            raise ValueError(
                f"adapter {adapter_name!r}: weight {key!r} has shape {tuple(t.shape)} but the model "
                f"expects {tuple(target.shape)} (r={getattr(config, 'r', '?')} in the config; another "
                f"rank or hidden size?)"
            )
    expected = set(checkpoint.expected_adapter_keys(own.keys(), adapter_name))
    missing = sorted(k for k in expected if k not in mapped)
    if missing:
        warnings.warn(f"adapter {adapter_name!r}: {len(missing)} weight(s) not in the file, e.g. {missing[:3]}", stacklevel=2)
    with torch.no_grad():
        for key, t in mapped.items():
            own[key].copy_(t)
    for layer in adapter_layers(model):
        layer.bank.mark_stale()


def adapter_state_dict(model: nn.Module, adapter_name: str) -> dict:
    configs = _configs(model)
    if adapter_name not in configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has {list(configs)}")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return checkpoint.get_adapter_state_dict(sd, adapter_name, configs[adapter_name])


# ----- activity -------------------------------------------------------------------------------
def _check_names(model: nn.Module, names: Iterable[str], what: str) -> list[str]:
    configs = _configs(model)
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"{what}: unknown adapter(s) {unknown}; the model has {list(configs)}")
    return names


@changes
def set_adapter(model: nn.Module, names) -> None:
    names = _check_names(model, names, "set_adapter")
    if not names:
        raise ValueError("set_adapter: give at least one adapter name")
    for layer in adapter_layers(model):
        layer.set_adapter(names)
    model._fastpeft_active = list(names)


def active_adapters(model: nn.Module) -> list[str]:
    act = getattr(model, "_fastpeft_active", None)
    if act is not None:
        return list(act)
    return []


@changes
def enable_adapters(model: nn.Module, enabled: bool = True) -> None:
    for layer in adapter_layers(model):
        layer.enable_adapters(enabled)


def adapters_enabled(model: nn.Module) -> bool:
    layers = adapter_layers(model)
    return not layers or not layers[0].disable_adapters


@changes
def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    _check_names(model, [adapter_name], "delete_adapter")
    _remove_adapter_from_layers(model, adapter_name)
    configs = _configs(model)
    del configs[adapter_name]
    act = [a for a in active_adapters(model) if a != adapter_name]
    if not act and configs:
        act = [next(iter(configs))]
    model._fastpeft_active = act
    for layer in adapter_layers(model):
        layer.set_adapter(act)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str | None], repeat: bool = True):
    """Row ``i`` of every batch in this block uses adapter ``adapter_names[i]``
    (``"__base__"`` or ``None``: no adapter), for the calls of this thread / asyncio task only
    (:mod:`fastpeft.nn.selection`). ``repeat``: a name may cover the ``k`` consecutive rows that
    generation makes of each prompt row (beams, ``num_return_sequences``); a forward's own
    ``adapter_names`` pass False (one name per row). Nothing is left behind however the block
    ends, and blocks may end in any order."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"adapter_names must be a list of names, one per batch row, got {type(adapter_names).__name__}")
    names = tuple("__base__" if n is None else n for n in adapter_names)
    configs = _configs(model)
    unknown = sorted({n for n in names if n not in configs and n not in BASE_NAMES})
    if unknown:
        raise ValueError(f"mixed batch: unknown adapter(s) {unknown}; the model has {list(configs)}")
    layers = adapter_layers(model)
    if any(layer.merged for layer in layers):
        raise ValueError("cannot use a mixed batch while adapters are merged; call unmerge_adapter() first")
    sel = Selection(names, repeat)
    with selecting(dict.fromkeys(layers, sel)) as block:
        handles = [w.register_forward_pre_hook(_peft_names_hook(names, block), with_kwargs=True)
                   for w in _peft_wrappers(model)]
        opened = []
        try:
            for layer in layers:  # recorded for compiled forwards (which cannot read the call's own)
                layer._open_block(block, names)
                opened.append(layer)
            yield
        finally:
            for layer in opened:
                layer._close_block(block)
            for h in handles:
                h.remove()


def _peft_wrappers(model: nn.Module) -> list:
    """PEFT's own ModulesToSaveWrapper modules (fastpeft.optimize keeps them, see docs/optimize.md)."""
    import sys

    other = sys.modules.get("peft.utils.other")  # none can exist unless peft was imported
    cls = getattr(other, "AuxiliaryTrainingWrapper", None)
    return [] if cls is None else [m for m in model.modules() if isinstance(m, cls)]


def _peft_names_hook(names: tuple, block):
    """Forward pre-hook giving a PEFT wrapper PEFT's ``adapter_names`` argument, one name per
    row of its input (repeated when generation repeated the rows, as for beam search), for the
    calls inside ``block`` only (a hook is seen by every thread's calls)."""

    def hook(module, args, kwargs):
        if not inside(block):
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        k = max(1, x.shape[0] // len(names))
        kwargs["adapter_names"] = [n for n in names for _ in range(k)]
        return args, kwargs

    return hook


# ----- merging ----------------------------------------------------------------------------------
@changes
def merge(model: nn.Module, adapter_names=None, safe_merge: bool = False) -> None:
    names = _check_names(model, adapter_names, "merge") if adapter_names is not None else None
    replication.refuse_merge(model)  # layer_replication: copies share base weights
    for layer in adapter_layers(model):
        layer.merge(names, safe_merge=safe_merge)


@changes
def unmerge(model: nn.Module) -> None:
    for layer in adapter_layers(model):
        layer.unmerge()


@changes
def unload(model: nn.Module, merge_first: bool, adapter_names=None, safe_merge: bool = False,
           progressbar: bool = False) -> nn.Module:
    """Replace every adapter layer by its base (merged first if asked); returns ``model``.
    ``progressbar``: a bar over the layers, as PEFT's ``merge_and_unload(progressbar=True)``."""
    names = _check_names(model, adapter_names, "merge") if merge_first and adapter_names is not None else None
    if merge_first:
        replication.refuse_merge(model)  # layer_replication: copies share base weights
    desc = "Unloading " + ("and merging " if merge_first else "") + "model"
    if merge_first:  # every merge first: one that raises leaves all layers wrapped (unmerge() recovers)
        for layer in progress(adapter_layers(model), desc, enabled=progressbar):
            layer.merge(names, safe_merge=safe_merge)
    layers = [(path, module) for path, module in model.named_modules() if isinstance(module, AdapterLayer)]
    # inner layers first (reversed module order): a wrapper's children are replaced before the wrapper
    for path, module in progress(layers[::-1], desc, enabled=progressbar and not merge_first):
        parent, child = _parent(model, path)
        if isinstance(module, ModulesToSaveWrapper):
            act = [a for a in module.active_adapters if a in module.modules_to_save]
            replacement = module.modules_to_save[act[0]] if act else module.original_module
        else:
            replacement = module.base_layer
        setattr(parent, child, replacement)
    if hasattr(model, "peft_config"):
        model.peft_config = {}
    model._fastpeft_active = []
    return model


@changes
def set_requires_grad(model: nn.Module, adapter_names, requires_grad: bool = True) -> None:
    """Set ``requires_grad`` on every parameter of the named adapters (layers and modules_to_save
    copies), as PEFT's ``set_requires_grad``; names the model lacks raise ValueError first."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    _check_names(model, names, "set_requires_grad")
    for layer in adapter_layers(model):
        for name in names:
            if name in layer.adapter_names:
                for p in layer._params_of(name):
                    p.requires_grad_(requires_grad)
