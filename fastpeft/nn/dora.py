"""DoRA on a LoRA linear layer, as PEFT computes it: ``W' = g * (W + s B A)`` with
``g = m / ||W + s B A||`` per output row (``m``: the magnitude vector, the norm detached).

The fused operators take ``g`` per slot as ``dora_scale [S, N]`` (1 for non-DoRA slots): the
layer's bank caches it (``bank.dora``), rebuilt when the base weight, an adapter or a magnitude
changes (storage pointer or version). The unfused path and merging follow PEFT's formulas here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.reference import dora_weight_norm
from ..parallel import tensor_parallel as _tensor_parallel
from ._base_kinds import weight_nk


class DoraMagnitude(nn.Module):
    """Holds DoRA's magnitude vector [N] as ``.weight`` (PEFT's ``lora_magnitude_vector.<name>.weight``)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


def dora_norm(layer, name: str, dtype: torch.dtype) -> Tensor:
    """``||W + s B A||`` per output row [N], computed in ``dtype`` as PEFT does (a
    tensor-parallel base: this rank's rows, :func:`fastpeft.parallel.tensor_parallel.dora_norm`)."""
    if getattr(layer, "_tp", None) is not None:
        return _tensor_parallel.dora_norm(layer, name, dtype)
    W = weight_nk(layer.base_layer).to(dtype)
    A = layer._a_weight(name).to(dtype)
    Bt = layer._b_weight(name).t().to(dtype)
    return dora_weight_norm(W, A, Bt.detach(), layer._scale(name))


def dora_inputs(layer) -> list:
    """The tensors the DoRA scale of ``layer`` is computed from (a fast-path plan checks their
    versions): the base weight, the stacks and the magnitudes."""
    bank = layer.bank
    return [layer.base_layer.weight, bank.a, bank.bt] + [
        layer.lora_magnitude_vector[n].weight for n in layer._adapters if layer.use_dora.get(n)
    ]


def dora_scale(layer):
    """``[S, N]`` magnitude / ||W + s B A|| of every slot of ``layer``'s stacks (1 for non-DoRA
    slots), cached in its bank; None when the layer has no DoRA adapter. Under torch.compile
    nothing is checked (no pointers while tracing): the scale cached by an eager forward, or
    False when there is none (the caller then runs the unfused path)."""
    if not layer._has_dora():
        return None
    bank = layer.bank
    if torch.compiler.is_compiling():
        return False if bank.dora is None else bank.dora[1]
    W = _tensor_parallel.local(layer.base_layer.weight)  # a DTensor's own data_ptr is 0
    key_parts = [W.data_ptr(), W._version]
    for n in layer._adapters:
        if layer.use_dora.get(n):
            for p in (layer._a_weight(n), layer._b_weight(n), layer.lora_magnitude_vector[n].weight):
                key_parts += [p.data_ptr(), p._version]
    key = tuple(key_parts)
    if bank.dora is not None and bank.dora[0] == key:
        return bank.dora[1]
    dtype = bank.a.dtype
    rows = []
    with torch.no_grad():
        for n in layer._adapters:
            if layer.use_dora.get(n):
                rows.append(layer.lora_magnitude_vector[n].weight.to(dtype) / dora_norm(layer, n, dtype))
            else:
                rows.append(torch.ones(layer.out_features, dtype=dtype, device=bank.a.device))
        g = torch.stack(rows)
    bank.dora = (key, g)
    return g


def dora_delta(layer, name: str, xl: Tensor, result: Tensor) -> Tensor:
    """PEFT's DoRA delta of one adapter on ``xl`` (x in the adapter dtype): with ``g`` as above,
    ``(g - 1) * base + g * s * B A x``, where ``base`` is the base output without bias (or
    ``x W^T`` on the dropped-out x while training with dropout)."""
    scale = layer._scale(name)
    dropout = layer.lora_dropout[name]
    W = weight_nk(layer.base_layer).to(xl.dtype)
    lora_weight = (layer._b_weight(name) @ layer._a_weight(name)).to(xl.dtype)
    norm = torch.linalg.norm(W + scale * lora_weight.detach(), dim=1).to(W.dtype).detach()
    g = (layer.lora_magnitude_vector[name].weight / norm).view(1, -1)
    if isinstance(dropout, nn.Identity) or not layer.training:
        base = result
        bias = getattr(layer.base_layer, "bias", None)
        if bias is not None:
            base = base - bias
    else:
        xl = dropout(xl)
        base = F.linear(xl, W)
    lora = layer.lora_B[name](layer.lora_A[name](xl))
    return (g - 1) * base + g * lora * scale


def merged_weight(layer, name: str, Wf: Tensor, delta: Tensor) -> Tensor:
    """The base weight after merging DoRA adapter ``name`` (fp32): ``g * (W + delta)``; the norm
    is kept for :func:`unmerged_weight`."""
    norm = torch.linalg.norm(Wf + delta, dim=1)
    layer._dora_merge_norm[name] = norm
    g = layer.lora_magnitude_vector[name].weight.detach().float() / norm
    return g.view(-1, 1) * (Wf + delta)


def unmerged_weight(layer, name: str, Wf: Tensor, delta: Tensor) -> Tensor:
    """Undo :func:`merged_weight`: ``W / g - delta``."""
    g = layer.lora_magnitude_vector[name].weight.detach().float() / layer._dora_merge_norm.pop(name)
    return Wf / g.view(-1, 1) - delta
