"""Which adapter layer wraps a base module, and how one adapter is added to it (the per-layer
half of ``fastpeft.tuner.inject``): the layer class per base kind and method (``new_layer``),
the rank, alpha, dtype and options each layer gets from the config (``add_to_layer``)."""
from __future__ import annotations

import torch
from torch import nn

from . import targeting
from .nn import AdaLoraLinear, AdapterLayer, IA3Linear, LoraEmbedding, LoraLinear
from .nn._base_kinds import base_kind
from .nn.lora_conv import conv_layer_for
from .nn.lora_mha import mha_layer_for

_LAYER_FOR = {"lora": LoraLinear, "adalora": AdaLoraLinear, "ia3": IA3Linear}


def adapter_dtype(base: nn.Module, autocast: bool) -> torch.dtype | None:
    w = getattr(base, "weight", None)
    if w is None or not w.is_floating_point():
        return torch.float32
    if autocast and w.dtype in (torch.float16, torch.bfloat16):
        return torch.float32  # PEFT's autocast_adapter_dtype=True
    return w.dtype


def new_layer(method: str, module: nn.Module, path: str, config) -> AdapterLayer:
    kind = base_kind(module)
    if isinstance(module, nn.MultiheadAttention):  # LoRA on nn.MultiheadAttention (fastpeft/nn/lora_mha.py)
        return mha_layer_for(method, module, path)
    if kind == "other":
        raise ValueError(
            f"target module {path!r} is a {type(module).__name__}; fastpeft adapts nn.Linear, "
            f"transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d and bitsandbytes Linear4bit/Linear8bitLt"
        )
    if kind == "conv":  # LoRA on Conv1d/2d/3d, AdaLoRA on Conv2d, IA3 on Conv2d/3d (PEFT's coverage)
        return conv_layer_for(method, module, path, method == "ia3" and targeting.is_feedforward(path, config))
    if method == "lora" and kind == "embedding":
        return LoraEmbedding(module)
    if kind == "embedding":
        raise ValueError(f"{method} on embedding layers is not supported (module {path!r})")
    if method == "ia3":
        return IA3Linear(module, is_feedforward=targeting.is_feedforward(path, config))
    return _LAYER_FOR[method](module)


def add_to_layer(layer, method, adapter_name, path, config, autocast, loading: bool = False):
    """Add the adapter to one layer. ``loading``: its weights come next, so an initialization that
    only sets the starting A and B (eva, orthogonal, ...: refused for new adapters) is moot."""
    dtype = adapter_dtype(getattr(layer, "dtype_source", layer.base_layer), autocast)
    if method == "ia3":
        layer.add_adapter(adapter_name, init_ia3_weights=config.init_ia3_weights, dtype=dtype)
        return
    r, alpha = targeting.get_rank_and_alpha(path, config)
    if method == "adalora":
        # PEFT builds every layer at init_r and shrinks it to the rank pattern only when saved
        # weights are loaded (resize_modules_by_rank_pattern); a layer pruned to rank 0 keeps
        # zero-size tensors and ranknum 0
        ranks = targeting.adalora_ranks(config) if loading and getattr(config, "rank_pattern", None) else {}
        r = int(ranks.get(path, config.init_r))
        layer.add_adapter(adapter_name, r=r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          init_lora_weights=config.init_lora_weights, dtype=dtype,
                          ranknum=config.init_r if r > 0 else 0, inference_mode=getattr(config, "inference_mode", False))
        return
    from .nn import lora_variants

    variant = lora_variants.prepare(layer, path, config, r)  # a LoRA variant: checked before anything changes
    if isinstance(layer, LoraLinear):  # pissa / olora: checked, and the base weight kept for a rollback
        from .nn import lora_init

        lora_init.remember_base(layer, adapter_name, config.init_lora_weights, r, getattr(config, "lora_bias", False))
    layer.add_adapter(
        adapter_name,
        r=r,
        lora_alpha=alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        lora_bias=getattr(config, "lora_bias", False),
        init_lora_weights=True if loading and init_needs_peft(config.init_lora_weights) else config.init_lora_weights,
        dtype=dtype,
    )
    if isinstance(layer, LoraLinear):
        lora_variants.attach(layer, variant, adapter_name, config, loading)


def init_needs_peft(init) -> bool:
    """An ``init_lora_weights`` string fastpeft's layers do not compute (eva, corda, loftq, lora_ga,
    mica: data or a quantizer needed). When loading, the file's weights replace it (True); pissa,
    olora and orthogonal run as in PEFT, also when loading (PEFT rewrites the base weights then too)."""
    from .nn import lora_init

    return isinstance(init, str) and init.lower() != "gaussian" and lora_init.parse(init) is None
