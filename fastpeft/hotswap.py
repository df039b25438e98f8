"""Hot-swapping LoRA adapters: new weights for an existing adapter, in place (PEFT's ``peft.utils.hotswap``).

``hotswap_adapter(model, path, "default")`` replaces the weights, rank and scaling of the loaded
adapter ``"default"`` by those of the saved adapter at ``path``; the name, the slot, the active
set and everything else stay. ``model``: a :class:`fastpeft.PeftModel`, a model given the mixin
(:func:`fastpeft.with_adapters`), or ``torch.compile`` of either (``_orig_mod``).

How the weights are written. A LoRA layer's bank (:mod:`fastpeft.nn.bank`) holds the stacks
``a [P, c, K]`` and ``bt [P, c, N]`` (B transposed) and ``scales [P]``; adapter ``n`` occupies
the consecutive pages ``starts[s]:starts[s+1]`` of its slot ``s``, i.e. ``cap`` rows, and its
parameters ``lora_A[n].weight [r, K]`` / ``lora_B[n].weight [N, r]`` are views of the first
``r`` rows. A new adapter of rank ``r' <= cap`` is written into those rows (the rest zeroed),
its pages' scales are filled with the new scaling, and the parameters become views of the first
``r'`` rows: the same storage, so **no repack and no reallocation**, and whatever read the
stacks before (a compiled graph, a captured CUDA graph, the eager fast path) reads the new
adapter. DoRA's cached per-slot scale ``[S, N]`` is recomputed into the same tensor. The
parameters keep their ``nn.Parameter`` objects (optimizers stay valid) and get the new rank's
shape, so ``state_dict()`` / ``save_pretrained`` give exactly the swapped-in adapter.

A rank above ``cap`` (or stacks that are not current) gives the parameters new storage and the
stacks are rebuilt by the next eager forward (as PEFT, which grows the tensors with
``torch.utils.swap_tensors``). A compiled graph survives that (the stacks' sizes are dynamic,
under ``torch.no_grad()``); a **captured CUDA graph does not**: capture again, or call
:func:`prepare_model_for_compiled_hotswap` with ``target_rank`` first, after which every swap of
rank ``<= target_rank`` is in place and a larger rank is refused (``ValueError``). A layer that
compiled code runs unfused (``lora_bias``, a 4/8-bit base, a needed gradient) reads the scaling
as a Python float: a new scaling recompiles its graph once.

Semantics as PEFT, and where they differ:

* the new adapter must target no module the model's adapter does not (``RuntimeError``,
  PEFT's message); layers it does not target get zero weights (DoRA: magnitude = ``||W||``), so
  they add nothing, as in PEFT;
* the scaling of every layer comes from the new config (``lora_alpha``, ``r``,
  ``rank_pattern``, ``alpha_pattern``, ``use_rslora``). PEFT also refuses a different
  ``use_rslora`` / ``alpha_pattern``; fastpeft swaps them (they only change the scaling).
  ``use_dora``, ``lora_dropout``, ``lora_bias`` and the other structural fields must match;
* ``model.peft_config[adapter_name]`` becomes the new config with the model's targeting fields
  (``target_modules``, ``exclude_modules``, layers, ``modules_to_save``, ``bias``...), so a save
  after the swap loads back to the same outputs (PEFT keeps the old config);
* an error leaves the model bit-identical: everything is checked before anything is written;
* LoRA only (linear, Conv1D, 4/8-bit bases, embeddings, DoRA, ``lora_bias``), as PEFT.
"""
from __future__ import annotations

import copy
import re
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint, targeting
from ._locks import model_lock
from .config import LoraConfig, PeftConfig, peft_type_name
from .nn import dora as _dora
from .nn.adalora import AdaLoraLinear
from .nn.bank import AdapterBank, Entry
from .nn.base import PACK_LOCK
from .nn.lora import LoraLinear, lora_scaling
from .nn.lora_embedding import LoraEmbedding

__all__ = ["check_hotswap_configs_compatible", "hotswap_adapter", "hotswap_adapter_from_state_dict",
           "prepare_model_for_compiled_hotswap"]

_HUB_KWARGS = ("subfolder", "revision", "token", "cache_dir", "local_files_only")
# fields that change what layers exist or what they hold: must be equal
_MUST_MATCH = ("use_dora", "lora_dropout", "lora_bias", "layer_replication", "trainable_token_indices",
               "target_parameters",
               # LoRA variants (fastpeft/nn/lora_variants): the layers keep the variant they were built with
               "alora_invocation_tokens", "arrow_config", "use_bdlora", "kasa_config")
# fields describing the model's layer set (and its base): kept from the model's config
_KEEP_FROM_MODEL = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                    "modules_to_save", "fan_in_fan_out", "bias", "task_type", "inference_mode")
_CONTAINERS = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")
_RANK_ATTR = "_fastpeft_hotswap_rank"  # set on a layer by prepare_model_for_compiled_hotswap(target_rank=)


# ----- the model ------------------------------------------------------------------------------
def _inner(model: nn.Module) -> nn.Module:
    """The module holding the adapter layers and ``peft_config``."""
    model = getattr(model, "_orig_mod", model)  # torch.compile(model)
    from .peft_model import PeftModel

    if isinstance(model, PeftModel):
        return model.base_model.model
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, getattr(peft, "PeftModel", ())):
        raise TypeError("this is a peft.PeftModel: hot-swap its adapters with peft.utils.hotswap.hotswap_adapter; "
                        "fastpeft.hotswap works on fastpeft.PeftModel and models given fastpeft.with_adapters")
    if not isinstance(getattr(model, "peft_config", None), dict) or not model.peft_config:
        raise ValueError("hotswap: the model has no adapter; load the first one normally, then hot-swap it")
    return model


def _lora_layers(inner: nn.Module, name: str | None = None) -> dict:
    """``{path: layer}`` of the LoRA layers (holding ``name``, when given)."""
    return {p: m for p, m in inner.named_modules()
            if isinstance(m, (LoraLinear, LoraEmbedding)) and not isinstance(m, AdaLoraLinear)
            and (name is None or name in m._adapters)}


def _watched(layer, name: str) -> tuple:
    """``(A [r, K], B [N, r])``: the parameters the stacks alias."""
    return layer._watched(name)


# ----- configs --------------------------------------------------------------------------------
def check_hotswap_configs_compatible(config0, config1) -> None:
    """Raise ``ValueError`` unless an adapter of ``config1`` can replace one of ``config0``:
    both LoRA, and equal ``use_dora``, ``lora_dropout``, ``lora_bias`` and structural fields
    (PEFT checks ``use_rslora`` and ``alpha_pattern`` too; fastpeft swaps the scaling they set)."""
    t0, t1 = peft_type_name(config0), peft_type_name(config1)
    if t0 != t1:
        raise ValueError(f"Incompatible PEFT types found: {t0} and {t1}")
    if t0 != "LORA":
        raise ValueError(f"Hotswapping only supports LORA but {t0} was passed.")
    d0, d1 = config0.to_dict(), config1.to_dict()
    for key in _MUST_MATCH:
        v0, v1 = d0.get(key), d1.get(key)
        if v0 != v1:
            raise ValueError(f"Configs are incompatible: for {key}, {v0} != {v1}")


def _stored_config(old: PeftConfig, new) -> PeftConfig:
    """The new config as the model keeps it: a fastpeft config with the model's targeting fields."""
    if not isinstance(new, LoraConfig):
        new = PeftConfig.from_dict(new.to_dict())
    stored = copy.deepcopy(new)
    for f in _KEEP_FROM_MODEL:
        if hasattr(old, f):
            setattr(stored, f, copy.deepcopy(getattr(old, f)))
    return stored


# ----- checking: what will be written ---------------------------------------------------------
@dataclass
class _LayerSwap:
    """One layer's new values for the adapter: ``a [r, K]``, ``b [N, r]``, ``bias [N]`` (lora_bias),
    ``magnitude [N]`` (DoRA), rank ``r``, ``alpha``, ``scale`` (the scaling), ``rslora``."""

    layer: nn.Module
    a: Tensor
    b: Tensor
    bias: Tensor | None
    magnitude: Tensor | None
    r: int
    alpha: float
    scale: float
    rslora: bool


def _plan_layer(path: str, layer, name: str, got: dict, cfg) -> _LayerSwap:
    embedding = isinstance(layer, LoraEmbedding)
    ka, kb = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    K, N = (layer.num_embeddings, layer.embedding_dim) if embedding else (layer.in_features, layer.out_features)
    r_cfg, alpha = targeting.get_rank_and_alpha(path, cfg)
    use_bias = not embedding and layer.lora_bias.get(name, False)
    use_dora = not embedding and layer.use_dora.get(name, False)
    A0, _ = _watched(layer, name)
    dtype = A0.dtype
    wanted = {ka, kb} | ({"lora_B.bias"} if use_bias else set()) | ({"lora_magnitude_vector.weight"} if use_dora else set())
    extra = sorted(set(got) - wanted)
    if extra:
        raise RuntimeError("Hot swapping the adapter did not succeed, unexpected keys found: "
                           + ", ".join(f"{path}.{k}" for k in extra) + ".")
    if not got:  # a layer the new adapter does not target: it adds nothing (PEFT zeroes it too)
        a = torch.zeros(r_cfg, K, dtype=dtype)
        b = torch.zeros(N, r_cfg, dtype=dtype)
        bias = torch.zeros(N, dtype=dtype) if use_bias else None
        magnitude = None
        if use_dora:  # g = m / ||W + 0|| = 1
            from .nn._base_kinds import weight_nk

            with torch.no_grad():
                magnitude = torch.linalg.norm(weight_nk(layer.base_layer).to(dtype), dim=1).cpu()
    else:
        missing = sorted(wanted - set(got))
        if missing:
            raise ValueError(f"hotswap: the new adapter has no {missing} for {path!r}")
        a, b = got[ka], got[kb]
        bias, magnitude = got.get("lora_B.bias"), got.get("lora_magnitude_vector.weight")
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (r, K) or tuple(b.shape) != (N, r) or r < 1:
            raise ValueError(f"hotswap: {path!r} needs A [r, {K}] and B [{N}, r], got A {tuple(a.shape)} and "
                             f"B {tuple(b.shape)}")
        if r != r_cfg:
            raise ValueError(f"hotswap: {path!r} has rank {r} in the weights but {r_cfg} in the config")
        for t, what in ((bias, "lora_B.bias"), (magnitude, "lora_magnitude_vector")):
            if t is not None and tuple(t.shape) != (N,):
                raise ValueError(f"hotswap: {path}.{what} has shape {tuple(t.shape)}, expected ({N},)")
        if not all(t.is_floating_point() for t in (a, b, *(x for x in (bias, magnitude) if x is not None))):
            raise ValueError(f"hotswap: the weights of {path!r} are not floating point")
    target = getattr(layer, _RANK_ATTR, None)
    if target is not None and r_cfg > target:
        raise ValueError(
            f"hotswap: the new adapter has rank {r_cfg} on {path!r}, above the target_rank {target} the model was "
            f"prepared with (prepare_model_for_compiled_hotswap); prepare it with target_rank >= {r_cfg}")
    return _LayerSwap(layer, a, b, bias, magnitude, r_cfg, alpha, lora_scaling(r_cfg, alpha, bool(cfg.use_rslora)),
                      bool(cfg.use_rslora))


def _same_values(p: Tensor, t: Tensor) -> bool:
    return tuple(p.shape) == tuple(t.shape) and torch.equal(p.detach(), t.to(device=p.device, dtype=p.dtype))


def _plan(inner: nn.Module, name: str, mapped: dict, config, unexpected: list):
    """Check everything; return ``(layer swaps, [(tensor, new value)] of modules_to_save, stored config)``."""
    configs = inner.peft_config
    if name not in configs:
        raise ValueError(f"hotswap: unknown adapter {name!r}; the model has {list(configs)}")
    old = configs[name]
    check_hotswap_configs_compatible(old, config)
    if unexpected:
        raise RuntimeError("Hot swapping the adapter did not succeed, unexpected keys found: "
                           + ", ".join(unexpected) + ".")
    layers = _lora_layers(inner, name)
    if any(name in m.merged_adapters for m in layers.values()):
        raise ValueError(f"Cannot hot-swap adapter '{name}' because it is currently merged into the base weights. "
                         "Please unmerge the adapter first by calling `unmerge_adapter()`.")
    own = inner.state_dict(keep_vars=True)
    key_re = re.compile(rf"^(?P<path>.+)\.(?P<c>{'|'.join(_CONTAINERS)})\.{re.escape(name)}(?:\.(?P<p>weight|bias))?$")
    groups: dict = {p: {} for p in layers}
    saves, others = [], []
    for key, t in mapped.items():
        m = key_re.match(key)
        if m and m["path"] in groups:
            groups[m["path"]][m["c"] + (f".{m['p']}" if m["p"] else "")] = t
        elif f".modules_to_save.{name}." in key and key in own:
            if tuple(own[key].shape) != tuple(t.shape):
                raise ValueError(f"hotswap: {key!r} has shape {tuple(t.shape)}, the model's {tuple(own[key].shape)}")
            saves.append((own[key], t))
        elif key not in own or not _same_values(own[key], t):  # base weights saved with the adapter must be ours
            others.append(key)
    if others:
        raise ValueError(f"hotswap replaces adapter weights only; the new adapter also holds {others[:3]} "
                         f"({len(others)} in all) that differ from the model's (base weights, e.g. bias='all' or "
                         f"a resized embedding); load it as a new adapter instead")
    if not any(groups.values()):
        raise ValueError(f"hotswap: the new adapter holds no LoRA weight for the layers of {name!r}")
    wanted_saves = {k for k in checkpoint.expected_adapter_keys(own.keys(), name) if ".modules_to_save." in k}
    lacking = sorted(wanted_saves - {k for k in mapped if ".modules_to_save." in k})
    if lacking:
        raise ValueError(f"hotswap: the model's adapter {name!r} has modules_to_save that the new one lacks: {lacking[:3]}")
    stored = _stored_config(old, config)
    swaps = [_plan_layer(p, layer, name, groups[p], stored) for p, layer in layers.items()]
    return swaps, saves, stored


# ----- writing --------------------------------------------------------------------------------
def _write_in_place(layer, name: str, s: _LayerSwap) -> bool:
    """New rows and scale written into the adapter's own pages of the stacks (see the module
    docstring); False when the stacks are not current views of the parameters, or too narrow."""
    bank = layer.bank
    A, B = _watched(layer, name)
    if type(bank) is not AdapterBank or not bank.ready or bank.aliased.get(name) != (A.data_ptr(), B.data_ptr()):
        return False
    slot = bank.names.index(name)
    p0, p1 = bank.starts[slot], bank.starts[slot + 1]
    if s.r > (p1 - p0) * bank.a.shape[1]:
        return False
    rows_a = bank.a[p0:p1].view(-1, bank.a.shape[2])  # [cap, K]: consecutive pages are consecutive rows
    rows_b = bank.bt[p0:p1].view(-1, bank.bt.shape[2])  # [cap, N]
    rows_a.zero_()
    rows_a[:s.r].copy_(s.a)
    rows_b.zero_()
    rows_b[:s.r].copy_(s.b.t())
    A.data, B.data = rows_a[:s.r], rows_b[:s.r].t()  # same first row: the same storage pointers
    bank.scales[p0:p1].fill_(s.scale)
    bank.scale_src[name] = s.scale
    return True


def _set_param(p: Tensor, value: Tensor) -> None:
    if p.shape == value.shape:
        p.data.copy_(value)
        return
    p.data = value.to(device=p.device, dtype=p.dtype).clone(memory_format=torch.contiguous_format)
    p.grad = None


def _pack_padded(layer, target: int) -> None:
    """Rebuild ``layer``'s stacks with every adapter padded to ``target`` rows (zeros: same
    outputs), unpaged; the parameters stay views of their first ``r`` rows."""
    with PACK_LOCK, torch.inference_mode(False), torch.no_grad():
        names = list(layer._adapters)
        ranks = [_watched(layer, n)[0].shape[0] for n in names]
        target = max([target, *ranks])  # an adapter added later with a larger rank is never cut
        entries = []
        for n in names:
            A, B = _watched(layer, n)
            pad = target - A.shape[0]
            entries.append(Entry(F.pad(A.detach(), (0, 0, 0, pad)), F.pad(B.detach(), (0, pad)), layer.scaling[n], (A, B)))
        layer.bank.pack(entries, {n: layer.scaling[n] for n in names}, paged=False)
        for n, r in zip(names, ranks, strict=True):
            if n in layer.bank.aliased:
                A, B = _watched(layer, n)
                A.data, B.data = A.data[:r], B.data[:, :r]


def _refresh_dora(layer) -> None:
    """DoRA's cached scale, recomputed now (a compiled forward cannot) into the same tensor."""
    if not isinstance(layer, LoraLinear) or not layer._has_dora() or not layer.bank.ready:
        return
    old = layer.bank.dora
    g = _dora.dora_scale(layer)
    if old is not None and old[1] is not g and old[1].shape == g.shape and old[1].dtype == g.dtype:
        old[1].copy_(g)
        layer.bank.dora = (layer.bank.dora[0], old[1])


def _apply(name: str, swaps: list, saves: list) -> None:
    for s in swaps:
        layer = s.layer
        layer.r[name], layer.lora_alpha[name], layer.scaling[name] = s.r, s.alpha, s.scale
        if hasattr(layer, "use_rslora"):
            layer.use_rslora[name] = s.rslora
        if not _write_in_place(layer, name, s):
            A, B = _watched(layer, name)
            _set_param(A, s.a)
            _set_param(B, s.b)
            layer.bank.mark_stale()  # rebuilt by the next eager forward (or just below)
        if isinstance(layer, LoraLinear):
            layer.lora_A[name].out_features = layer.lora_B[name].in_features = s.r
            if s.bias is not None:
                layer.lora_B[name].bias.copy_(s.bias)
            if s.magnitude is not None:
                layer.lora_magnitude_vector[name].weight.copy_(s.magnitude)
        target = getattr(layer, _RANK_ATTR, None)
        if target is not None and not layer.bank.ready:
            _pack_padded(layer, target)
        _refresh_dora(layer)
        layer.bank.drop_plans()
    for p, t in saves:
        p.copy_(t)


def _swap(inner: nn.Module, name: str, mapped: dict, config, unexpected: list) -> None:
    with model_lock(inner).writing():
        swaps, saves, stored = _plan(inner, name, mapped, config, unexpected)
        with torch.inference_mode(False), torch.no_grad():
            _apply(name, swaps, saves)
        inner.peft_config[name] = stored


# ----- the public functions -------------------------------------------------------------------
def hotswap_adapter_from_state_dict(model: nn.Module, state_dict: dict, adapter_name: str, config,
                                    parameter_prefix: str = "lora_") -> None:
    """Replace adapter ``adapter_name``'s weights by ``state_dict`` (PEFT's function).

    ``state_dict``: *model* keys with the adapter name inserted, as PEFT maps them
    (``[base_model.model.]<path>.lora_A.<adapter_name>.weight``; ``_orig_mod.`` allowed);
    ``config``: the new adapter's ``LoraConfig`` (fastpeft's or PEFT's), for ranks and scaling;
    ``parameter_prefix``: ``"lora_"`` (LoRA is the only method). Raises ``RuntimeError`` for
    keys of modules the adapter does not have, ``ValueError`` for other incompatibilities; the
    model is unchanged then. See the module docstring for what is written where.
    """
    if parameter_prefix != "lora_":
        raise ValueError(f"parameter_prefix={parameter_prefix!r}: hot-swapping supports LoRA ('lora_') only")
    inner = _inner(model)
    names = set(inner.state_dict(keep_vars=True))
    mapped, unexpected = {}, []
    for key, t in state_dict.items():
        k = key.removeprefix("_orig_mod.").removeprefix(checkpoint.PEFT_PREFIX)
        if k in names:
            mapped[k] = t
        else:
            unexpected.append(key)
    _swap(inner, adapter_name, mapped, config, unexpected)


def hotswap_adapter(model: nn.Module, model_name_or_path: str, adapter_name: str, torch_device=None,
                    **kwargs) -> None:
    """Replace adapter ``adapter_name`` of ``model`` by the saved adapter at ``model_name_or_path``
    (a folder or Hub repo id, PEFT's format), keeping its name (PEFT's ``hotswap_adapter``).

    ``torch_device``: where the new weights are loaded first (default: CPU); they end up on the
    device of the adapter they replace. ``kwargs``: ``subfolder``, ``revision``, ``token``,
    ``cache_dir``, ``local_files_only`` for the Hub; any other raises ``TypeError``. Works
    in-place on the stacks (see the module docstring): compiled graphs and captured CUDA graphs
    follow the new weights when the new rank fits the adapter's rows.
    """
    unknown = sorted(set(kwargs) - set(_HUB_KWARGS))
    if unknown:
        raise TypeError(f"hotswap_adapter() got unexpected keyword argument(s) {unknown}; accepted: {list(_HUB_KWARGS)}")
    inner = _inner(model)
    if adapter_name not in inner.peft_config:
        raise ValueError(f"hotswap: unknown adapter {adapter_name!r}; the model has {list(inner.peft_config)}")
    config = PeftConfig.from_pretrained(model_name_or_path, **kwargs)
    check_hotswap_configs_compatible(inner.peft_config[adapter_name], config)
    file_sd = checkpoint.load_adapter_weights(model_name_or_path, **kwargs)
    if torch_device is not None:
        device = torch.device(torch_device)
        file_sd = {k: v.to(device) for k, v in file_sd.items()}
    mapped, unexpected = checkpoint.adapter_keys_to_model_keys(file_sd, adapter_name, config,
                                                               inner.state_dict(keep_vars=True).keys())
    _swap(inner, adapter_name, mapped, config, unexpected)


def prepare_model_for_compiled_hotswap(model: nn.Module, *, target_rank: int | None = None, config=None,
                                       check_compiled: str = "error") -> None:
    """Prepare ``model`` (its first adapters loaded, not yet compiled) for hot-swaps that keep
    compiled graphs and captured CUDA graphs (PEFT's function).

    ``target_rank``: every LoRA adapter's rows in the stacks are padded with zeros to this rank
    (outputs unchanged; the parameters keep their own rank), so a later swap of rank
    ``<= target_rank`` is written in place; a larger one is refused. ``None``: nothing padded.
    The scalings are already tensors read by the operators (the stacks' ``scales``), so a new
    alpha never recompiles; the stacks are packed now, so a compiled forward finds them ready.
    ``config``: LoRA config(s) (one or a dict) whose ``r`` and ``rank_pattern`` values become
    ``target_rank``, as PEFT does, for adapters created later; the model's own configs are
    refused (their weights keep their ranks here, so the saved config must too).
    ``check_compiled``: "error" / "warn" / "ignore" when ``model`` is already compiled.
    """
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' instead.")
    inner = _inner(model)
    if any(hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None for m in (model, inner)):
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn("prepare_model_for_compiled_hotswap was called with a model that is already compiled. This "
                          "will likely result in re-compilation, hurting performance.", stacklevel=2)
    if target_rank is not None and (not isinstance(target_rank, int) or isinstance(target_rank, bool) or target_rank < 1):
        raise ValueError(f"target_rank must be a positive int, got {target_rank!r}")
    configs = [] if not config else list(config.values()) if isinstance(config, dict) else [config]
    for c in configs:
        if peft_type_name(c) != "LORA":
            raise ValueError(f"config: LoRA configs only, got {type(c).__name__}")
        if any(c is own for own in inner.peft_config.values()):
            raise ValueError("config: the model's own peft_config keeps its adapters' ranks in fastpeft (only the "
                             "stacks are padded); pass the configs of adapters you will create later, or none")
    with model_lock(inner).writing():
        layers = list(_lora_layers(inner).values())
        layers = [m for m in layers if m._adapters]
        if not layers:
            raise ValueError("No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` "
                             "after loading the first adapter and before loading the second adapter.")
        if target_rank is not None:
            for m in layers:
                if type(m.bank) is not AdapterBank:
                    raise ValueError(f"target_rank: {type(m).__name__} keeps its adapters in a "
                                     f"{type(m.bank).__name__} (e.g. on the CPU); padding needs the default bank")
                for n in m._adapters:
                    r = _watched(m, n)[0].shape[0]
                    if r > target_rank:
                        raise ValueError(f"Trying to pad the adapter to the target rank {target_rank}, but the original "
                                         f"rank is larger ({r}). This is not possible.")
        for m in layers:
            if target_rank is not None:
                setattr(m, _RANK_ATTR, target_rank)
                _pack_padded(m, target_rank)
            elif m.bank.stale and not m.merged:
                m._pack()
            _refresh_dora(m)
            m.bank.drop_plans()
    for c in configs if target_rank is not None else []:
        c.r = target_rank
        if c.rank_pattern:
            c.rank_pattern = {k: target_rank for k in c.rank_pattern}
