"""What kind of base module an adapter wraps, and how to read its weight as [N, K].

"conv" is a ``torch.nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` (PEFT's isinstance rule, subclasses
too); transformers' ``Conv1D`` (a linear layer with its weight stored [K, N]) is "conv1d"."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._optional import transformers_conv1d
from ..quant.layers import has_bnb_forward, is_quantized_linear

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def base_kind(module: nn.Module) -> str:
    """"linear", "conv1d", "embedding", "conv", "quant" or "other" for an adaptable base module."""
    if is_quantized_linear(module):  # bitsandbytes 4/8-bit and subclasses: quant/layers.py's one rule
        return "quant"
    conv1d = transformers_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, CONV_TYPES):
        return "conv"
    return "other"


# type -> fused_forward_ok's answer: it depends on the class only, and the layers ask on every
# forward (0.77 us uncached for an nn.Linear: an MRO walk; a dict lookup cached)
_fused_ok: dict[type, bool] = {}


def fused_forward_ok(module: nn.Module) -> bool:
    """True when ``module``'s forward is exactly the plain matmul/lookup/convolution the fused
    routes compute (a subclass with its own forward, e.g. a scaled embedding, runs unfused)."""
    t = type(module)
    # not the cache while tracing: torch.compile would guard on the whole dict, and a base class
    # seen later (a new entry) would recompile every graph that read it
    ok = None if torch.compiler.is_compiling() else _fused_ok.get(t)
    if ok is None:
        if is_quantized_linear(module):
            ok = has_bnb_forward(module)
        else:  # (a Conv1D instance exists only once transformers is loaded, so caching False is safe)
            ok = t is nn.Linear or t is nn.Embedding or t in CONV_TYPES or t is transformers_conv1d()
        if not torch.compiler.is_compiling():
            _fused_ok[t] = ok
    return ok


_module_globals = torch.nn.modules.module


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its forward: forward hooks or pre-hooks on it,
    global ones (``register_module_forward_hook``), or a forward replaced on the instance
    (accelerate's ``add_hook_to_module``, e.g. ``AlignDevicesHook`` of ``dispatch_model`` with
    offloaded weights). PEFT calls ``base_layer(x)``, so then the layers must too."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
                or _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks)


def runs_fused(module: nn.Module) -> bool:
    """Whether a layer may replace the call of its base ``module`` by the fused operator: the
    plain forward (:func:`fused_forward_ok`) and nothing else runs when it is called (no hooks)."""
    return fused_forward_ok(module) and not has_hooks(module)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(K, N) = (input features, output features) of a linear-like base, (V, D) of an embedding,
    (in channels, out channels) of a convolution."""
    kind = base_kind(module)
    if kind == "conv":
        return module.in_channels, module.out_channels
    if kind == "conv1d":
        return module.weight.shape[0], module.weight.shape[1]
    if kind == "embedding":
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    raise TypeError(
        f"cannot adapt {type(module).__name__}: expected nn.Linear, transformers Conv1D, "
        f"nn.Embedding, nn.Conv1d/2d/3d or a bitsandbytes Linear4bit/Linear8bitLt"
    )


def weight_nk(module: nn.Module) -> Tensor:
    """The base weight as [N, K] (a transposed view for Conv1D; dequantized for 4/8-bit)."""
    kind = base_kind(module)
    if kind == "conv1d":
        return module.weight.t()
    if kind == "quant":
        from ..quant.layers import dequantize_weight

        return dequantize_weight(module)
    return module.weight


def adapter_device(module: nn.Module) -> torch.device:
    """Where a new adapter of base ``module`` lives: its weight's device, or, for a weight that
    accelerate offloaded (on the meta device, loaded by the module's ``_hf_hook`` for each call:
    ``cpu_offload`` / ``disk_offload`` / ``dispatch_model`` / ``from_pretrained(device_map=...)``),
    the hook's execution device, where the base computes. (An adapter on the meta device would
    hold no values: copying a saved adapter into it does nothing.)"""
    w = getattr(module, "weight", None)
    device = w.device if isinstance(w, Tensor) else torch.device("cpu")
    if device.type != "meta":
        return device
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        exec_device = getattr(h, "execution_device", None)
        if exec_device is not None:
            return torch.device(exec_device if not isinstance(exec_device, int) else f"cuda:{exec_device}")
    return device  # meta without a hook (e.g. init_empty_weights): as PEFT, the adapter is made there too

