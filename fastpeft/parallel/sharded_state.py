"""The adapter tensors of tensor-parallel layers: made, loaded and saved in PEFT's full shapes,
held as this rank's shards (:mod:`fastpeft.parallel.tensor_parallel` says which dim of each is
split: ``TPPlan.shard_dim``).

* :func:`adopt`: a new adapter, initialized once for all ranks and split;
* :func:`local_entries` / :func:`local_piece` and the ``load_state_dict`` pre-hook: full
  tensors (a PEFT file) replaced by this rank's pieces;
* the ``state_dict`` post-hook: the pieces gathered to the full tensors (a collective).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

# The axes of every adapter tensor, by container: "N" output features, "K" input features;
# the sharded axis is "N" column-parallel, "K" row-parallel. (IA3: by its shape.)
AXES = {
    ("lora_A", "weight"): ("r", "K"),
    ("lora_B", "weight"): ("N", "r"),
    ("lora_B", "bias"): ("N",),
    ("lora_magnitude_vector", "weight"): ("N",),
}


def _named_tensors(layer, name: str):
    """``(container, param name or None, module or None, tensor)`` of adapter ``name``."""
    for container in layer.adapter_param_dicts:
        d = getattr(layer, container)
        if name not in d:
            continue
        v = d[name]
        if isinstance(v, nn.Module):
            for pn, p in v._parameters.items():
                if p is not None:
                    yield container, pn, v, p
        else:
            yield container, None, None, v


def adopt(layer, name: str) -> None:
    """Make a new adapter's tensors this rank's shards, equal on every rank to what an unsharded
    layer would hold: a tensor made at the global shape is broadcast from the group's first rank
    (one initialization for all) and split; a replicated one made locally is broadcast."""
    plan = layer._tp
    src = torch.distributed.get_global_rank(plan.group, 0)
    for container, pn, mod, p in _named_tensors(layer, name):
        shape = tuple(p.shape)
        d = plan.shard_dim(layer, container, pn, shape)
        glob = plan.global_shape(layer, container, pn, shape)
        with torch.no_grad():
            if shape == glob:
                full = p.detach().contiguous()
                torch.distributed.broadcast(full, src=src, group=plan.group)
                p.data = full if d is None else plan.split(full, d).clone()
            elif d is None:
                raise ValueError(f"{container}.{name}: shape {shape}, expected {glob}")
        if isinstance(mod, nn.Linear):
            mod.in_features, mod.out_features = mod.weight.shape[1], mod.weight.shape[0]


def _parse(rest: str):
    """``lora_B.<adapter>.weight`` -> ("lora_B", "weight"); ``ia3_l.<adapter>`` -> ("ia3_l", None)."""
    parts = rest.split(".")
    if parts[0] == "ia3_l" and len(parts) == 2:
        return "ia3_l", None
    if len(parts) == 3 and (parts[0], parts[2]) in AXES:
        return parts[0], parts[2]
    return None


def gather_hook(layer, state_dict, prefix, local_metadata) -> None:
    """``state_dict`` post-hook: the sharded adapter tensors gathered to PEFT's full shapes (a
    collective: every rank calls ``state_dict()``). ``keep_vars=True`` entries (the live
    parameters, which callers copy into) stay local."""
    plan = layer._tp
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        parsed = _parse(key[len(prefix):])
        v = state_dict[key]
        if parsed is None or isinstance(v, nn.Parameter):
            continue
        d = plan.shard_dim(layer, *parsed, v.shape)
        if d is not None:
            state_dict[key] = plan.gather(v, d, plan.global_shape(layer, *parsed, v.shape)[d])


def split_hook(layer, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """``load_state_dict`` pre-hook: full adapter tensors replaced by this rank's pieces."""
    for key in list(state_dict):
        if key.startswith(prefix):
            state_dict[key] = local_piece(layer, key[len(prefix):], state_dict[key])


def local_piece(layer, rest: str, t: Tensor) -> Tensor:
    """This rank's piece of adapter tensor ``t`` (key ``rest`` inside ``layer``): split when
    ``t`` has the global shape, unchanged otherwise (already local, or a shape that the
    caller's check reports)."""
    plan = layer._tp
    parsed = _parse(rest)
    if plan is None or parsed is None or not isinstance(t, Tensor):
        return t
    own = _own_shape(layer, parsed, rest)
    if own is None or tuple(t.shape) == own:
        return t
    d = plan.shard_dim(layer, *parsed, own)
    if d is None or tuple(t.shape) != plan.global_shape(layer, *parsed, own):
        return t
    return plan.split(t, d)


def _own_shape(layer, parsed, rest: str):
    container, pn = parsed
    adapter = rest.split(".")[1]
    d = getattr(layer, container, None)
    if d is None or adapter not in d:
        return None
    v = d[adapter]
    p = v._parameters.get(pn) if isinstance(v, nn.Module) else v
    return None if p is None else tuple(p.shape)


def local_entries(model: nn.Module, mapped: dict) -> dict:
    """``mapped`` (model key -> tensor, as ``tuner.load_weights`` maps a PEFT file) with the
    full tensors of tensor-parallel layers replaced by this rank's pieces."""
    from . import tensor_parallel

    if not tensor_parallel.ANY:
        return mapped
    layers = {p: m for p, m in model.named_modules() if getattr(m, "_tp", None) is not None}
    if not layers:
        return mapped
    out = {}
    for key, t in mapped.items():
        path, layer = key, None
        while "." in path and layer is None:
            path = path.rsplit(".", 1)[0]
            layer = layers.get(path)
        out[key] = t if layer is None else local_piece(layer, key[len(path) + 1:], t)
    return out
