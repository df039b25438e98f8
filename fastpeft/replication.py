"""PEFT's ``layer_replication`` (``LoraConfig.layer_replication``; PEFT 0.21's ``replicate_layers``).

Before the adapter's layers are made, the model's stack of transformer blocks is rebuilt from
the ranges ``[[start, end), ...]`` of the original stack: ``[[0, 4], [2, 5]]`` on blocks
``[0, 1, 2, 3, 4]`` gives ``[0, 1, 2, 3, 2, 3, 4]``. Every new block is a copy whose parameters
*are* the original block's (shared, no memory), buffers copied; submodules with a ``layer_idx``
(Transformers' attention, for the KV cache) get their new position, and ``config.num_hidden_layers``
the new length. The adapter then targets the new stack, so each copy gets its own adapter
(``model.layers.<new index>...`` keys in the saved file); loading a saved adapter replicates the
fresh base model the same way first (the config carries ``layer_replication``).

Where the stack is, as PEFT looks for it: below any chain of ``.model`` attributes (then
``.bert`` if there is one), the ``nn.ModuleList`` ``layers`` (Llama-like), ``encoder.layer``
(BERT-like) or ``h`` (Falcon-like). Other layouts (GPT-2's ``transformer.h``, T5, RoBERTa's
``roberta.encoder.layer``) raise, as in PEFT.

Refused (PEFT would silently give wrong models): a ``layer_replication`` adapter on a model
that already has adapters (PEFT replicates the replicated stack again, and the copies share the
existing adapters' weights), and merging on a replicated model (``merge_adapter`` /
``merge_and_unload``: the copies share base weights, so one merge would change every copy;
PEFT's ``_check_merge_allowed`` means to refuse it but looks the option up in the wrong dict).
"""
from __future__ import annotations

import copy

from torch import nn

MARKER = "_fastpeft_layer_replication"  # on the adapted model: the layer maps applied to it


def _noop() -> None:
    return None


def find_stack(model: nn.Module):
    """``(holder, owner, attr)``: the module whose ``config`` counts the layers, and the stack
    ``getattr(owner, attr)`` (an ``nn.ModuleList``), found as PEFT's ``replicate_layers`` does."""
    holder = model
    while hasattr(holder, "model"):
        holder = holder.model
    if hasattr(holder, "bert"):
        holder = holder.bert
    if hasattr(holder, "layers"):
        owner, attr = holder, "layers"
    elif hasattr(holder, "encoder") and hasattr(holder.encoder, "layer"):
        owner, attr = holder.encoder, "layer"
    elif hasattr(holder, "h"):
        owner, attr = holder, "h"
    else:
        owner = attr = None
    if owner is None or not isinstance(getattr(owner, attr), nn.ModuleList):
        raise ValueError(
            f"layer_replication: could not locate the layers of {type(model).__name__}: PEFT (and fastpeft) replicate "
            "an nn.ModuleList at <model>(.model)*.layers, (.bert).encoder.layer or .h (Llama, Bert or Falcon "
            "compatible architectures); this model has none"
        )
    return holder, owner, attr


def _check_map(layer_map, n: int) -> list[tuple[int, int]]:
    try:
        pairs = [(int(a), int(b)) for a, b in layer_map]
        ok = all(a == x and b == y for (a, b), (x, y) in zip(pairs, layer_map, strict=True))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"layer_replication={layer_map!r}: expected a list of [start, end) pairs of ints")
    bad = [(a, b) for a, b in pairs if not 0 <= a <= b <= n]
    if bad:
        raise ValueError(f"layer_replication={layer_map!r}: the ranges {bad} are outside the model's {n} layers "
                         f"(each needs 0 <= start <= end <= {n})")
    if not any(b > a for a, b in pairs):
        raise ValueError(f"layer_replication={layer_map!r} gives a model with no layers")
    return pairs


def clone_shared(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are ``module``'s own (the same objects; buffers
    and everything else copied), like PEFT's ``clone_module(share_weights=True)`` without
    allocating the copies first."""
    memo = {id(p): p for p in module.parameters()}
    return copy.deepcopy(module, memo)


def apply(model: nn.Module, config, existing_configs: dict):
    """Replicate ``model``'s layers per ``config.layer_replication`` (nothing when it is not set)
    before the adapter is injected. Returns a callable that undoes it (a failed injection calls
    it). Raises ValueError before changing anything for a model that already has adapters, an
    unknown layout or a bad map."""
    layer_map = getattr(config, "layer_replication", None)
    if not layer_map:
        return _noop
    if existing_configs:
        raise ValueError(
            f"layer_replication={layer_map!r} on a model that already has adapters {sorted(existing_configs)}: PEFT "
            "would replicate the already adapted stack again (the copies sharing the existing adapters' weights). "
            "Add a layer_replication adapter to a fresh base model only"
        )
    holder, owner, attr = find_stack(model)
    old = getattr(owner, attr)
    pairs = _check_map(layer_map, len(old))
    new = []
    for start, end in pairs:
        for i in range(start, end):
            clone = clone_shared(old[i])
            for sub in clone.modules():
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = len(new)
            new.append(clone)
    cfg = getattr(holder, "config", None)
    old_count = getattr(cfg, "num_hidden_layers", None)
    old_marker = model.__dict__.get(MARKER)
    setattr(owner, attr, nn.ModuleList(new))
    if old_count is not None:
        cfg.num_hidden_layers = len(new)
    model.__dict__[MARKER] = [*(old_marker or []), [list(p) for p in pairs]]

    def undo() -> None:
        setattr(owner, attr, old)
        if old_count is not None:
            cfg.num_hidden_layers = old_count
        if old_marker is None:
            model.__dict__.pop(MARKER, None)
        else:
            model.__dict__[MARKER] = old_marker

    return undo


def refuse_merge(model: nn.Module) -> None:
    """Raise for merging adapters into a model whose layers were replicated (see the module)."""
    maps = model.__dict__.get(MARKER)
    if maps:
        raise ValueError(
            f"Cannot merge LoRA layers when base model layers are replicated (layer_replication={maps[-1]!r}): the "
            "replicated layers share their base weights, so merging one layer's adapter would change its copies "
            "too. Keep the adapters unmerged, or unload() them"
        )
