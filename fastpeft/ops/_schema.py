"""The fastpeft operators: definitions, fake (meta) kernels and autograd, in one file.

Every operator is a ``torch.library.custom_op`` whose body checks its arguments (one function
per operator in :mod:`fastpeft.ops._checks`, so a bad argument gets the same ``ValueError``
from every backend), then asks the backend registry (:mod:`fastpeft.ops.backends`) for the
implementation chosen for the input's device, so the backend choice happens in one place and
``torch.compile`` sees one opaque node per call.

Autograd: the backward recomputes the forward with the pure-PyTorch reference and
differentiates that, so every backend trains with exact gradients (at the cost of one extra
forward in training; inference pays nothing).

``adapter_linear`` contract (shapes: M rows, K in, N out, S slots, R padded rank, J adapters
per row)::

    x            [M, K]         input rows
    weight       [N, K]         base weight (any strides: Conv1D passes W.T)
    bias         [N] | None
    lora_a       [S, R, K]      stacked LoRA A, rows >= an adapter's rank are zero
    lora_b       [S, R, N]      stacked LoRA B transposed (lora_b[s] = B_s.T)
    slot_scales  [S] float32    LoRA scaling per slot (alpha / r, or alpha / sqrt(r))
    token_slots  [M or 1, J]    int32 slot per row and active adapter, -1 = none;
                                one row broadcasts to all rows
    dora_scale   [S, N] | None  DoRA magnitude / ||W + s B A|| per slot
    input_scale  [K] | [M, K]   IA3 scale of the input (feed-forward layers)
    output_scale [N] | [M, N]   IA3 scale of the output

    xs = x * input_scale;  y = xs @ weight.T + bias
    for j: s = token_slots[:, j]; lora = (xs @ lora_a[s].T) @ lora_b[s] * slot_scales[s]
           y += lora                                  (no DoRA)
           y += (g - 1) * (xs @ weight.T) + g * lora  (DoRA, g = dora_scale[s])
    y = y * output_scale            -> [M, N] in x.dtype

Every backend rounds ``slot_scales`` (and ``dora_scale``) to the adapters' dtype before
multiplying; PEFT multiplies by a Python float. The two agree for fp32 adapters (PEFT's
default, ``autocast_adapter_dtype=True``) and differ by one rounding of the scale for
bf16/fp16 adapters. Slots must be < S (the CPU kernels raise; the CUDA kernels treat a slot
>= S as "no adapter"); the layers only ever pass valid slots.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, backends, reference

LIB = "fastpeft"


@torch.library.custom_op(f"{LIB}::adapter_linear", mutates_args=())
def adapter_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    slot_scales: Tensor | None,
    token_slots: Tensor | None,
    dora_scale: Tensor | None,
    input_scale: Tensor | None,
    output_scale: Tensor | None,
) -> Tensor:
    """Base linear fused with LoRA / DoRA / IA3 for one or many adapters (see module docstring).

    ``lora_b`` is B transposed, ``[S, R, N]``. The arguments are checked
    (:func:`fastpeft.ops._checks.adapter_linear`: ``ValueError``) before a backend is chosen.
    """
    _checks.adapter_linear(x, weight, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale,
                           output_scale)
    fn = backends.resolve("adapter_linear", x.device.type)
    return fn(x, weight, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale)


@adapter_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale):
    torch._check(x.dim() == 2, lambda: f"adapter_linear: x must be [M, K], got {tuple(x.shape)}")
    torch._check(weight.dim() == 2, lambda: "adapter_linear: weight must be [N, K]")
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op(f"{LIB}::adapter_embedding", mutates_args=())
def adapter_embedding(
    ids: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    slot_scales: Tensor | None,
    token_slots: Tensor | None,
) -> Tensor:
    """Embedding lookup plus LoRA: ``weight[ids] + sum_j lora_a[s].T[ids] @ lora_b[s] * scale[s]``.

    ids [M] int, weight [V, D], lora_a [S, R, V], lora_b [S, R, D] (B transposed: lora_b[s] =
    B_s.T), slot_scales [S], token_slots [M or 1, J] (-1 = none). Returns [M, D] in weight's
    dtype. Checked by :func:`fastpeft.ops._checks.adapter_embedding` before a backend is chosen.
    """
    _checks.adapter_embedding(ids, weight, lora_a, lora_b, slot_scales, token_slots)
    fn = backends.resolve("adapter_embedding", weight.device.type)
    return fn(ids, weight, lora_a, lora_b, slot_scales, token_slots)


@adapter_embedding.register_fake
def _(ids, weight, lora_a, lora_b, slot_scales, token_slots):
    return weight.new_empty(ids.shape[0], weight.shape[1])


def register_recompute_autograd(op, ref) -> None:
    """Backward for ``op`` (a custom op or a ``"fastpeft::name"`` string) by recomputing ``ref``
    (its PyTorch semantics) and differentiating it. Non-tensor arguments (ints, dtypes) are kept
    on ``ctx`` and passed back to ``ref``."""

    def setup_context(ctx, inputs, output):
        ctx.consts = [None if isinstance(t, Tensor) else t for t in inputs]
        ctx.save_for_backward(*[t if isinstance(t, Tensor) else None for t in inputs])

    def backward(ctx, grad):
        inputs = [c if c is not None else t for c, t in zip(ctx.consts, ctx.saved_tensors, strict=True)]
        need = ctx.needs_input_grad
        leaves = []
        for i, t in enumerate(inputs):
            if isinstance(t, Tensor) and need[i] and t.is_floating_point():
                t = t.detach().requires_grad_(True)
                inputs[i] = t
                leaves.append((i, t))
        grads = [None] * len(inputs)
        if not leaves:
            return tuple(grads)
        with torch.enable_grad():
            out = ref(*inputs)
            got = torch.autograd.grad(out, [t for _, t in leaves], grad, allow_unused=True)
        for (i, _), g in zip(leaves, got, strict=True):
            grads[i] = g
        return tuple(grads)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


register_recompute_autograd(adapter_linear, reference.adapter_linear)
register_recompute_autograd(adapter_embedding, reference.adapter_embedding)


# ---- quantized bases: bitsandbytes 4-bit (NF4/FP4) and 8-bit (LLM.int8) weights ---------------
# Same contract as adapter_linear with ``weight`` = the dequantized base weight (see
# fastpeft/quant/formats.py for the storage and docs/quantization.md for the kernels).

@torch.library.custom_op(f"{LIB}::adapter_linear_4bit", mutates_args=())
def adapter_linear_4bit(
    x: Tensor,
    qweight: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    nested_offset: Tensor | None,
    out_features: int,
    blocksize: int,
    nested_blocksize: int,
    compute_dtype: torch.dtype | None,
    bias: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    slot_scales: Tensor | None,
    token_slots: Tensor | None,
    dora_scale: Tensor | None,
    input_scale: Tensor | None,
    output_scale: Tensor | None,
) -> Tensor:
    """``adapter_linear(x, W, ...)`` with ``W = dequantize_4bit(...)`` (bitsandbytes NF4/FP4).

    qweight       [(N*K+1)//2, 1] uint8 (or any dtype viewed as bytes): two 4-bit codes per
                  byte, element n*K+k, high nibble first
    absmax        [ceil(N*K/blocksize)] float32, or uint8 when nested
    code          [16] float32 lookup table (NF4 or FP4)
    nested_absmax [ceil(n_blocks/nested_blocksize)] float32 | None; nested_code [256] float32;
    nested_offset [] float32:  absmax = nested_code[absmax_q] * nested_absmax[b // 256] + offset
    out_features  N;  compute_dtype: dtype of W and of the base product (None: x.dtype);
                  ``y = linear(xs.to(cd), W, bias).to(x.dtype)`` + adapters as adapter_linear
                  (lora_b is B transposed, [S, R, N]).
    Returns [M, N] in x.dtype. Checked by :func:`fastpeft.ops._checks.adapter_linear_4bit`.
    """
    _checks.adapter_linear_4bit(x, qweight, absmax, code, nested_absmax, nested_code, nested_offset, out_features,
                                blocksize, nested_blocksize, compute_dtype, bias, lora_a, lora_b, slot_scales,
                                token_slots, dora_scale, input_scale, output_scale)
    fn = backends.resolve("adapter_linear_4bit", x.device.type)
    return fn(x, qweight, absmax, code, nested_absmax, nested_code, nested_offset, out_features, blocksize,
              nested_blocksize, compute_dtype, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale,
              input_scale, output_scale)


@adapter_linear_4bit.register_fake
def _(x, qweight, absmax, code, nested_absmax, nested_code, nested_offset, out_features, blocksize,
      nested_blocksize, compute_dtype, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale,
      input_scale, output_scale):
    torch._check(x.dim() == 2, lambda: f"adapter_linear_4bit: x must be [M, K], got {tuple(x.shape)}")
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op(f"{LIB}::adapter_linear_8bit", mutates_args=())
def adapter_linear_8bit(
    x: Tensor,
    qweight: Tensor,
    row_scale: Tensor,
    bias: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    slot_scales: Tensor | None,
    token_slots: Tensor | None,
    dora_scale: Tensor | None,
    input_scale: Tensor | None,
    output_scale: Tensor | None,
) -> Tensor:
    """``adapter_linear(x, W, ...)`` with ``W = (qweight * row_scale[:, None] / 127).to(x.dtype)``.

    qweight [N, K] int8 (LLM.int8 ``CB``), row_scale [N] float32 (``SCB``). The base product
    runs in x's dtype (weight-only dequantization, as bitsandbytes' ``MatMul8bitFp``; its int8
    GPU path also quantizes x). Adapters as adapter_linear (lora_b is B transposed, [S, R, N]).
    Returns [M, N] in x.dtype. Checked by :func:`fastpeft.ops._checks.adapter_linear_8bit`.
    """
    _checks.adapter_linear_8bit(x, qweight, row_scale, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale,
                                input_scale, output_scale)
    fn = backends.resolve("adapter_linear_8bit", x.device.type)
    return fn(x, qweight, row_scale, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale)


@adapter_linear_8bit.register_fake
def _(x, qweight, row_scale, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale):
    torch._check(x.dim() == 2, lambda: f"adapter_linear_8bit: x must be [M, K], got {tuple(x.shape)}")
    torch._check(qweight.dim() == 2, lambda: "adapter_linear_8bit: qweight must be [N, K]")
    return x.new_empty(x.shape[0], qweight.shape[0])


register_recompute_autograd(adapter_linear_4bit, reference.adapter_linear_4bit)
register_recompute_autograd(adapter_linear_8bit, reference.adapter_linear_8bit)
