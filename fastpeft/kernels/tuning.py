"""Per-device tuning files for the Triton planners: data that overrides the planners' constants.

``bench/bench_linear.py --tune`` and ``bench/bench_quant.py --tune`` time the candidate paths,
split-K factors and tiles on the GPU at hand and write the winners to
``fastpeft/kernels/configs/<device>.json`` (``<device>`` is :func:`device_slug` of
``torch.cuda.get_device_name()``, e.g. ``nvidia-h200.json``). A planner asks :func:`rules` for
its constants: the module's own values (today's rules, each documented where it is defined),
with the file's values for the current device on top. The file is only data:

* no file for the device: the module's constants, silently;
* a file that is not valid JSON, or not an object: a warning, and the module's constants;
* a key the planner does not know, or a value of the wrong type or out of range: a warning
  naming the key, and the module's constant for that key (the other keys still apply);
* a value that is an old name (:data:`RENAMED_VALUES`: the path "given" is now "preshrunk"):
  a warning, and the value read under its new name.

The format (one section per planner; any other top-level key is metadata and ignored)::

    {"device": "NVIDIA H200",
     "lora_linear": {"FUSED_MAX_ROWS": 128, "DECODE_TILE": [16, 128, 64, 4, 4],
                     "_meta": {"written_by": "bench/bench_linear.py --tune", "date": "...", "commit": "..."}},
     "quant_linear": {"PREFILL_MIN_ROWS": 512}}

Keys that start with ``_`` are metadata.

``FASTPEFT_TUNING_DIR`` points to another folder of such files (tests, experiments).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).with_name("configs")

#: old name -> new name of the values a file may hold (paths of ``lora_plan.PATHS``): a file
#: written before a rename still loads, with a warning (``lora_plan.override`` reads them too)
RENAMED_VALUES = {"given": "preshrunk"}

# device name -> parsed file (or {} when there is none / it is malformed), so a file is read once
_files: dict[tuple[str, str], dict] = {}

#: bumped by :func:`clear_cache` (and so by :func:`write`): planners that cache plans or rules
#: compare it with the value they cached under and start afresh when it moved
generation = 0


def config_dir() -> Path:
    """Where the tuning files are read from (``FASTPEFT_TUNING_DIR`` or ``fastpeft/kernels/configs``)."""
    return Path(os.environ.get("FASTPEFT_TUNING_DIR") or CONFIG_DIR)


def device_slug(name: str) -> str:
    """File stem for a device name: ``"NVIDIA H200"`` -> ``"nvidia-h200"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


_names: dict = {}


def device_name(device: torch.device) -> str:
    """The name a tuning file is keyed by: the CUDA device's name, ``"cpu"`` for the interpreter."""
    name = _names.get(device)
    if name is None:
        name = _names[device] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return name


def config_path(name: str) -> Path:
    return config_dir() / f"{device_slug(name)}.json"


def clear_cache() -> None:
    """Forget the files read so far and what was merged from them (after writing a file, changing
    ``FASTPEFT_TUNING_DIR``, or changing a planner's module constants at run time); the planners
    drop their cached plans at their next call (:data:`generation`)."""
    global generation
    _files.clear()
    _merged.clear()
    _warned.clear()
    generation += 1


def _read(name: str) -> dict:
    path = config_path(name)
    key = (str(path), name)
    if key in _files:
        return _files[key]
    data: dict = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            warnings.warn(f"fastpeft: tuning file {path} is not readable JSON ({e}); using the built-in rules",
                          stacklevel=3)
        else:
            if isinstance(loaded, dict):
                data = loaded
            else:
                warnings.warn(f"fastpeft: tuning file {path} holds a {type(loaded).__name__}, not an object; "
                              "using the built-in rules", stacklevel=3)
    _files[key] = data
    return data


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pow2(v) -> bool:
    return _is_int(v) and v > 0 and v & (v - 1) == 0


def _valid(default, value) -> bool:
    """Same kind as the built-in value: a positive int, a positive number, a name, or a tile.

    A tile (the 5-tuples ``(BM, BN, BK, num_warps, num_stages)``) must compile: BM, BN and BK
    powers of two >= 16 (``tl.arange`` and ``tl.dot``), num_warps a power of two up to 16,
    num_stages >= 1."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, str):  # a name (e.g. a path): any non-empty string; the planner rejects unknown ones
        return isinstance(value, str) and bool(value)
    if isinstance(default, int):
        return _is_int(value) and value > 0
    if isinstance(default, float):
        return (_is_int(value) or isinstance(value, float)) and value > 0 and value == value
    if isinstance(default, tuple) and len(default) == 5:
        if not (isinstance(value, list) and len(value) == 5):
            return False
        bm, bn, bk, warps, stages = value
        return (all(_pow2(t) and t >= 16 for t in (bm, bn, bk)) and _pow2(warps) and warps <= 16
                and _is_int(stages) and stages >= 1)
    return False


# (planner, device name, tuning dir, defaults) -> merged rules: a quantized-layer call asks every time
_merged: dict = {}


def rules(planner: str, device: torch.device, defaults: dict) -> dict:
    """``defaults`` (a planner's constants by name) with the tuning file's ``planner`` section for
    ``device`` applied. Lists in the file become tuples, like the built-in tile constants."""
    key = (planner, device_name(device), str(config_dir()), tuple(defaults.items()))
    out = _merged.get(key)
    if out is None:
        out = _merged[key] = _apply(planner, device, defaults)
    return dict(out)


def _apply(planner: str, device: torch.device, defaults: dict) -> dict:
    section = _read(device_name(device)).get(planner)
    if section is None:
        return dict(defaults)
    out = dict(defaults)
    path = config_path(device_name(device))
    if not isinstance(section, dict):
        _warn_once(path, planner, f"section {planner!r} is not an object")
        return out
    for key, value in section.items():
        if key.startswith("_"):  # "_meta": who wrote the section, and when
            continue
        if isinstance(value, str) and value in RENAMED_VALUES:
            _warn_once(path, planner, f"{planner}.{key} = {value!r} is the old name of {RENAMED_VALUES[value]!r}; "
                                      f"read as {RENAMED_VALUES[value]!r}", fallback=False)
            value = RENAMED_VALUES[value]
        if key not in defaults:
            _warn_once(path, planner, f"{planner}.{key} is not a tunable of this planner "
                                      f"(known: {', '.join(sorted(defaults))})")
        elif not _valid(defaults[key], value):
            builtin = list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key]
            _warn_once(path, planner, f"{planner}.{key} = {value!r} is not a valid value (built-in: {builtin!r})")
        else:
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


_warned: set = set()


def _warn_once(path: Path, planner: str, what: str, fallback: bool = True) -> None:
    key = (str(path), what)
    if key not in _warned:
        _warned.add(key)
        tail = "; using the built-in value" if fallback else ""
        warnings.warn(f"fastpeft: tuning file {path}: {what}{tail}", stacklevel=4)


def write(name: str, planner: str, values: dict, meta: dict | None = None, directory: Path | None = None) -> Path:
    """Merge ``values`` into the ``planner`` section of the tuning file for device ``name`` (other
    planners' sections are kept); returns the path written."""
    path = (Path(directory) if directory is not None else config_dir()) / f"{device_slug(name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                data = {}
        except ValueError:
            data = {}
    data["device"] = name
    section = dict(data.get(planner) or {})
    section.update({k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})
    if meta:
        section["_meta"] = dict(meta)
    data[planner] = section
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)  # a reader sees the old file or the new one, never half of it
    clear_cache()
    return path
