"""The LoRA variants' fields of ``LoraConfig`` (``fastpeft.nn.lora_variants``): their table entries
and value checks (PEFT's sub-config ``__post_init__`` checks; unknown keys, which PEFT's
sub-config loading drops silently, are refused)."""

from __future__ import annotations

import dataclasses
import numbers


def _as_dict(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _keys(name: str, value, allowed: tuple) -> str | None:
    if not isinstance(value, dict):
        return f"`{name}` must be a dict (or PEFT's sub-config) or None, got {value!r}."
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        return f"`{name}` has unknown key(s) {unknown}; PEFT 0.21's keys are {list(allowed)}."
    return None


def _str_list(value) -> bool:
    return value is None or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_alora(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return f"`alora_invocation_tokens` must be a list of token ids (ints) or None, got {value!r}."
    return None


_ARROW_KEYS = ("top_k", "router_temperature", "use_gks", "task_adapter_names", "gks_adapter_names", "rng_seed")


def check_arrow(value) -> str | None:
    value = _as_dict(value)
    if value is None:
        return None
    bad = _keys("arrow_config", value, _ARROW_KEYS)
    if bad:
        return bad
    top_k, temp = value.get("top_k", 3), value.get("router_temperature", 1.0)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0:
        return f"arrow_config: top_k cannot be negative (must be a positive int), got {top_k!r}."
    if not _number(temp) or temp <= 0:
        return f"arrow_config: router_temperature must be greater than 0, got {temp!r}."
    if not isinstance(value.get("use_gks", False), bool):
        return f"arrow_config: use_gks must be a bool, got {value.get('use_gks')!r}."
    seed = value.get("rng_seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        return f"arrow_config: rng_seed must be an int or None, got {seed!r}."
    for key in ("task_adapter_names", "gks_adapter_names"):
        if not _str_list(value.get(key)):
            return f"arrow_config: {key} must be a list of adapter names or None, got {value.get(key)!r}."
    return None


_BDLORA_KEYS = ("target_modules_bd_a", "target_modules_bd_b", "nblocks", "match_strict")


def check_bdlora(value) -> str | None:
    value = _as_dict(value)
    if value is None:
        return None
    bad = _keys("use_bdlora", value, _BDLORA_KEYS)
    if bad:
        return bad
    a, b = value.get("target_modules_bd_a"), value.get("target_modules_bd_b")
    if not _str_list(a) or not _str_list(b):
        return f"use_bdlora: target_modules_bd_a / target_modules_bd_b must be lists of str or None, got {a!r}, {b!r}."
    if set(a or []) & set(b or []):
        return f"Found overlapping modules in target_modules_bd lists:{a} (A) and {b} (B)."
    nb = value.get("nblocks", 1)
    if not isinstance(nb, int) or isinstance(nb, bool) or nb < 1:
        return f"use_bdlora: nblocks must be a positive int, got {nb!r}."
    if not isinstance(value.get("match_strict", True), bool):
        return f"use_bdlora: match_strict must be a bool, got {value.get('match_strict')!r}."
    return None


def check_kasa(value) -> str | None:
    value = _as_dict(value)
    if value is None:
        return None
    bad = _keys("kasa_config", value, ("beta", "gamma"))
    if bad:
        return bad
    for key, default in (("beta", 1e-4), ("gamma", 1e-3)):
        v = value.get(key, default)
        if not _number(v) or v < 0:
            return f"kasa_config: `{key}` must be non-negative, got {v}."
    return None


def variant_fields(field_cls, implemented: str) -> dict:
    """The four implemented variant fields of ``LORA_FIELDS``."""
    return {
        "alora_invocation_tokens": field_cls(
            implemented, "Activated LoRA: the adapter acts from the last occurrence of the invocation tokens on "
            "(offsets per row from input_ids; no merging), on nn.Linear, Conv1D and bitsandbytes bases "
            "(fastpeft/nn/lora_variants/alora.py)", check=check_alora),
        "use_bdlora": field_cls(
            implemented, "BD-LoRA: block-diagonal lora_A or lora_B by module-path patterns, saved with PEFT's "
            "shapes, on nn.Linear bases (fastpeft/nn/lora_variants/bdlora.py)", check=check_bdlora),
        "arrow_config": field_cls(
            implemented, "Arrow: a router adapter mixing the layer's LoRA experts per token (top-k over "
            "prototypes, GenKnowSub), no merging; create_arrow_model (fastpeft/nn/lora_variants/arrow.py)",
            check=check_arrow),
        "kasa_config": field_cls(
            implemented, "KaSA: the base weight's r smallest singular components are dropped (also when loading) "
            "and delta = s * B diag(lora_diag) A, on nn.Linear bases (fastpeft/nn/lora_variants/kasa.py)",
            check=check_kasa),
    }
