"""Validation and serialisation helpers shared by the adapter configs (``fastpeft.config``)."""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
import numbers


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_finite(name: str, value) -> None:
    """A number that is not NaN or +-Inf (a NaN scale turns outputs into NaN on some backends and
    is ignored by others: CPU ``addmm_`` with a NaN alpha runs the adapter at scale 1)."""
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r} ({type(value).__name__}).")


def _check_positive_int(name: str, value) -> None:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_non_negative_int(name: str, value) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")


def _module_names(name: str, value) -> None | str | set[str]:
    """PEFT's normalisation of ``target_modules``-like fields: a list becomes a set, a str (a
    regex, or ``"all-linear"``) stays a str."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise TypeError(f"`{name}` must hold module names (str), got {bad[:3]!r}.")
        return set(value)
    raise TypeError(f"`{name}` must be None, a regex str or a list of module names, got {value!r}.")


def _plain(value):
    """A JSON-friendly deep copy: enums become their value, dataclasses become dicts."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, set):
        return {_plain(v) for v in value}
    return copy.deepcopy(value)


def _json_ready(value):
    """Sets become sorted lists (PEFT writes lists; sorting keeps files deterministic)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value
