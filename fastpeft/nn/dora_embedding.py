"""DoRA on a LoRA embedding (:class:`fastpeft.nn.lora_embedding.LoraEmbedding`), as PEFT 0.21
computes it (``peft.tuners.lora.dora.DoraEmbeddingLayer`` and ``variants.DoraEmbeddingVariant``).

Shapes: base weight ``W`` [V, D]; ``lora_embedding_A`` ``A`` [r, V]; ``lora_embedding_B`` ``B``
[D, r]; scaling ``s``; magnitude ``m`` = ``lora_magnitude_vector.<name>.weight`` [D] (one entry per
embedding dimension). The norm is taken over the vocabulary, per embedding dimension::

    norm[d] = || W[:, d] + s * (B @ A)[d, :] ||_2          (detached: no gradient flows through it)
    g       = m / norm                                     [D]

A DoRA adapter turns the running output ``result`` (the base lookup plus the adapters applied
before it, PEFT's order) into ``g * result + g * (A^T[x] @ B^T) * s`` (times the base's
``embed_scale`` for the adapter term, as PEFT does for scaled embeddings); merged, ``W' = g * (W +
(B A)^T s)`` with the norm from the weight before any merge. The magnitude starts as the norm of
the fresh adapter (``g = 1``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .dora import DoraMagnitude


def lora_weight(layer, name: str) -> Tensor:
    """PEFT's DoRA "lora weight" ``(A^T @ B^T)^T`` = ``B @ A`` [D, V], in the adapter dtype."""
    return (layer.lora_embedding_A[name].T @ layer.lora_embedding_B[name].T).T


def weight_norm(weight_vd: Tensor, lora_dv: Tensor, scale: float) -> Tensor:
    """``||W^T + scale * lora||`` per embedding dimension [D] (PEFT's ``get_weight_norm`` with
    ``fan_in_fan_out=True``), in the dtype of the sum."""
    w = weight_vd.T + scale * lora_dv
    return torch.linalg.norm(w, dim=1).to(w.dtype)


def new_magnitude(layer, name: str) -> DoraMagnitude:
    """The magnitude of a fresh (or loaded-next) adapter: the norm of ``W + s B A`` [D], computed
    as PEFT's ``DoraEmbeddingLayer.update_layer`` does (fp16 adapters in fp32, then back)."""
    A, B = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    with torch.no_grad():
        half = A.dtype == torch.float16
        if half:
            A, B = A.float(), B.float()
        lw = B @ A
        if half:
            lw = lw.half()
        w = layer.base_layer.weight
        norm = weight_norm(w.to(A.device), lw, layer.scaling[name])
    return DoraMagnitude(norm)


def scale_of(layer, name: str) -> Tensor:
    """``g = m / ||W + s B A||`` [D] of DoRA adapter ``name`` (the norm detached), as PEFT's
    forward computes it; cached in ``layer._dora_cache`` while nothing it depends on changes and
    no gradient is needed."""
    m = layer.lora_magnitude_vector[name].weight
    A, B, W = layer.lora_embedding_A[name], layer.lora_embedding_B[name], layer.base_layer.weight
    grad = torch.is_grad_enabled() and m.requires_grad
    key = None
    if not grad:
        key = (tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (W, A, B, m)), layer.scaling[name])
        hit = layer._dora_cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
    norm = weight_norm(W, lora_weight(layer, name).detach(), layer.scaling[name]).detach()
    g = m / norm
    if key is not None:
        layer._dora_cache[name] = (key, g)
    return g


def apply(layer, name: str, ids: Tensor, result: Tensor, embed_scale: Tensor | None) -> Tensor:
    """PEFT's DoRA step of adapter ``name`` on the lookup of ``ids``: ``g * result + g * (A^T[ids]
    @ B^T) * s`` (the adapter term times ``embed_scale`` when the base has one)."""
    g = scale_of(layer, name)
    after_a = layer._embed(ids, layer.lora_embedding_A[name].T)
    dora_result = g * (after_a @ layer.lora_embedding_B[name].T) * layer.scaling[name]
    if embed_scale is not None:
        dora_result = dora_result * embed_scale.to(dora_result.dtype)
    return g * result + dora_result


def slot_scales(layer) -> Tensor:
    """``[S + 1, D]``: row ``slot`` is ``g`` of the DoRA adapter in that slot, ones for plain LoRA
    slots and for the last row (slot -1: no adapter). Multiplies the fused lookup ``base + s *
    lora`` row by row (``g * (base + s * lora)`` is DoRA's output for a row's one adapter)."""
    rows = []
    for n in layer._adapters:
        if layer.use_dora.get(n):
            rows.append(scale_of(layer, n))
        else:
            rows.append(torch.ones(layer.embedding_dim, dtype=layer.base_layer.weight.dtype,
                                   device=layer.base_layer.weight.device))
    ones = torch.ones(1, layer.embedding_dim, dtype=rows[0].dtype, device=rows[0].device)
    return torch.cat([torch.stack([r.to(ones.dtype) for r in rows]), ones])


def base_weight_before_merges(layer) -> Tensor:
    """The base weight [V, D] with every merged adapter taken out (a copy), as PEFT's
    ``_unmerged_base_weight`` gives DoRA's merge the norm of the weight the forward sees."""
    w = layer.base_layer.weight.detach().clone()
    for n in reversed(layer.merged_adapters):
        delta = layer._delta_weight(n).to(w.dtype)
        if layer.use_dora.get(n):
            g = layer.lora_magnitude_vector[n].weight.detach() / layer._dora_merge_norm[n]
            w = (w / g.view(1, -1) - delta).to(w.dtype)
        else:
            w = w - delta
    return w


def merged(layer, name: str, weight: Tensor, base0: Tensor) -> Tensor:
    """``g * (W + delta)`` [V, D] in ``weight``'s dtype, ``g`` from the unmerged weight ``base0``
    (PEFT's ``merge_unsafe``); the norm is kept for :func:`unmerged`."""
    delta = layer._delta_weight(name).detach()
    norm = weight_norm(base0, delta.T, 1).detach()
    layer._dora_merge_norm[name] = norm
    g = (layer.lora_magnitude_vector[name].weight.detach() / norm).view(1, -1)
    return (g * (weight + delta)).to(weight.dtype)


def unmerged(layer, name: str, weight: Tensor) -> Tensor:
    """Undo :func:`merged`: ``W / g - delta``."""
    delta = layer._delta_weight(name).detach()
    g = layer.lora_magnitude_vector[name].weight.detach() / layer._dora_merge_norm.pop(name)
    return (weight / g.view(1, -1) - delta).to(weight.dtype)
