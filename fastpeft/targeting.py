"""Which modules of a model an adapter config targets, with PEFT 0.21's matching rules.

Module paths are the names of ``model.named_modules()`` of the model the adapter goes on (for a
``PeftModel``, the inner model: no ``base_model.model.`` prefix).

Rules (as in PEFT's ``check_target_module_exists``):
- ``exclude_modules`` wins first: a str is ``re.fullmatch``-ed on the path; a list matches the
  exact path or a ``.name`` suffix.
- A module inside ``modules_to_save`` (``re.match(rf"(^|.*\\.){m}($|\\..*)", path)``) is never a target.
- ``target_modules`` as a str is ``re.fullmatch``-ed on the full path; ``"all-linear"`` (any case)
  means every ``nn.Linear`` / Transformers ``Conv1D`` except the output embedding of a
  Transformers model (and, for ``task_type="SEQ_CLS"`` models without one, the ``score`` /
  ``classifier`` head). As a list/set: an exact path match is a target (``layers_to_transform``
  is *not* checked then); otherwise a ``.name`` suffix match, filtered by ``layers_to_transform``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable

import torch.nn as nn

from ._optional import transformers_conv1d, transformers_pretrained_model
from .config import AdaLoraConfig, IA3Config, PeftConfig, TaskType, peft_type_name

__all__ = [
    "NoMatchingModuleError",
    "default_target_modules",
    "default_feedforward_modules",
    "prepare_config",
    "with_task_defaults",
    "is_target",
    "find_target_modules",
    "get_rank_and_alpha",
    "adalora_ranks",
    "is_feedforward",
    "find_modules_to_save",
    "is_adapter_layer",
]

ALL_LINEAR = "all-linear"
# PEFT condenses list-like target_modules of at least this many entries to minimal suffixes.
_MIN_TARGETS_TO_CONDENSE = 20
# Heads added to modules_to_save by PEFT's PeftModelFor<Task> classes.
_TASK_MODULES_TO_SAVE = {
    TaskType.SEQ_CLS: ["classifier", "score"],
    TaskType.TOKEN_CLS: ["classifier", "score"],
    TaskType.QUESTION_ANS: ["qa_outputs"],
}
_SEQ_CLS_HEAD_NAMES = ("score", "classifier")


class NoMatchingModuleError(ValueError):
    """The adapter config matched no module of the model."""


# --------------------------------------------------------------------------- per-model defaults

# Values from PEFT 0.21 peft/utils/constants.py (TRANSFORMERS_MODELS_TO_*_MODULES_MAPPING), keyed by
# `model.config.model_type`. None where PEFT has no entry for that method.
_QV = ["q_proj", "v_proj"]
_DEFAULTS: dict[str, dict[str, list[str] | None]] = {
    #  model_type:  LORA, ADALORA, IA3 target, IA3 feedforward
    "llama": {"LORA": _QV, "ADALORA": _QV, "IA3": ["k_proj", "v_proj", "down_proj"], "IA3_FF": ["down_proj"]},
    "mistral": {"LORA": _QV, "ADALORA": None, "IA3": ["k_proj", "v_proj", "down_proj"], "IA3_FF": ["down_proj"]},
    "opt": {"LORA": _QV, "ADALORA": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
            "IA3": ["q_proj", "k_proj", "fc2"], "IA3_FF": ["fc2"]},
    "gpt2": {"LORA": ["c_attn"], "ADALORA": ["c_attn"], "IA3": ["c_attn", "mlp.c_proj"], "IA3_FF": ["mlp.c_proj"]},
    "roberta": {"LORA": ["query", "value"], "ADALORA": ["query", "key", "value", "dense"],
                "IA3": ["key", "value", "output.dense"], "IA3_FF": ["output.dense"]},
    "bert": {"LORA": ["query", "value"], "ADALORA": ["query", "value"],
             "IA3": ["key", "value", "output.dense"], "IA3_FF": ["output.dense"]},
    "t5": {"LORA": ["q", "v"], "ADALORA": ["q", "k", "v", "o", "wi", "wo"], "IA3": ["k", "v", "wo"], "IA3_FF": ["wo"]},
    "bart": {"LORA": _QV, "ADALORA": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
             "IA3": ["q_proj", "v_proj", "fc2"], "IA3_FF": ["fc2"]},
    "gpt_neox": {"LORA": ["query_key_value"], "ADALORA": ["query_key_value"],
                 "IA3": ["query_key_value", "dense_4h_to_h"], "IA3_FF": ["dense_4h_to_h"]},
    "falcon": {"LORA": ["query_key_value"], "ADALORA": None,
               "IA3": ["query_key_value", "dense_4h_to_h"], "IA3_FF": ["dense_4h_to_h"]},
    "qwen2": {"LORA": _QV, "ADALORA": _QV, "IA3": ["q_proj", "v_proj", "down_proj"], "IA3_FF": ["down_proj"]},
    "gemma": {"LORA": _QV, "ADALORA": _QV, "IA3": ["q_proj", "v_proj", "down_proj"], "IA3_FF": ["down_proj"]},
    "phi": {"LORA": ["q_proj", "v_proj", "fc1", "fc2"], "ADALORA": None,
            "IA3": ["q_proj", "v_proj", "fc2"], "IA3_FF": ["fc2"]},
}


def default_target_modules(peft_type, model_type: str) -> list[str] | None:
    """PEFT's default ``target_modules`` for ``peft_type`` ("LORA", "ADALORA", "IA3") on a
    Transformers ``model_type`` ("llama", "gpt2", ...); None when PEFT has no default."""
    key = str(getattr(peft_type, "value", peft_type))
    if key not in ("LORA", "ADALORA", "IA3"):
        raise ValueError(f"Unknown peft_type {peft_type!r}; expected one of ['LORA', 'ADALORA', 'IA3'].")
    entry = _DEFAULTS.get(model_type, {}).get(key)
    return list(entry) if entry is not None else None


def default_feedforward_modules(model_type: str) -> list[str] | None:
    """PEFT's default IA3 ``feedforward_modules`` for a Transformers ``model_type``, or None."""
    entry = _DEFAULTS.get(model_type, {}).get("IA3_FF")
    return list(entry) if entry is not None else None


def _model_type(model: nn.Module | None) -> str:
    """``model.config.model_type`` (PEFT uses "custom" for models without a config)."""
    config = getattr(model, "config", None)
    if isinstance(config, dict):
        return config.get("model_type") or "custom"
    return getattr(config, "model_type", None) or "custom"


# --------------------------------------------------------------------------- config preparation


def with_task_defaults(config: PeftConfig, before_injection: bool = False) -> PeftConfig:
    """A copy of ``config`` with the task heads that PEFT's ``PeftModelFor<Task>`` classes append
    to ``modules_to_save``: ``["classifier", "score"]`` for SEQ_CLS and TOKEN_CLS,
    ``["qa_outputs"]`` for QUESTION_ANS.

    PEFT appends them for SEQ_CLS *before* the adapter is injected (so these heads are never
    adapter targets) but for TOKEN_CLS and QUESTION_ANS only *after* injection (so e.g.
    ``"all-linear"`` puts LoRA on the token classifier, and PEFT then fails to wrap it).
    ``before_injection=True`` gives the config PEFT matches targets with; the default gives the
    config PEFT ends up with (and saves).
    """
    config = copy.deepcopy(config)
    extra = _TASK_MODULES_TO_SAVE.get(config.task_type)
    if before_injection and config.task_type != TaskType.SEQ_CLS:
        extra = None
    if extra and hasattr(config, "modules_to_save"):
        config.modules_to_save = (config.modules_to_save or []) + list(extra)
    return config


def prepare_config(config: PeftConfig, model: nn.Module) -> PeftConfig:
    """A copy of ``config`` resolved for ``model``, as PEFT resolves it before injecting:

    - ``target_modules=None``: the default for ``model.config.model_type`` (ValueError if none);
    - IA3 ``feedforward_modules=None``: the default for the model type (ValueError if none);
    - ``"all-linear"``: the set of linear module paths (see module docstring);
    - a list-like ``target_modules`` with >= 20 entries is condensed to the shortest suffixes
      that still match exactly the same modules (not for IA3), as PEFT does.

    Storing the returned config makes ``save_pretrained`` write what PEFT writes.
    """
    config = copy.deepcopy(config)
    model_type = _model_type(model)
    if config.target_modules is None:
        defaults = default_target_modules(config.peft_type, model_type)
        if defaults is not None:
            config.target_modules = set(defaults)
        elif not getattr(config, "target_parameters", None):
            raise ValueError(
                f"`target_modules` is not set and there is no default for model_type '{model_type}' with "
                f"{peft_type_name(config)}; pass target_modules=[...] (module names or suffixes)."
            )
    if peft_type_name(config) == "IA3" and config.feedforward_modules is None:
        defaults = default_feedforward_modules(model_type)
        if defaults is None:
            raise ValueError(
                f"IA3 `feedforward_modules` is not set and there is no default for model_type '{model_type}'; "
                "pass feedforward_modules=[...] (a subset of target_modules, or [] for none)."
            )
        config.feedforward_modules = set(defaults)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        config.target_modules = _linear_module_names(model, config)
    targets = config.target_modules
    if isinstance(targets, (set, list)) and len(targets) >= _MIN_TARGETS_TO_CONDENSE and peft_type_name(config) != "IA3":
        names = [name for name, _ in model.named_modules()]
        others = [n for n in names if n not in targets and not any(n.endswith("." + t) for t in targets)]
        condensed = _minimal_suffixes(targets, others)
        if len(condensed) < len(targets):
            config.target_modules = condensed
    return config


def _minimal_suffixes(targets: Iterable[str], others: Iterable[str]) -> set[str]:
    """Fewest dotted suffixes that match every name of ``targets`` and none of ``others``
    (PEFT's ``_find_minimal_target_modules``)."""

    def suffixes(name: str) -> list[str]:  # shortest first
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]

    forbidden = {s for name in others for s in suffixes(name)}
    chosen: set[str] = set()
    for name, options in sorted(((t, suffixes(t)) for t in set(targets)), key=lambda item: item[1]):
        if any(name.endswith("." + c) for c in chosen):
            continue
        for suffix in options:
            if suffix not in chosen and suffix not in forbidden:
                chosen.add(suffix)
                break
    return chosen or set(targets)


# --------------------------------------------------------------------------- module types


def _linear_types() -> tuple[type, ...]:
    conv1d = transformers_conv1d()  # None when transformers is not loaded: then no module is one
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def is_adapter_layer(module: nn.Module) -> bool:
    """True for a layer that wraps a base layer (PEFT's tuner layers and fastpeft's layers both
    keep the wrapped module as the child ``base_layer``)."""
    return isinstance(getattr(module, "base_layer", None), nn.Module)


def _inside_adapter_layer(path: str, adapter_prefixes: list[str]) -> bool:
    return any(path.startswith(prefix) for prefix in adapter_prefixes)


def _adapter_prefixes(model: nn.Module) -> list[str]:
    return [f"{name}." for name, module in model.named_modules() if name and is_adapter_layer(module)]


def _is_transformers_model(model: nn.Module) -> bool:
    pretrained = transformers_pretrained_model()
    return pretrained is not None and isinstance(model, pretrained)


def _linear_module_names(model: nn.Module, config: PeftConfig) -> set[str]:
    """PEFT's ``"all-linear"`` expansion: linear / Conv1D paths (an adapter layer wrapping one
    counts as linear; modules inside adapter layers are skipped), minus the output embedding of a
    Transformers model, or minus the ``score``/``classifier`` head for SEQ_CLS models without one."""
    linear = _linear_types()
    prefixes = _adapter_prefixes(model)
    names = set()
    for name, module in model.named_modules():
        if _inside_adapter_layer(name, prefixes):
            continue
        if isinstance(module, linear) or (is_adapter_layer(module) and isinstance(module.base_layer, linear)):
            names.add(name)
    if _is_transformers_model(model):
        head = model.get_output_embeddings()
        if head is None and config.task_type == TaskType.SEQ_CLS:
            head = next((getattr(model, n) for n in _SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None)
        if head is not None:
            names.discard(next(n for n, m in model.named_modules() if m is head))
    return names


# --------------------------------------------------------------------------- matching


def _matches_name_list(path: str, names: Iterable[str]) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


def _is_excluded(path: str, config: PeftConfig) -> bool:
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, path):
                return True
        elif _matches_name_list(path, exclude):
            return True
    modules_to_save = getattr(config, "modules_to_save", None) or []
    return any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in modules_to_save)


def _layer_index(path: str, layers_pattern) -> int | None:
    """The transformer-block index in ``path`` (the first number after the layers container)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match:
                break
    return int(match.group("idx")) if match else None


def _in_layers(path: str, config: PeftConfig) -> bool:
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(path, getattr(config, "layers_pattern", None))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def is_target(module_path: str, module: nn.Module | None, config: PeftConfig, model: nn.Module | None = None) -> bool:
    """Whether the module at ``module_path`` gets the adapter described by ``config``.

    ``target_modules=None`` and ``"all-linear"`` need ``model`` (defaults come from its
    ``config.model_type``; the head exclusions from its output embedding); without ``model``,
    ``"all-linear"`` is decided from ``module``'s type alone.
    """
    if _is_excluded(module_path, config):
        return False
    targets = config.target_modules
    if targets is None:
        if getattr(config, "target_parameters", None):
            return False
        if model is None:
            raise ValueError("`target_modules` is None: pass `model` so the per-model-type default can be used.")
        targets = prepare_config(config, model).target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        if model is not None:
            return module_path in _linear_module_names(model, config)
        base = module.base_layer if module is not None and is_adapter_layer(module) else module
        return isinstance(base, _linear_types())
    if isinstance(targets, str):
        return re.fullmatch(targets, module_path) is not None
    if module_path in targets:
        return True
    return _matches_name_list(module_path, targets) and _in_layers(module_path, config)


def find_target_modules(model: nn.Module, config: PeftConfig) -> list[str]:
    """Paths of the modules of ``model`` that ``config`` targets, in ``model.named_modules()``
    order. Modules inside existing adapter layers are skipped, as in PEFT.

    ``config`` is resolved with :func:`prepare_config` first (defaults, ``"all-linear"``). It is
    used as given otherwise: for a task model, pass ``with_task_defaults(config,
    before_injection=True)`` to get what ``peft.get_peft_model`` targets.

    Raises:
        NoMatchingModuleError (a ValueError): nothing matched; the message names
            ``target_modules`` (and ``exclude_modules`` / layer settings) and some module names.
            Not for a config with ``target_parameters`` (it may target parameters only): [] then.
    """
    config = prepare_config(config, model)
    prefixes = _adapter_prefixes(model)
    found, excluded, names = [], [], []
    for path, module in model.named_modules():
        if not path or _inside_adapter_layer(path, prefixes):
            continue
        names.append(path)
        if _is_excluded(path, config):
            excluded.append(path)
        elif is_target(path, module, config):
            found.append(path)
    if not found and not getattr(config, "target_parameters", None):  # else: fastpeft.targeting_params decides
        raise NoMatchingModuleError(_no_match_message(config, names, excluded))
    if getattr(config, "exclude_modules", None) and not excluded:
        import warnings

        warnings.warn(f"exclude_modules={config.exclude_modules!r} were passed but no module was excluded.", stacklevel=2)
    return found


def _no_match_message(config: PeftConfig, names: list[str], excluded: list[str]) -> str:
    targets = config.target_modules
    shown = sorted(targets) if isinstance(targets, (set, list)) else targets
    msg = f"Target modules {shown!r} not found in the model."
    if excluded:
        msg = (f"No module matched target_modules={shown!r} after exclusions: {len(excluded)} were excluded by "
               f"exclude_modules={getattr(config, 'exclude_modules', None)!r} / "
               f"modules_to_save={getattr(config, 'modules_to_save', None)!r}.")
    for field in ("layers_to_transform", "layers_pattern"):
        if getattr(config, field, None) is not None:
            msg += f" Note: {field}={getattr(config, field)!r}."
    leaves = [n for n in names if "." in n][-8:] or names[:8]
    return msg + f" Some module names of the model: {leaves}."


# --------------------------------------------------------------------------- ranks


def _pattern_value(patterns: dict | None, module_path: str, default):
    """PEFT's ``get_pattern_key``: the first key ``k`` (dict order) with
    ``re.match(rf"(.*\\.)?({k})$", module_path)`` gives the value."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def get_rank_and_alpha(module_path: str, config: PeftConfig) -> tuple[int, float]:
    """``(r, lora_alpha)`` of the adapter on ``module_path``.

    LoRA: ``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``lora_alpha`` for the first
    matching regex key (see ``_pattern_value``). AdaLoRA: ``(init_r, lora_alpha)``, the rank the
    layer is created with (``alpha_pattern`` is not used by AdaLoRA); ranks kept after training
    are in :func:`adalora_ranks`.
    """
    kind = peft_type_name(config)
    if kind == "ADALORA":
        return config.init_r, config.lora_alpha
    if kind == "LORA":
        return (
            _pattern_value(config.rank_pattern, module_path, config.r),
            _pattern_value(config.alpha_pattern, module_path, config.lora_alpha),
        )
    raise TypeError(f"{type(config).__name__} has no rank; get_rank_and_alpha needs a LoraConfig or AdaLoraConfig.")


def adalora_ranks(config: AdaLoraConfig, adapter_name: str = "default") -> dict[str, int]:
    """Module path -> kept rank from an AdaLoRA ``rank_pattern`` (keys
    ``"<path>.lora_E"``, or ``"<path>.lora_E.<adapter_name>"`` before saving; values boolean
    masks of length ``init_r``). Modules not listed keep ``init_r``.

    PEFT builds such layers with ``init_r`` and then keeps only the masked ranks; their
    ``ranknum`` (the divisor of the scaling) stays ``init_r`` (0 when no rank is kept).
    """
    ranks = {}
    for key, mask in (config.rank_pattern or {}).items():
        path = key.removesuffix(f".{adapter_name}").removesuffix(".lora_E")
        ranks[path] = int(sum(bool(m) for m in mask))
    return ranks


# --------------------------------------------------------------------------- IA3 and modules_to_save


def is_feedforward(module_path: str, config: IA3Config) -> bool:
    """IA3: whether ``module_path`` is a feed-forward module (scale on the input, not output).

    A str ``feedforward_modules`` is ``re.fullmatch``-ed; a list/set matches by plain
    ``module_path.endswith(name)`` (PEFT's rule: no ``.`` boundary). ``None`` means no module
    (resolve defaults first with :func:`prepare_config`).
    """
    ff = config.feedforward_modules
    if ff is None:
        return False
    if isinstance(ff, str):
        return re.fullmatch(ff, module_path) is not None
    return any(module_path.endswith(name) for name in ff)


def find_modules_to_save(model: nn.Module, config: PeftConfig) -> list[str]:
    """Paths of the modules that ``config.modules_to_save`` selects, in model order.

    PEFT's rule is a plain ``path.endswith(name)`` (no ``.`` boundary, so ``"classifier"`` also
    selects ``"my_classifier"``), over ``named_modules(remove_duplicate=False)`` so a shared
    module is found under each of its names. Paths nested in an already selected module, or
    inside adapter layers, are left out.
    """
    names = getattr(config, "modules_to_save", None) or []
    if not names:
        return []
    prefixes = _adapter_prefixes(model)
    found: list[str] = []
    for path, _ in model.named_modules(remove_duplicate=False):
        if not path or _inside_adapter_layer(path, prefixes) or path in found:
            continue
        if any(path.startswith(f + ".") for f in found):
            continue
        if any(path.endswith(name) for name in names):
            found.append(path)
    return found
