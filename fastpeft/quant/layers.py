"""What fastpeft's adapter layers call for a quantized base module.

A quantized base is a ``bitsandbytes.nn.Linear4bit`` or ``bitsandbytes.nn.Linear8bitLt`` as
Transformers' ``BitsAndBytesConfig`` or :func:`fastpeft.quantize` creates it. These functions
read its storage (``fastpeft/quant/formats.py`` describes the formats) and run the fused
operators ``torch.ops.fastpeft.adapter_linear_4bit`` / ``adapter_linear_8bit``:

* :func:`is_quantized_linear` - is this module such a layer?
* :func:`quantized_adapter_linear` - base + adapters in one op, the semantics of
  ``torch.ops.fastpeft.adapter_linear`` with ``weight`` = the dequantized weight.
* :func:`dequantize_weight` - the weight as a dense ``[N, K]`` tensor (merging, DoRA norms).
* :func:`quantized_like` - a new layer of the same kind and settings holding a new weight
  (merge_and_unload: dequantize, merge, requantize).

The base product follows bitsandbytes' layer: ``Linear4bit`` casts ``x`` to its compute dtype
(set from the first input when it was not given, exactly as bitsandbytes does), dequantizes the
weight to that dtype and casts the result back; ``Linear8bitLt`` dequantizes to ``x``'s dtype
(weight-only, like bitsandbytes' fp path; its int8 GPU path also rounds ``x`` to int8, see
``docs/quantization.md``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import formats

__all__ = [
    "is_quantized_linear",
    "quantized_adapter_linear",
    "dequantize_weight",
    "quantized_like",
    "make_linear4bit",
    "make_linear8bit",
]

_BNB_NAMES = ("Linear4bit", "Linear8bitLt")


def _bnb_kind(module) -> str | None:
    """"4bit", "8bit" or None. Matches subclasses (LinearNF4, LinearFP4, ...) by their bnb base."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes") and cls.__name__ in _BNB_NAMES:
            return "4bit" if cls.__name__ == "Linear4bit" else "8bit"
    return None


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a ``bitsandbytes.nn.Linear4bit`` or ``Linear8bitLt`` (or a subclass)."""
    return _bnb_kind(module) is not None


def has_bnb_forward(module: nn.Module) -> bool:
    """True when the ``forward`` that runs is bitsandbytes' own (LinearNF4 only presets options;
    a user subclass that overrides ``forward`` computes something else)."""
    return next(c for c in type(module).__mro__ if "forward" in c.__dict__).__module__.startswith("bitsandbytes")


def _require(module, what: str) -> str:
    kind = _bnb_kind(module)
    if kind is None:
        raise TypeError(f"{what}: expected a bitsandbytes Linear4bit or Linear8bitLt, got {type(module).__name__}")
    return kind


# ---------------------------------------------------------------------------------------------
# reading the storage
# ---------------------------------------------------------------------------------------------


def _quant_state(module):
    qs = getattr(module.weight, "quant_state", None)
    if qs is None:
        qs = getattr(module, "quant_state", None)
    if qs is None:
        raise ValueError(
            f"{type(module).__name__} has no quant_state: its weight is not quantized yet "
            f"(bitsandbytes quantizes on .to(device)); use fastpeft.quantize(model) or move it to a device"
        )
    return qs


def _from_cpu_layout(packed: Tensor, qs) -> tuple[Tensor, Tensor]:
    """Undo bitsandbytes' AVX512-BF16 CPU repacking (done by its own forward on such CPUs).

    The repacked weight is ``[N, K/2]``: for each group of 32 output rows and each pair of
    columns, 32 bytes whose low nibbles hold rows 0..15 and high nibbles rows 16..31 (row-major
    over (row, column-of-pair)); its absmax is ``[K/blocksize, N]`` bfloat16, not nested.
    Returns the canonical bytes and float32 absmax (that absmax is rounded to bfloat16 for good).
    """
    N, K = int(qs.shape[0]), int(qs.shape[1])
    p = packed.reshape(-1, 32)
    lo = p & 0xF
    hi = (p >> 4) & 0xF
    codes = torch.cat([lo, hi], dim=1).reshape(N // 32, K // 2, 32, 2).transpose(1, 2).reshape(-1)
    canon = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).unsqueeze(1)
    absmax = qs.absmax.reshape(K // qs.blocksize, N).t().reshape(-1).float()
    return canon, absmax


def _storage_4bit(module):
    """(qweight bytes, QuantState4bit) of a Linear4bit, in bitsandbytes' canonical layout."""
    qs = _quant_state(module)
    data = module.weight.data
    if getattr(qs, "packing_format_for_cpu", False):
        cache = getattr(qs, "_fastpeft_canonical", None)
        key = (data.data_ptr(), data._version)
        if cache is None or cache[0] != key:
            canon, absmax = _from_cpu_layout(data.view(torch.uint8) if data.dtype != torch.uint8 else data, qs)
            st = formats.QuantState4bit(
                absmax=absmax,
                shape=torch.Size(qs.shape),
                code=formats.code_4bit(qs.quant_type, absmax.device),
                blocksize=int(qs.blocksize),
                quant_type=qs.quant_type,
                dtype=getattr(qs, "original_dtype", qs.dtype),
            )
            cache = (key, canon, st)
            qs._fastpeft_canonical = cache
        return cache[1], cache[2]
    return data, formats.QuantState4bit.from_bnb(qs)


def _storage_8bit(module):
    """(CB int8 [N, K], SCB float32 [N]) of a Linear8bitLt (quantizing on the fly when it holds
    float weights, as bitsandbytes does for ``has_fp16_weights=True``)."""
    w = module.weight
    state = getattr(module, "state", None)
    if w.dtype == torch.int8:
        cb = w.data
    elif state is not None and getattr(state, "CB", None) is not None and not getattr(state, "has_fp16_weights", False):
        cb = state.CB
    else:
        return formats.quantize_8bit_rowwise(w.data)
    scb = getattr(w, "SCB", None)
    if scb is None and state is not None:
        scb = getattr(state, "SCB", None)
    if scb is None:
        raise ValueError("Linear8bitLt holds int8 weights but no SCB row scales (weight.SCB / state.SCB)")
    return cb, scb


def _compute_dtype_4bit(module, x: Tensor) -> torch.dtype:
    # bitsandbytes' Linear4bit.set_compute_type, applied once on the first input: float32 and
    # bfloat16 inputs fix the compute dtype; a float16 input leaves it (None: compute in fp16).
    if not getattr(module, "compute_type_is_set", True):
        if x.dtype in (torch.float32, torch.bfloat16):
            module.compute_dtype = x.dtype
        module.compute_type_is_set = True
    return getattr(module, "compute_dtype", None) or x.dtype


# ---------------------------------------------------------------------------------------------
# public interface
# ---------------------------------------------------------------------------------------------


def quantized_adapter_linear(
    base_layer: nn.Module,
    x2d: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    slot_scales: Tensor | None,
    token_slots: Tensor | None,
    dora_scale: Tensor | None,
    input_scale: Tensor | None,
    output_scale: Tensor | None,
) -> Tensor:
    """``torch.ops.fastpeft.adapter_linear`` semantics on a bitsandbytes base layer -> [M, N].

    ``weight`` = the dequantized base weight, ``bias`` = ``base_layer.bias``; the arguments are
    those of ``adapter_linear`` (``_schema.py``): x2d [M, K], lora_a [S, R, K], lora_b [S, R, N],
    slot_scales [S], token_slots [M or 1, J], dora_scale [S, N], input_scale [K] | [M, K],
    output_scale [N] | [M, N]. Runs ``adapter_linear_4bit`` / ``adapter_linear_8bit``.
    """
    kind = _require(base_layer, "quantized_adapter_linear")
    if x2d.dim() != 2:
        raise ValueError(f"quantized_adapter_linear: x2d must be [M, K], got shape {tuple(x2d.shape)}")
    bias = base_layer.bias
    if kind == "4bit":
        qweight, st = _storage_4bit(base_layer)
        N, K = int(st.shape[0]), int(st.shape[1])
        if x2d.shape[1] != K:
            raise ValueError(f"quantized_adapter_linear: x2d has {x2d.shape[1]} features, the layer expects {K}")
        cd = _compute_dtype_4bit(base_layer, x2d)
        s2 = st.state2
        return torch.ops.fastpeft.adapter_linear_4bit(
            x2d, qweight, st.absmax, st.code.to(device=x2d.device, dtype=torch.float32),
            None if s2 is None else s2.absmax, None if s2 is None else s2.code, st.offset if s2 is not None else None,
            N, st.blocksize, s2.blocksize if s2 is not None else formats.NESTED_BLOCKSIZE, cd,
            bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale,
        )
    cb, scb = _storage_8bit(base_layer)
    if x2d.shape[1] != cb.shape[1]:
        raise ValueError(f"quantized_adapter_linear: x2d has {x2d.shape[1]} features, the layer expects {cb.shape[1]}")
    return torch.ops.fastpeft.adapter_linear_8bit(
        x2d, cb, scb, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale
    )


def dequantize_weight(base_layer: nn.Module) -> Tensor:
    """The base weight as a dense ``[N, K]`` tensor, as PEFT's ``dequantize_bnb_weight`` gives it.

    4-bit: in the dtype the weight had before quantization (bitsandbytes' ``quant_state.dtype``),
    bit for bit ``bnb.functional.dequantize_4bit``. 8-bit: float32 ``CB * SCB / 127``.
    """
    kind = _require(base_layer, "dequantize_weight")
    if kind == "4bit":
        qweight, st = _storage_4bit(base_layer)
        return formats.dequantize_4bit(qweight, st)
    cb, scb = _storage_8bit(base_layer)
    # bnb.functional.int8_vectorwise_dequant's order of operations (PEFT uses it for merges)
    return cb.float() * scb.float().view(-1, 1) * 7.874015718698502e-3


def make_linear4bit(
    weight: Tensor,
    bias: Tensor | None,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype | None = None,
    quant_storage: torch.dtype = torch.uint8,
) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` holding ``weight [N, K]`` quantized by bitsandbytes itself
    (``bitsandbytes.functional.quantize_4bit`` on the weight's device, in the weight's dtype: what
    ``Params4bit`` and so Transformers' ``BitsAndBytesConfig`` store for the same weight, byte for
    byte). :mod:`fastpeft.quant.formats` stays the readable decoder the kernels are tested against."""
    import bitsandbytes as bnb

    N, K = weight.shape
    packed, qs = bnb.functional.quantize_4bit(weight.detach().contiguous(), blocksize=blocksize,
                                              compress_statistics=double_quant, quant_type=quant_type,
                                              quant_storage=quant_storage)
    layer = bnb.nn.Linear4bit(
        K, N, bias=bias is not None, compute_dtype=compute_dtype, compress_statistics=double_quant,
        quant_type=quant_type, quant_storage=quant_storage, device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        packed, requires_grad=False, quant_state=qs, blocksize=blocksize, compress_statistics=double_quant,
        quant_type=quant_type, quant_storage=quant_storage, module=layer, bnb_quantized=True,
    )
    layer.quant_state = qs
    layer.bias = None if bias is None else (bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False))
    return layer


def make_linear8bit(weight: Tensor, bias: Tensor | None, *, threshold: float = 0.0) -> nn.Module:
    """A ``bitsandbytes.nn.Linear8bitLt`` (``has_fp16_weights=False``) holding ``weight [N, K]`` as
    LLM.int8 ``CB``/``SCB``, quantized by bitsandbytes as ``Int8Params`` does it (the weight in
    fp16, ``int8_vectorwise_quant``), on the weight's device."""
    import bitsandbytes as bnb

    N, K = weight.shape
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.detach().contiguous().to(torch.float16))
    layer = bnb.nn.Linear8bitLt(K, N, bias=bias is not None, has_fp16_weights=False, threshold=threshold, device="meta")
    layer.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    layer.bias = None if bias is None else (bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False))
    return layer


def quantized_like(base_layer: nn.Module, new_weight: Tensor) -> nn.Module:
    """A new layer like ``base_layer`` (same class of storage, quant type, block size, double
    quantization, compute dtype / threshold, same bias) holding ``new_weight [N, K]`` requantized.

    Used by merge_and_unload: dequantize, merge, requantize. Requantizing rounds the merged
    weight to the 4/8-bit grid again, so outputs change by up to one quantization step (PEFT
    does the same and warns; fastpeft's adapter layers warn before calling this).
    """
    kind = _require(base_layer, "quantized_like")
    if not has_bnb_forward(base_layer):
        raise TypeError(
            f"quantized_like: {type(base_layer).__name__} subclasses bitsandbytes' "
            f"{'Linear4bit' if kind == '4bit' else 'Linear8bitLt'} with its own forward; merging into it is not "
            f"supported (the requantized layer would be a plain bitsandbytes layer without that forward). Keep the "
            f"adapter unmerged, or merge on the dense weights"
        )
    N, K = base_layer.out_features, base_layer.in_features
    if tuple(new_weight.shape) != (N, K):
        raise ValueError(f"quantized_like: new_weight must be [N, K] = {(N, K)}, got {tuple(new_weight.shape)}")
    bias = base_layer.bias
    if kind == "4bit":
        qs = _quant_state(base_layer)
        _, st = _storage_4bit(base_layer)
        nested = bool(getattr(qs, "original_nested", qs.nested)) if getattr(qs, "packing_format_for_cpu", False) else qs.nested
        w = new_weight.detach()
        if w.dtype != st.dtype and st.dtype in formats.FLOAT_DTYPES:
            w = w.to(st.dtype)
        layer = make_linear4bit(
            w, bias, quant_type=st.quant_type, double_quant=nested, blocksize=st.blocksize,
            compute_dtype=getattr(base_layer, "compute_dtype", None),
            quant_storage=getattr(base_layer.weight, "quant_storage", torch.uint8),
        )
        layer.compute_type_is_set = getattr(base_layer, "compute_type_is_set", layer.compute_type_is_set)
    else:
        threshold = float(getattr(getattr(base_layer, "state", None), "threshold", 0.0) or 0.0)
        layer = make_linear8bit(new_weight.detach(), bias, threshold=threshold)
    layer.train(base_layer.training)
    return layer
