"""Activated LoRA (aLoRA, ``alora_invocation_tokens``), as PEFT 0.21 computes it.

An aLoRA adapter changes a layer's output only on the last ``offset`` positions of each batch
row, where ``offset`` counts from the start of the *last* occurrence of the adapter's invocation
tokens in that row's ``input_ids`` to the end of the row (PEFT's ``calculate_alora_offsets``);
a row without the tokens (or a call without offsets) gets no adapter at all, so the prefix's
hidden states and KV cache are the base model's. For a layer input ``x [B, T, K]`` (``[B, K]``:
``T = 1``) the mask is ``position >= T - min(offset, T)``: in generation the offsets come from
the prompt, the prefill adapts the prompt's tail and every decoded token is adapted when the
prompt held the tokens. Merging is refused (PEFT: "aLoRA does not support merging").

The offsets of a call live in a ContextVar (thread- and task-local, like mixed batches,
:mod:`fastpeft.nn.selection`): ``{adapter name: (offset or None per batch row)}``, set by
:func:`offsets_context` (what PEFT's ``PeftModel.forward`` / ``generate`` compute) around the
model call. Generation with ``k`` rows per prompt row (beams, ``num_return_sequences``) repeats
each prompt row's offset ``k`` times.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from . import LoraVariant

_offsets: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fastpeft_alora_offsets", default=None)


def find_offsets(input_ids: Tensor, tokens: Sequence[int]) -> list:
    """Per row of ``input_ids [B, T]`` (or ``[T]``): ``T - start`` of the last occurrence of
    ``tokens``, or None when the row does not hold them (PEFT's ``calculate_alora_offsets``)."""
    ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
    B, T = ids.shape
    L = len(tokens)
    if L == 0 or L > T:
        return [None] * B
    tok = torch.as_tensor(list(tokens), dtype=ids.dtype, device=ids.device)
    hit = (ids.unfold(1, L, 1) == tok).all(-1)  # [B, T - L + 1]: the tokens start here
    starts = torch.arange(T - L + 1, device=ids.device)
    last = torch.where(hit, starts, torch.full_like(starts, -1)).max(dim=1).values
    return [None if s < 0 else T - s for s in last.tolist()]


def alora_adapters(model) -> dict:
    """``{name: invocation tokens}`` of the model's aLoRA adapters (``model.peft_config``)."""
    configs = getattr(model, "peft_config", None) or {}
    return {n: list(c.alora_invocation_tokens) for n, c in configs.items()
            if getattr(c, "alora_invocation_tokens", None)}


def _active_names(model) -> list:
    from ...tuner import active_adapters

    inner = getattr(getattr(model, "base_model", None), "model", None)
    if inner is not None and getattr(inner, "_fastpeft_active", None) is not None:
        model = inner
    return active_adapters(model)


@contextlib.contextmanager
def offsets_context(model, input_ids: Tensor | None = None, adapter_names=None, alora_offsets=None,
                    inputs_embeds: Tensor | None = None):
    """Run the block with the aLoRA offsets of one call of ``model`` (the inner model, or a
    ``PeftModel``) on ``input_ids [B, T]`` (``[T]``: one row). Offsets are computed, as PEFT's
    ``PeftModel.forward`` / ``generate`` do, for the aLoRA adapters among the active ones and
    ``adapter_names`` (a mixed batch: row ``i`` uses the offset of its own adapter). Given
    ``alora_offsets`` (one per row, PEFT's keyword) are used for every aLoRA adapter. Without
    ``input_ids`` the aLoRA adapters act nowhere (PEFT warns when only ``inputs_embeds`` came).
    A no-op (nothing set) when the model has no aLoRA adapter."""
    adapters = alora_adapters(model)
    if not adapters:
        yield
        return
    wanted = set(_active_names(model)) | set(adapter_names or ())
    names = [n for n in adapters if n in wanted]
    if alora_offsets is not None:
        value = {n: tuple(alora_offsets) for n in adapters}
    elif not names:
        value = None
    elif input_ids is None:
        if inputs_embeds is not None:
            warnings.warn("Cannot calculate aLoRA offsets when only inputs_embeds are provided. Disabling aLoRA for "
                          "this forward pass.", stacklevel=3)
        value = {}
    else:
        value = {n: tuple(find_offsets(input_ids, adapters[n])) for n in names}
    token = _offsets.set(value)
    try:
        yield
    finally:
        _offsets.reset(token)


def call_context(model, args: tuple, kwargs: dict, adapter_names=None):
    """:func:`offsets_context` for one ``PeftModel.forward`` / ``generate`` call: takes PEFT's
    ``alora_offsets`` keyword out of ``kwargs`` (also without aLoRA adapters, as PEFT drops it)
    and ``input_ids`` from ``kwargs`` or ``args[0]``."""
    given = kwargs.pop("alora_offsets", None)
    if not alora_adapters(model):
        return contextlib.nullcontext()
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], Tensor):
        ids = args[0]
    return offsets_context(model, ids, adapter_names, alora_offsets=given, inputs_embeds=kwargs.get("inputs_embeds"))


def current(name: str):
    """The offsets (per batch row) of adapter ``name`` in this call, or None."""
    value = _offsets.get()
    return None if value is None else value.get(name)


def _row_offsets(offsets, batch: int) -> list:
    n = len(offsets)
    if n == batch:
        return list(offsets)
    if n and batch % n == 0:  # generation: k consecutive rows per prompt row
        k = batch // n
        return [o for o in offsets for _ in range(k)]
    raise ValueError(f"aLoRA: offsets for {n} rows but the batch has {batch} rows")


class ALoraVariant(LoraVariant):
    """aLoRA on one layer: the plain factors, applied to the masked positions only."""

    option = "alora_invocation_tokens"
    fused = False
    kinds = ("linear", "conv1d", "quant")

    @classmethod
    def prepare(cls, layer, path, config, r):
        return cls()

    def check_merge(self, name):
        raise NotImplementedError("aLoRA does not support merging.")

    def delta(self, layer, name, x, result, where=None):
        """``lora_B(lora_A(dropout(x))) * s`` on the positions of the mask, 0 elsewhere
        (``x [B, T, K]`` or ``[B, K]``; the rows' offsets from :func:`current`)."""
        if result.dim() not in (2, 3):
            raise ValueError(f"aLoRA expects a layer input of 2 or 3 dimensions, got {tuple(x.shape)}")
        xl = x.to(layer.lora_A[name].weight.dtype)
        B, T = result.shape[0], (result.shape[1] if result.dim() == 3 else 1)
        offsets = current(name)
        if offsets is None:
            mask = torch.zeros(B, T, dtype=torch.bool, device=result.device)
        else:
            rows = _row_offsets(offsets, B if where is None else where[1])
            if where is not None:
                rows = [rows[i] for i in where[0]]
            o = torch.tensor([0 if v is None else min(int(v), T) for v in rows], dtype=torch.long,
                             device=result.device)
            mask = torch.arange(T, device=result.device).unsqueeze(0) >= (T - o).unsqueeze(1)
        mask = mask.reshape(-1)
        x_flat = xl.reshape(-1, xl.shape[-1])
        picked = layer._lora_out(name, x_flat[mask]) * layer._scale(name)
        out = torch.zeros(x_flat.shape[0], picked.shape[-1], dtype=picked.dtype, device=picked.device)
        out = out.index_put((mask,), picked)
        return out.reshape(*result.shape[:-1], picked.shape[-1])
