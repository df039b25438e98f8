"""``add_weighted_adapter``: a new adapter combined from existing ones, as PEFT 0.21's.

LoRA (PEFT's ``LoraModel.add_weighted_adapter`` and ``peft.utils.merge_utils``): per layer, with
``A_i [r_i, K]``, ``B_i [N, r_i]``, scaling ``s_i`` and weight ``w_i`` of the source adapters
present in that layer (embeddings: ``A [r, V]``, ``B [D, r]``; convolutions: ``A [r, C_in, *k]``,
``B [C_out, r, 1, ...]``, the svd types factor the kernel as ``[C_out, C_in * prod(k)]``):

* ``cat``: ``A = cat_i(w_i s_i A_i)``, ``B = cat_i(B_i)``; rank ``sum(r_i)`` (zero-padded where
  a layer holds fewer of the adapters);
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: ``A`` and ``B`` are
  each merged from the ``A_i`` / ``B_i`` with weights ``sign(w_i s_i) sqrt(|w_i s_i|)`` /
  ``sqrt(|w_i s_i|)``; all ranks must be equal (the new rank);
* ``svd`` and ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the
  deltas ``s_i B_i A_i`` are merged with weights ``w_i`` and factored by a truncated SVD to rank
  ``svd_rank`` (default: the largest source rank), ``B = U S``, ``A = Vh``, optionally clamped
  at the ``svd_clamp`` quantile.

Merging (the task tensors stacked on a new dim 0): ``linear`` a weighted sum; ``magnitude_prune``
keeps the ``density`` fraction of largest magnitudes per tensor first; ``dare_*`` keep each value
with probability ``density`` (``torch.bernoulli``, rescaled by ``1 / density``); ``*ties``
also elect a majority sign per element (``majority_sign_method``) and average the values that
agree with it. The new config is the first adapter's with ``r = lora_alpha = new rank``, the
union of the target modules and no rank/alpha patterns; the adapter is added (not activated)
and frozen, and its ``modules_to_save`` (from the first adapter's config) are fresh copies of the
original modules, as in PEFT. Given the same ``torch`` seed the random masks are PEFT's: the
random draws of PEFT's adapter initialization are replayed first, then the masks are drawn in
PEFT's order (per layer in module order; A of every adapter, then B; the ``*_svd`` types: one
per delta). All or nothing: a failure leaves the model (and the RNG state) as it was.

IA3 (PEFT's ``IA3Model.add_weighted_adapter(adapters, weights, adapter_name)``): ``l = sum_i
w_i l_i`` per layer. AdaLoRA raises ``TypeError`` as PEFT does.

Where PEFT fails late (after adding half an adapter) or builds something meaningless, this
raises first instead: ``density`` missing or negative for the pruning types, ``density=0`` for
DARE (PEFT: NaN), ``svd_driver`` off CUDA, ``svd_rank`` < 1 (PEFT: 0 means the default),
``weights`` not one number per adapter (PEFT: ``zip`` drops the rest), an invalid
``combination_type`` or ``majority_sign_method`` even with one adapter, ranks that differ inside
one layer, DoRA or ``lora_bias`` sources (PEFT: a fresh magnitude / bias, not combined),
grouped convolutions for cat / svd types. Where PEFT's shapes break (svd on Conv1d/Conv3d, an
svd rank above a layer's size, per-layer ranks below the new rank) the result is the same maths,
zero-padded to the new rank. A data-driven ``init_lora_weights`` of the first config (pissa,
olora, ...) is copied to the new config but not re-run (PEFT's would rewrite the base weights).
"""
from __future__ import annotations

import dataclasses
import math
import operator
import warnings
from functools import reduce

import torch
from torch import Tensor, nn

from . import tuner
from ._locks import changes
from .config import AdaLoraConfig, IA3Config, LoraConfig
from .nn import AdapterLayer, LoraConv, LoraEmbedding, LoraLinear, ModulesToSaveWrapper

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat",) + FACTOR_TYPES + SVD_TYPES
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")
LORA_LAYERS = (LoraLinear, LoraEmbedding, LoraConv)
_LORA_DEFAULTS = dict(combination_type="svd", svd_rank=None, svd_clamp=None, svd_full_matrices=True,
                      svd_driver=None, density=None, majority_sign_method="total")


# ----- PEFT's merge_utils ----------------------------------------------------------------------
def _prune_magnitude(t: Tensor, density: float) -> Tensor:
    """``t`` with all but its ``int(density * numel)`` largest magnitudes zeroed."""
    if density >= 1:
        return t
    keep = torch.zeros_like(t).reshape(-1)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices] = 1
    return t * keep.reshape(t.shape)


def _prune_random(t: Tensor, density: float) -> Tensor:
    """DARE: each value kept with probability ``density`` and rescaled by ``1 / density``."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def merge_tensors(tensors: list[Tensor], weights: Tensor, kind: str, density: float | None = None,
                  majority_sign_method: str = "total") -> Tensor:
    """Merge same-shape ``tensors`` with ``weights [n]`` by ``kind`` (``linear``, ``ties``,
    ``dare_linear``, ``dare_ties``, ``magnitude_prune``); returns one tensor of their shape."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [_prune_magnitude(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_prune_random(t, density) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if kind not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if majority_sign_method == "total" else sign.sum(dim=0)
    agree = sign == torch.where(votes >= 0, 1, -1)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


# ----- one layer ---------------------------------------------------------------------------------
def _factors(layer, name: str) -> tuple[Tensor, Tensor]:
    """The parameters ``(A [r, in], B [out, r])`` of adapter ``name`` in ``layer`` (convolutions:
    ``A [r, C_in, *k]``, ``B [C_out, r, 1, ...]``)."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _holds(layer, name: str) -> bool:
    return name in (layer.lora_embedding_A if isinstance(layer, LoraEmbedding) else layer.lora_A)


def _delta(layer, name: str) -> Tensor:
    """PEFT's ``get_delta_weight``: ``s B @ A`` in the base weight's layout ([N, K]; Conv1D and
    embeddings [K, N] as a transposed view; convolutions the kernel's shape), in the adapter
    dtype (fp32 matmul for half on CPU)."""
    A, B = (t.detach() for t in _factors(layer, name))
    dtype = B.dtype
    up = B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if up:
        A, B = A.float(), B.float()
    if isinstance(layer, LoraConv):  # groups 1: the kernel (B [C_out, r] @ A [r, C_in * prod(k)])
        d = (B.reshape(B.shape[0], A.shape[0]) @ A.reshape(A.shape[0], -1)).reshape(layer.base_layer.weight.shape)
    else:
        d = B @ A
    if isinstance(layer, LoraEmbedding) or layer.fan_in_fan_out:
        d = d.T
    d = d * layer.scaling[name]
    return d.to(dtype) if up else d


def _combine_layer(layer, path: str, kind: str, present: list, rank: int, opts: dict) -> tuple[Tensor, Tensor]:
    """``(A [rank, in], B [out, rank])`` of the new adapter in ``layer`` from ``present``
    (``[(source name, weight)]``), zero-padded to ``rank`` (convolutions: 2-D for the svd types,
    reshaped by the caller)."""
    groups = getattr(layer.base_layer, "groups", 1) if isinstance(layer, LoraConv) else 1
    if groups > 1 and kind not in FACTOR_TYPES:
        raise ValueError(f"add_weighted_adapter({kind!r}): module {path!r} is a convolution with groups={groups}; its "
                         "lora_B is grouped, so the adapters cannot be concatenated or factored; use a type of "
                         f"{list(FACTOR_TYPES)}")
    if kind == "cat":
        A = torch.cat([_factors(layer, a)[0].detach() * w * layer.scaling[a] for a, w in present], dim=0)
        B = torch.cat([_factors(layer, a)[1].detach() for a, _ in present], dim=1)
    elif kind in FACTOR_TYPES:
        As = [_factors(layer, a)[0].detach().contiguous() for a, _ in present]
        Bs = [_factors(layer, a)[1].detach().contiguous() for a, _ in present]
        if len({tuple(t.shape) for t in As}) > 1:
            ranks = {a: t.shape[0] for (a, _), t in zip(present, As, strict=True)}
            raise ValueError(f"add_weighted_adapter({kind!r}): the adapters have different ranks {ranks} in module "
                             f"{path!r} (rank_pattern); use 'cat' or an svd type")
        scaled = [w * layer.scaling[a] for a, w in present]
        wa = torch.tensor([math.sqrt(abs(v)) * (1 if v >= 0 else -1) for v in scaled]).to(As[0].device)
        wb = torch.tensor([math.sqrt(abs(v)) for v in scaled]).to(Bs[0].device)
        dtype = As[0].dtype
        A = merge_tensors(As, wa, kind, opts["density"], opts["majority_sign_method"]).to(dtype)
        B = merge_tensors(Bs, wb, kind, opts["density"], opts["majority_sign_method"]).to(dtype)
    else:
        deltas = [_delta(layer, a) for a, _ in present]
        w = torch.tensor([float(v) for _, v in present]).to(deltas[0].device)
        merged = merge_tensors(deltas, w, "linear" if kind == "svd" else kind[: -len("_svd")],
                               opts["density"], opts["majority_sign_method"])
        if isinstance(layer, LoraConv):
            merged = merged.flatten(start_dim=1)  # [C_out, C_in * prod(k)] (PEFT: Conv2d only)
        elif isinstance(layer, LoraEmbedding) or layer.fan_in_fan_out:
            merged = merged.T  # back to [out, in]
        U, S, Vh = torch.linalg.svd(merged, full_matrices=opts["svd_full_matrices"], driver=opts["svd_driver"])
        k = min(rank, S.shape[0])  # = rank unless the layer is thinner than the rank (PEFT fails there)
        B, A = U[:, :k] @ torch.diag(S[:k]), Vh[:k, :]
        if opts["svd_clamp"] is not None:
            hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), opts["svd_clamp"])
            B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    if A.shape[0] < rank:
        if groups > 1:
            raise ValueError(f"add_weighted_adapter: module {path!r} (groups={groups}) holds rank {A.shape[0]} < {rank}")
        A = torch.cat([A, A.new_zeros((rank - A.shape[0],) + A.shape[1:])], dim=0)
        B = torch.cat([B, B.new_zeros((B.shape[0], rank - B.shape[1]) + B.shape[2:])], dim=1)
    return A, B


def _replay_peft_init(layer, rank: int, init) -> None:
    """Draw the random numbers PEFT's ``update_layer`` draws for a new adapter of ``rank`` in a
    layer like ``layer`` (same constructors, shapes and order), so the DARE masks that follow
    are PEFT's. Inits needing the base weight (pissa, olora, ...) are not re-run."""
    if isinstance(layer, LoraEmbedding):
        torch.randn((rank, layer.num_embeddings))
        B = torch.randn((layer.embedding_dim, rank))
        if init and init not in ("mica", "loftq"):
            nn.init.normal_(B)
        return
    if isinstance(layer, LoraConv):
        base = layer.base_layer
        ones = (1,) * (base.weight.dim() - 2)
        A = type(base)(layer.in_features, rank, base.kernel_size, base.stride, base.padding, bias=False)
        type(base)(rank, layer.out_features, ones, ones, groups=base.groups, bias=False)
    else:
        A = nn.Linear(layer.in_features, rank, bias=False)
        nn.Linear(rank, layer.out_features, bias=False)  # (lora_bias adapters are refused)
    with torch.no_grad():
        if init is True or (init == "lora_ga" and isinstance(layer, LoraConv)):
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
        elif isinstance(init, str) and init.lower() == "gaussian":
            nn.init.normal_(A.weight, std=1 / rank)
        elif init == "orthogonal" and not isinstance(layer, LoraConv) and rank % 2 == 0:
            torch.randn(rank, rank)
            torch.randn(layer.in_features, rank // 2)
            torch.randn(rank // 2, layer.out_features)


# ----- checks ------------------------------------------------------------------------------------
def _check_sources(model, configs: dict, adapters, weights) -> tuple[list, list]:
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(f"add_weighted_adapter: adapters must be a non-empty list of adapter names, got {adapters!r}")
    for a in adapters:
        if a not in configs:
            raise ValueError(f"Adapter {a} does not exist (the model has {list(configs)})")
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter: weights must be a list of one number per adapter "
                         f"({len(adapters)}), got {weights!r}")
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ValueError(f"add_weighted_adapter: weights must be numbers, got {weights!r}") from None
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"add_weighted_adapter: weights must be finite, got {weights}")
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    shared = [w for w in wrappers if sum(a in w.modules_to_save for a in adapters) > 1]
    if shared:
        raise ValueError("Cannot add weighted adapters if they target the same module with modules_to_save, but "
                         f"found {len(shared)} such instance(s).")
    return list(adapters), weights


def _union(configs: dict, adapters: list, field: str):
    """PEFT's union of a module-list field over ``adapters``: a regex ``(a)|(b)`` for str, set union."""
    values = [getattr(configs[a], field) for a in adapters]
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        raise ValueError(f"all adapter configs should follow the same {field} type; combining adapters with "
                         f"`{field}` being a mix of list/set and string is not supported (got {values!r})")
    if str in kinds:
        return "|".join(f"({v})" for v in values)
    if kinds == {type(None)}:
        return None
    if not kinds <= {set, frozenset, list, tuple}:
        raise TypeError(f"Invalid type {type(values[0]).__name__} found in {field}")
    return reduce(operator.or_, (set(v) for v in values))


def _check_lora(configs: dict, adapters: list, combination_type, svd_rank, svd_clamp, svd_full_matrices,
                svd_driver, density, majority_sign_method, devices: set) -> tuple[str, int, object]:
    """PEFT's checks (and a few of its late failures, made early): ``(type, new rank, targets)``."""
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"Invalid combination_type: {combination_type!r}; expected one of {list(COMBINATION_TYPES)}")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    for a in adapters:
        cfg = configs[a]
        if getattr(cfg, "target_parameters", None):
            raise ValueError(f"add_weighted_adapter does not support targeting nn.Parameter (problematic adapter '{a}')")
        if cfg.use_dora:
            raise ValueError(f"add_weighted_adapter: adapter {a!r} uses DoRA; its magnitude vector cannot be combined "
                             "(PEFT would give the new adapter a freshly initialized one)")
        if cfg.lora_bias:
            raise ValueError(f"add_weighted_adapter: adapter {a!r} has lora_bias=True; the combination types combine "
                             "lora_A/lora_B weights only and the bias would be lost")
    kind = "linear" if len(adapters) == 1 else combination_type  # one adapter: PEFT merges linearly
    ranks = [c.r if not c.rank_pattern else max(c.r, *c.rank_pattern.values()) for c in (configs[a] for a in adapters)]
    if kind in FACTOR_TYPES:
        if len(set(ranks)) != 1:
            raise ValueError(f"All adapters must have the same r value when using combination_type {kind!r}, got "
                             f"{dict(zip(adapters, ranks, strict=True))}; use 'cat' or an svd type")
        rank = ranks[0]
    elif kind == "cat":
        rank = sum(ranks)
    else:
        if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 1):
            raise ValueError(f"svd_rank must be a positive int or None, got {svd_rank!r}")
        if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                      or not 0 <= svd_clamp <= 1):
            raise ValueError(f"svd_clamp must be a quantile in [0, 1] or None, got {svd_clamp!r}")
        if not isinstance(svd_full_matrices, bool):
            raise ValueError(f"svd_full_matrices must be a bool, got {svd_full_matrices!r}")
        if svd_driver is not None:
            if svd_driver not in SVD_DRIVERS:
                raise ValueError(f"svd_driver must be None or one of {list(SVD_DRIVERS)}, got {svd_driver!r}")
            if any(d.type != "cuda" for d in devices):
                raise ValueError(f"svd_driver={svd_driver!r} works on CUDA only (torch.linalg.svd); the adapters are "
                                 f"on {sorted(str(d) for d in devices)}")
        rank = svd_rank or max(ranks)
    base_kind = kind[: -len("_svd")] if kind.endswith("_svd") else kind
    if base_kind in _NEEDS_DENSITY:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not math.isfinite(density):
            raise ValueError(f"combination_type {kind!r} needs density (the fraction of values kept, in [0, 1]), "
                             f"got {density!r}")
        if density < 0:
            raise ValueError(f"Density should be >= 0, got {density}")
        if density == 0 and base_kind.startswith("dare"):
            raise ValueError(f"density=0 with {kind!r} drops every value and rescales by 1/0 (NaN weights)")
        if density >= 1:
            warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.",
                          stacklevel=3)
    return kind, rank, _union(configs, adapters, "target_modules")


# ----- entry point -------------------------------------------------------------------------------
def _rng_state(devices: set):
    cuda = sorted({d.index if d.index is not None else torch.cuda.current_device() for d in devices if d.type == "cuda"})
    return torch.get_rng_state(), {i: torch.cuda.get_rng_state(i) for i in cuda}


def _set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    for i, s in state[1].items():
        torch.cuda.set_rng_state(s, i)


@changes
def add_weighted_adapter(model: nn.Module, adapters, weights, adapter_name: str, combination_type: str = "svd",
                         svd_rank: int | None = None, svd_clamp: float | None = None, svd_full_matrices: bool = True,
                         svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> None:
    """Add adapter ``adapter_name`` to ``model`` (which holds fastpeft adapter layers), combined
    from ``adapters`` with ``weights`` (one number each, negative allowed) by ``combination_type``
    (module docstring); not made active. As in PEFT an existing ``adapter_name`` is left
    untouched (with a warning here). Raises ValueError for unknown adapters, a bad combination
    type or argument, ranks that the type cannot combine, mixed str/list target modules,
    adapters sharing a ``modules_to_save`` module, DoRA or ``lora_bias`` adapters; TypeError for
    AdaLoRA, and for LoRA-only arguments on IA3 adapters (PEFT's IA3 takes none)."""
    configs = tuner._configs(model)
    if any(isinstance(c, AdaLoraConfig) for c in configs.values()):
        raise TypeError("AdaLoraModel does not support add_weighted_adapter method (as in PEFT); use LoRA instead.")
    if adapter_name in configs:
        warnings.warn(f"add_weighted_adapter: adapter {adapter_name!r} already exists; nothing was done (as in PEFT)",
                      stacklevel=3)
        return
    adapters, weights = _check_sources(model, configs, adapters, weights)
    if isinstance(configs[adapters[0]], IA3Config):
        given = dict(combination_type=combination_type, svd_rank=svd_rank, svd_clamp=svd_clamp,
                     svd_full_matrices=svd_full_matrices, svd_driver=svd_driver, density=density,
                     majority_sign_method=majority_sign_method)
        extra = sorted(k for k, v in given.items() if v != _LORA_DEFAULTS[k])
        if extra:
            raise TypeError(f"add_weighted_adapter for IA3 adapters takes (adapters, weights, adapter_name) only, as "
                            f"PEFT's IA3Model; got {extra}")
        return _add_ia3(model, configs, adapters, weights, adapter_name)
    if not isinstance(configs[adapters[0]], LoraConfig):
        raise TypeError(f"add_weighted_adapter combines LoRA or IA3 adapters, not {type(configs[adapters[0]]).__name__}")
    for path, m in model.named_modules():
        if (isinstance(m, AdapterLayer) and not isinstance(m, LORA_LAYERS + (ModulesToSaveWrapper,))
                and any(a in m.adapter_names for a in adapters)):
            raise ValueError(f"add_weighted_adapter: module {path!r} is a {type(m).__name__}, which cannot be combined")
    sources = [m for m in tuner.adapter_layers(model)
               if isinstance(m, LORA_LAYERS) and any(_holds(m, a) for a in adapters)]
    devices = {_factors(m, a)[0].device for m in sources for a in adapters if _holds(m, a)}
    kind, rank, targets = _check_lora(configs, adapters, combination_type, svd_rank, svd_clamp, svd_full_matrices,
                                      svd_driver, density, majority_sign_method, devices)
    new_cfg = dataclasses.replace(configs[adapters[0]], r=rank, lora_alpha=rank, target_modules=targets,
                                  alpha_pattern={}, rank_pattern={})
    init = new_cfg.init_lora_weights
    # the weights are written below: build with a plain init (fastpeft refuses data-driven ones)
    build_cfg = new_cfg if init in (True, False) or str(init).lower() == "gaussian" else \
        dataclasses.replace(new_cfg, init_lora_weights=True)
    autocast = any(_factors(m, a)[0].dtype == torch.float32 and m.base_layer.weight.dtype in (torch.float16, torch.bfloat16)
                   for m in sources for a in adapters if _holds(m, a))
    opts = dict(density=density, majority_sign_method=majority_sign_method, svd_clamp=svd_clamp,
                svd_full_matrices=svd_full_matrices, svd_driver=svd_driver)
    rng = _rng_state(devices | {p.device for p in model.parameters()})

    def fill() -> None:
        _set_rng_state(rng)  # undo the draws of fastpeft's own init, then draw as PEFT does
        targets_now = [(p, m) for p, m in model.named_modules()
                       if isinstance(m, LORA_LAYERS) and _holds(m, adapter_name)]
        for _, m in targets_now:
            _replay_peft_init(m, rank, init)
        for path, m in targets_now:
            present = [(a, w) for a, w in zip(adapters, weights, strict=True) if _holds(m, a)]
            if not present:
                raise ValueError(f"add_weighted_adapter: module {path!r} gets the new adapter (targeted by the "
                                 f"combined config) but holds none of {adapters}")
            A, B = _combine_layer(m, path, kind, present, rank, opts)
            tA, tB = _factors(m, adapter_name)
            with torch.no_grad():
                tA.copy_(A.reshape(tA.shape))
                tB.copy_(B.reshape(tB.shape))
            m.bank.mark_stale()
        if build_cfg is not new_cfg:
            tuner._configs(model)[adapter_name].init_lora_weights = init

    try:
        tuner.inject(model, build_cfg, adapter_name, autocast_adapter_dtype=autocast, finish=fill)
    except BaseException:
        _set_rng_state(rng)
        raise


def _add_ia3(model: nn.Module, configs: dict, adapters: list, weights: list, adapter_name: str) -> None:
    """PEFT's IA3 combination: ``ia3_l = sum_i w_i ia3_l_i`` ([1, K] feed-forward, else [N, 1];
    convolutions ``[1, C, 1, ...]``) over the sources in each layer (none: zeros, as PEFT)."""
    new_cfg = dataclasses.replace(configs[adapters[0]], target_modules=_union(configs, adapters, "target_modules"),
                                  feedforward_modules=_union(configs, adapters, "feedforward_modules"))

    layers = [(p, m) for p, m in model.named_modules()
              if isinstance(m, AdapterLayer) and isinstance(getattr(m, "ia3_l", None), nn.ParameterDict)]
    autocast = any(v.dtype == torch.float32 and m.base_layer.weight.dtype in (torch.float16, torch.bfloat16)
                   for _, m in layers for a, v in m.ia3_l.items() if a in adapters)

    def fill() -> None:
        for path, m in model.named_modules():
            if not (isinstance(m, AdapterLayer) and adapter_name in getattr(m, "ia3_l", {})):
                continue
            target = m.ia3_l[adapter_name]
            acc = torch.zeros_like(target)
            for a, w in zip(adapters, weights, strict=True):
                if a in m.ia3_l:
                    if m.ia3_l[a].shape != target.shape:
                        raise ValueError(f"add_weighted_adapter: adapter {a!r} scales module {path!r} on the other "
                                         "side (feedforward_modules differ); the IA3 vectors cannot be added")
                    acc += m.ia3_l[a].detach() * w
            with torch.no_grad():
                target.copy_(acc)
            m.bank.mark_stale()

    tuner.inject(model, new_cfg, adapter_name, autocast_adapter_dtype=autocast, finish=fill)
