"""``fastpeft.quantize``: turn a model's linear layers into bitsandbytes-format 4-bit / 8-bit layers.

The layers are ``bitsandbytes.nn.Linear4bit`` / ``bitsandbytes.nn.Linear8bitLt`` quantized by
bitsandbytes' own code on the weight's device, byte for byte what Transformers'
``BitsAndBytesConfig`` stores for the same weights, so they are interchangeable with bitsandbytes'
own layers: same forward, same ``state_dict`` (it
saves with safetensors and loads into a bitsandbytes layer), and PEFT / Transformers treat them
as bitsandbytes layers. fastpeft's adapters on them run the fused dequantizing kernels.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ._progress import progress

__all__ = ["quantize"]

_BITS = (4, 8)
_QUANT_TYPES = ("nf4", "fp4")
_FLOAT_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32)


def _validate(model, bits, quant_type, double_quant, compute_dtype, skip_modules) -> tuple[str, ...]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"quantize: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(bits, bool) or bits not in _BITS:
        raise ValueError(f"quantize: bits={bits!r} is not supported; allowed: 4 or 8")
    if not isinstance(quant_type, str) or quant_type not in _QUANT_TYPES:
        raise ValueError(f"quantize: quant_type={quant_type!r} is not supported; allowed: 'nf4' or 'fp4' (4-bit)")
    if bits == 8 and quant_type != "nf4":
        raise ValueError(
            f"quantize: quant_type={quant_type!r} applies to 4-bit only; with bits=8 (LLM.int8) leave quant_type "
            f"at its default 'nf4' or use bits=4"
        )
    if not isinstance(double_quant, bool):
        raise ValueError(f"quantize: double_quant must be True or False, got {double_quant!r}")
    if compute_dtype is not None and (not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point):
        raise ValueError(
            f"quantize: compute_dtype={compute_dtype!r} is not a floating dtype; allowed: None, torch.float16, "
            f"torch.bfloat16, torch.float32"
        )
    if compute_dtype is not None and compute_dtype not in _FLOAT_WEIGHTS:
        raise ValueError(
            f"quantize: compute_dtype={compute_dtype!r} is not supported by bitsandbytes; allowed: None, "
            f"torch.float16, torch.bfloat16, torch.float32"
        )
    if skip_modules is None:
        return ()
    if isinstance(skip_modules, str):
        skip_modules = (skip_modules,)
    try:
        names = tuple(skip_modules)
    except TypeError:
        raise ValueError(f"quantize: skip_modules must be a list of module names, got {type(skip_modules).__name__}") from None
    bad = [s for s in names if not isinstance(s, str) or not s]
    if bad:
        raise ValueError(f"quantize: skip_modules must hold non-empty module-name strings, got {bad!r}")
    return names


def _matches(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _plain_linear(module: nn.Module) -> bool:
    """An nn.Linear computed by nn.Linear.forward (subclasses with another forward, bitsandbytes
    layers and the attention out-projection whose weight MultiheadAttention reads directly are
    left alone)."""
    from .quant.layers import is_quantized_linear

    if not isinstance(module, nn.Linear) or is_quantized_linear(module):
        return False
    if type(module).__name__ == "NonDynamicallyQuantizableLinear":
        return False
    return type(module).forward is nn.Linear.forward


def _output_embedding_ids(model: nn.Module) -> set[int]:
    ids = set()
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except Exception:  # noqa: BLE001 - models without an LM head
            out = None
        if out is not None:
            ids.add(id(out))
    return ids


def _inside_adapter(model: nn.Module, name: str) -> bool:
    """True for an adapter's own projection (PEFT/fastpeft ``lora_A.default``, ...): the nearest
    ancestor that wraps a ``base_layer`` holds this module somewhere other than its base layer."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        anc = model.get_submodule(".".join(parts[:i]))
        if isinstance(getattr(anc, "base_layer", None), nn.Module):
            return parts[i] != "base_layer"
    return False


def _targets(model: nn.Module, skip: tuple[str, ...]):
    out_ids = _output_embedding_ids(model)
    non_linear_params = {
        id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)
    }
    targets = []
    for name, module in model.named_modules():
        if not name or not _plain_linear(module):
            continue
        if id(module) in out_ids or name.split(".")[-1] == "lm_head" or _matches(name, skip):
            continue
        if id(module.weight) in non_linear_params:  # tied to an embedding: that is the output embedding
            continue
        if _inside_adapter(model, name):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        targets.append((name, parent, child, module))
    return targets


def quantize(
    model: nn.Module,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip_modules: str | Iterable[str] | None = None,
    progressbar: bool | None = None,
) -> nn.Module:
    """Replace ``model``'s ``nn.Linear`` layers in place by bitsandbytes-format quantized layers.

    bits=4: ``bitsandbytes.nn.Linear4bit`` with ``quant_type`` "nf4" or "fp4", block size 64,
    double quantization of the absmax when ``double_quant`` (bitsandbytes' ``compress_statistics``)
    and ``compute_dtype`` (None: bitsandbytes picks it from the first input). bits=8:
    ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8 row-wise int8, ``has_fp16_weights=False``,
    threshold 0); ``double_quant`` and ``compute_dtype`` do not apply.

    Not converted: the output embedding (``model.get_output_embeddings()``, modules named
    ``lm_head``, linears whose weight is tied to an embedding), modules whose qualified name
    equals or ends with (``"." + name``) an entry of ``skip_modules``, layers that already are
    bitsandbytes layers (a model quantized by Transformers' ``BitsAndBytesConfig`` is returned
    unchanged), and adapter-internal projections. Arguments are all checked before anything
    changes: a bad value raises ``ValueError`` naming it and the allowed values, leaving the
    model untouched. Sets ``model.is_loaded_in_4bit`` / ``is_loaded_in_8bit`` as Transformers does
    (PEFT reads them). ``progressbar``: a bar over the layers (None: only for more than 64 of
    them; ``HF_HUB_DISABLE_PROGRESS_BARS=1`` hides it). Returns ``model``.
    """
    skip = _validate(model, bits, quant_type, double_quant, compute_dtype, skip_modules)
    targets = _targets(model, skip)
    for name, _, _, module in targets:
        w = module.weight
        if w.device.type == "meta":
            raise ValueError(f"quantize: {name}.weight is on the meta device; load the weights before quantizing")
        if w.dtype not in _FLOAT_WEIGHTS:
            raise ValueError(
                f"quantize: {name}.weight has dtype {w.dtype}; allowed: torch.float16, torch.bfloat16, torch.float32"
            )
    if not targets:
        return model
    from .quant.layers import make_linear4bit, make_linear8bit

    new_layers = []
    with torch.no_grad():
        for _name, parent, child, module in progress(targets, f"Quantizing to {bits}-bit", enabled=progressbar):
            if bits == 4:
                layer = make_linear4bit(
                    module.weight.data, module.bias, quant_type=quant_type, double_quant=double_quant,
                    compute_dtype=compute_dtype,
                )
            else:
                layer = make_linear8bit(module.weight.data, module.bias)
            layer.train(module.training)
            new_layers.append((parent, child, layer))
    for parent, child, layer in new_layers:  # all built: only now touch the model
        setattr(parent, child, layer)
    # what Transformers' bitsandbytes quantizers set: PEFT reads it to pick its bnb LoRA layers
    setattr(model, "is_loaded_in_4bit" if bits == 4 else "is_loaded_in_8bit", True)
    return model
