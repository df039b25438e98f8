"""Pure-PyTorch implementations of every fastpeft operator.

This is the CPU fallback and the oracle that every other backend is tested against. It
mirrors PEFT's order of operations (base layer with bias first, then each adapter's delta
added in turn, in the adapters' dtype, cast back at the end) so that results match PEFT.

Shapes used below: ``M`` rows (tokens), ``K`` input features, ``N`` output features, ``S``
adapter slots, ``R`` padded rank, ``J`` adapters applied per row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Above this many gathered elements (M * R * (K + N)) a mixed batch is computed per adapter
# segment instead of by gathering each row's A and B (which costs that much memory).
GATHER_LIMIT = 1 << 24


def lora_rows(xl: Tensor, lora_a: Tensor, lora_b: Tensor, slot_scales: Tensor, slots: Tensor) -> Tensor:
    """Per-row low-rank product ``((xl[m] @ lora_a[s].T) @ lora_b[s]) * slot_scales[s]``, ``s = slots[m]``.

    xl [M, K] (already in the adapters' dtype), lora_a [S, R, K], lora_b [S, R, N] (B transposed),
    slot_scales [S], slots [M] (int, -1 = none: that row's result is 0). Returns [M, N].
    """
    M = xl.shape[0]
    S, R, K = lora_a.shape
    N = lora_b.shape[-1]
    valid = slots >= 0
    idx = slots.clamp(min=0).long()
    if M * R * (K + N) <= GATHER_LIMIT:
        t = torch.bmm(lora_a[idx], xl.unsqueeze(-1)).squeeze(-1)  # [M, R]
        out = torch.bmm(t.unsqueeze(1), lora_b[idx]).squeeze(1)  # [M, N]
        out = out * slot_scales[idx].to(out.dtype).unsqueeze(-1)
    else:
        out = xl.new_zeros(M, N)
        for s in torch.unique(idx[valid]).tolist():
            rows = (idx == s) & valid
            sub = xl[rows]
            out[rows] = F.linear(F.linear(sub, lora_a[s]), lora_b[s].t()) * slot_scales[s].to(xl.dtype)
    return torch.where(valid.unsqueeze(-1), out, out.new_zeros(()))


def apply_adapters(
    y: Tensor,
    xs: Tensor,
    bias: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    slot_scales: Tensor | None,
    token_slots: Tensor | None,
    dora_scale: Tensor | None,
) -> Tensor:
    """Add the LoRA/DoRA deltas selected by ``token_slots`` to the base output ``y``.

    y [M, N]: ``xs @ W.T + bias``; xs [M, K]: the (IA3-scaled) input. For each column j of
    token_slots [M or 1, J] (-1 = none), with ``s`` the row's slot and
    ``lora = ((xs @ A[s].T) @ Bt[s]) * scale[s]`` computed in the adapters' dtype:
    without DoRA ``y += lora``; with DoRA (g = dora_scale[s], [N])
    ``y += (g - 1) * (xs @ W.T) + g * lora``. Returns y in the promoted dtype (caller casts).
    """
    if lora_a is None or token_slots is None or token_slots.numel() == 0:
        return y
    assert lora_b is not None and slot_scales is not None
    xl = xs.to(lora_a.dtype)
    base = None
    if dora_scale is not None:
        base = y - bias if bias is not None else y
    for j in range(token_slots.shape[1]):
        col = token_slots[:, j]
        if token_slots.shape[0] == 1:  # every row uses the same slot
            s = int(col[0])
            if s < 0:
                continue
            lora = F.linear(F.linear(xl, lora_a[s]), lora_b[s].t()) * slot_scales[s].to(xl.dtype)
            if dora_scale is None:
                y = y + lora
            else:
                g = dora_scale[s].to(xl.dtype)
                y = y + ((g - 1) * base + g * lora)
        else:
            lora = lora_rows(xl, lora_a, lora_b, slot_scales, col)
            if dora_scale is None:
                y = y + lora
            else:
                valid = (col >= 0).unsqueeze(-1)
                g = dora_scale[col.clamp(min=0).long()].to(xl.dtype)
                y = y + torch.where(valid, (g - 1) * base + g * lora, lora.new_zeros(()))
    return y


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
    """Reference for ``torch.ops.fastpeft.adapter_linear`` (see ``_schema.py`` for the contract)."""
    xs = x if input_scale is None else (x * input_scale).to(weight.dtype)
    y = F.linear(xs, weight, bias)
    y = apply_adapters(y, xs, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale)
    if output_scale is not None:
        y = y * output_scale
    return y.to(x.dtype)


def adapter_embedding(
    ids: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    slot_scales: Tensor | None,
    token_slots: Tensor | None,
) -> Tensor:
    """Reference for ``torch.ops.fastpeft.adapter_embedding``.

    ids [M] int, weight [V, D], lora_a [S, R, V], lora_b [S, R, D] (B transposed):
    ``weight[ids] + sum_j lora_a[s].T[ids] @ lora_b[s] * scale[s]`` with s = token_slots[:, j].
    """
    y = F.embedding(ids, weight)
    if lora_a is None or token_slots is None or token_slots.numel() == 0:
        return y
    out_dtype = y.dtype
    for j in range(token_slots.shape[1]):
        col = token_slots[:, j]
        if col.shape[0] == 1:
            col = col.expand(ids.shape[0])
        valid = (col >= 0).unsqueeze(-1)
        idx = col.clamp(min=0).long()
        after_a = lora_a[idx, :, ids]  # [M, R]
        lora = torch.bmm(after_a.unsqueeze(1), lora_b[idx]).squeeze(1) * slot_scales[idx].to(lora_a.dtype).unsqueeze(-1)
        y = y + torch.where(valid, lora, lora.new_zeros(()))
    return y.to(out_dtype)


def dora_weight_norm(weight: Tensor, lora_a: Tensor, lora_b_t: Tensor, scale: float) -> Tensor:
    """Row norm ``||W + scale * B @ A||_2`` per output feature, as PEFT's DoRA computes it.

    weight [N, K], lora_a [r, K], lora_b_t [r, N] (B transposed). Returns [N] in weight's dtype.
    """
    lora_weight = (lora_b_t.t() @ lora_a).to(weight.dtype)
    return torch.linalg.norm(weight + scale * lora_weight, dim=1).to(weight.dtype)


# ---- quantized bases (bitsandbytes formats; fastpeft/quant, docs/quantization.md) ----------


def dequantize_4bit_weight(
    qweight: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    nested_offset: Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
    nested_blocksize: int,
    dtype: torch.dtype,
) -> Tensor:
    """bitsandbytes 4-bit storage -> ``W [N, K]`` in ``dtype`` (computed in float32, rounded once).

    Element ``e = n * K + k`` is nibble ``e`` of ``qweight`` (high nibble first) scaled by
    ``absmax[e // blocksize]``; with double quantization (``nested_absmax`` given)
    ``absmax[b] = nested_code[absmax_q[b]] * nested_absmax[b // nested_blocksize] + nested_offset``.
    """
    n = out_features * in_features
    b = qweight.reshape(-1)
    if b.dtype != torch.uint8:
        b = b.view(torch.uint8)
    idx = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n].long()
    if nested_absmax is not None:
        am = nested_code.float()[absmax.reshape(-1).long()]
        nb = am.numel()
        pad = nested_absmax.numel() * nested_blocksize - nb
        am = (F.pad(am, (0, pad)).view(-1, nested_blocksize) * nested_absmax.float().unsqueeze(1)).reshape(-1)[:nb]
        am = am + nested_offset.float()
    else:
        am = absmax.reshape(-1).float()
    vals = code.float()[idx]
    pad = am.numel() * blocksize - n
    w = (F.pad(vals, (0, pad)).view(-1, blocksize) * am.unsqueeze(1)).reshape(-1)[:n]
    return w.view(out_features, in_features).to(dtype)


def dequantize_8bit_weight(qweight: Tensor, row_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """LLM.int8 ``CB [N, K]`` int8 and ``SCB [N]`` -> ``CB * (SCB / 127)`` in ``dtype`` (via float32)."""
    return (qweight.to(torch.float32) * row_scale.float().unsqueeze(1).mul(1.0 / 127.0)).to(dtype)


def _linear_compute_dtype(x, weight, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale):
    """``adapter_linear`` whose base product runs in ``weight.dtype`` (bitsandbytes' compute dtype).

    Same as :func:`adapter_linear` when ``x.dtype == weight.dtype``. Otherwise, as
    ``bnb.nn.Linear4bit`` then PEFT do: ``y = linear(xs.to(cd), W, bias.to(cd)).to(x.dtype)``,
    and the adapters are added from ``xs`` in ``x``'s dtype.
    """
    cd = weight.dtype
    b = None if bias is None else bias.to(cd)
    if x.dtype == cd:
        return adapter_linear(x, weight, b, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale)
    xs = x if input_scale is None else (x * input_scale).to(x.dtype)
    y = F.linear(xs.to(cd), weight, b).to(x.dtype)
    y = apply_adapters(y, xs, None if b is None else b.to(x.dtype), lora_a, lora_b, slot_scales, token_slots, dora_scale)
    if output_scale is not None:
        y = y * output_scale
    return y.to(x.dtype)


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
    """Reference for ``torch.ops.fastpeft.adapter_linear_4bit``: dequantize, then ``adapter_linear``."""
    cd = compute_dtype or x.dtype
    w = dequantize_4bit_weight(
        qweight, absmax, code, nested_absmax, nested_code, nested_offset,
        out_features, x.shape[-1], blocksize, nested_blocksize, cd,
    )
    return _linear_compute_dtype(x, w, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale)


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
    """Reference for ``torch.ops.fastpeft.adapter_linear_8bit``: dequantize to x's dtype, then ``adapter_linear``."""
    w = dequantize_8bit_weight(qweight, row_scale, x.dtype)
    return _linear_compute_dtype(x, w, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale)
