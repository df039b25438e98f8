"""PEFT's on-disk adapter format: reading and writing the weights file, and mapping its keys.

File keys (PEFT ``save_pretrained``) carry the ``base_model.model.`` prefix and no adapter name::

    base_model.model.<P>.lora_A.weight            model: <P>.lora_A.<adapter>.weight
    base_model.model.<P>.lora_B.weight / .bias    model: <P>.lora_B.<adapter>.weight / .bias
    base_model.model.<P>.lora_embedding_A         model: <P>.lora_embedding_A.<adapter>
    base_model.model.<P>.lora_magnitude_vector    model: <P>.lora_magnitude_vector.<adapter>.weight (DoRA)
    base_model.model.<P>.lora_A / lora_B / lora_E model: <P>.lora_A.<adapter> ... (AdaLoRA; ranknum not saved)
    base_model.model.<P>.ia3_l                    model: <P>.ia3_l.<adapter>
    base_model.model.<P>.lora_diag                model: <P>.lora_diag.<adapter> (KaSA)
    base_model.model.<W>.weight                   model: <W>.modules_to_save.<adapter>.weight
    base_model.model.<E>.token_adapter.trainable_tokens_delta
                                                  model: <E>.token_adapter.trainable_tokens_delta.<adapter>
                                                  (trainable_token_indices; a tied LM head shares the
                                                  tensor and is not saved)
    base_model.model.<P>.base_layer.bias          (bias="lora_only"; bias="all" saves every *.bias)

Model keys here are ``state_dict()`` names; a ``PeftModel``'s have the ``base_model.model.``
prefix, an adapted plain model's do not. Both are accepted.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Iterable
from typing import Literal

import torch

from .config import CONFIG_NAME, AdaLoraConfig, PeftConfig, peft_type_name
from .config._base import ordinary_permissions
from .hub import AdapterFormatError, AdapterNotFoundError, resolve_file

__all__ = [
    "CONFIG_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "PEFT_PREFIX",
    "ADAPTER_PARAMETER_NAMES",
    "load_adapter_weights",
    "save_adapter_weights",
    "get_adapter_state_dict",
    "adapter_keys_to_model_keys",
    "expected_adapter_keys",
    "remove_adapter_name",
    "add_peft_prefix",
]

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# Per-adapter containers of the adapter layers (PEFT's names); keys look like
# "<P>.<name>.<adapter>" (ParameterDict) or "<P>.<name>.<adapter>.<param>" (ModuleDict).
ADAPTER_PARAMETER_NAMES = (
    "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
    "lora_E", "ranknum", "ia3_l", "lora_diag",  # lora_diag: KaSA (fastpeft/nn/lora_variants/kasa.py)
    "trainable_tokens_delta",  # trainable_token_indices (fastpeft/nn/trainable_tokens.py)
)
_MODULES_TO_SAVE = "modules_to_save"
_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
_CONTAINERS = "|".join(ADAPTER_PARAMETER_NAMES)


# --------------------------------------------------------------------------- reading and writing


def load_adapter_weights(
    path_or_repo_id: str,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
) -> dict[str, torch.Tensor]:
    """Read the adapter weights of a local folder or Hub repo onto the CPU, in file-key format.

    ``adapter_model.safetensors`` is preferred; a legacy ``adapter_model.bin`` is read with
    ``torch.load(weights_only=True)``, so a pickle that would run code is refused.

    Raises:
        AdapterNotFoundError: neither weights file exists there.
        AdapterFormatError: the file is truncated, corrupt, or holds more than tensors.
    """
    where = dict(subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir,
                 local_files_only=local_files_only)
    path = resolve_file(path_or_repo_id, SAFETENSORS_WEIGHTS_NAME, required=False, **where)
    if path is not None:
        return _load_safetensors(path)
    path = resolve_file(path_or_repo_id, WEIGHTS_NAME, required=False, **where)
    if path is not None:
        return _load_pickle(path)
    location = f"'{path_or_repo_id}'" + (f" (subfolder '{subfolder}')" if subfolder else "")
    raise AdapterNotFoundError(
        f"No adapter weights at {location}: expected '{SAFETENSORS_WEIGHTS_NAME}' or '{WEIGHTS_NAME}' "
        "(for a Hub repo while offline: the file is not in the local cache)."
    )


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for bad files
        raise AdapterFormatError(
            f"Cannot read '{path}': not a valid safetensors file (truncated or corrupt?): {exc}"
        ) from exc


def _load_pickle(path: str) -> dict[str, torch.Tensor]:
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AdapterFormatError(
            f"Refusing to load '{path}': it holds objects other than tensors, which could run code when "
            "unpickled. Convert it to safetensors with a trusted tool."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"Cannot read '{path}': not a valid PyTorch weights file: {exc}") from exc
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise AdapterFormatError(f"'{path}' must hold a dict of str -> Tensor, got {type(state_dict).__name__}.")
    return state_dict


def save_adapter_weights(
    state_dict: dict[str, torch.Tensor], save_directory: str, metadata: dict[str, str] | None = None
) -> str:
    """Write ``<save_directory>/adapter_model.safetensors`` and return its path.

    Tensors are detached, made contiguous, and cloned where they share storage (tied or
    sliced parameters), so safetensors accepts them. The file is written to a temp file in the
    same folder and moved into place with ``os.replace``: an interrupted save leaves the old
    file (or none), never a partial one. ``metadata`` defaults to ``{"format": "pt"}`` as PEFT.
    """
    from safetensors.torch import save_file

    os.makedirs(save_directory, exist_ok=True)
    tensors = independent_tensors(state_dict)
    path = os.path.join(save_directory, SAFETENSORS_WEIGHTS_NAME)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=save_directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata or {"format": "pt"})
        ordinary_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def independent_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    users: dict[tuple, int] = {}
    for tensor in state_dict.values():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"Adapter state dict values must be tensors, got {type(tensor).__name__}.")
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        users[key] = users.get(key, 0) + 1
    out = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        shared = users[(tensor.device, tensor.untyped_storage().data_ptr())] > 1
        partial = tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
        if shared or partial or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        out[name] = tensor
    return out


# --------------------------------------------------------------------------- key helpers


def remove_adapter_name(key: str, adapter_name: str) -> str:
    """PEFT's model-key -> file-key rule: drop ``.<adapter_name>`` at the end of the key, or just
    before its last component (``q.lora_A.default.weight`` -> ``q.lora_A.weight``)."""
    suffix = f".{adapter_name}"
    if "." not in key:
        return key
    if key.endswith(suffix):
        return key[: -len(suffix)]
    head, _, last = key.rpartition(".")
    return f"{head.removesuffix(suffix)}.{last}"


def add_peft_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prefix every key with ``base_model.model.`` (as PEFT files have) unless it already has it."""
    return {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v for k, v in state_dict.items()}


def _adapter_key_match(key: str) -> re.Match | None:
    """Match ``<P>.<container>.<adapter>[.<param>]`` keys of adapter layers."""
    return re.match(rf"^(?P<path>.+)\.(?P<container>{_CONTAINERS})\.(?P<adapter>[^.]+)(?:\.[^.]+)?$", key)


def _is_layer_key(key: str, adapter_name: str) -> bool:
    match = _adapter_key_match(key)
    return match is not None and match["adapter"] == adapter_name


def _modules_to_save_key(key: str, adapter_name: str) -> tuple[str, str] | None:
    """``<W>.modules_to_save.<adapter>.<rest>`` -> ``(W, rest)``."""
    marker = f".{_MODULES_TO_SAVE}.{adapter_name}."
    if marker not in key:
        return None
    wrapper, _, rest = key.partition(marker)
    return wrapper, rest


def _adapter_names_in(keys: Iterable[str]) -> set[str]:
    names = set()
    for key in keys:
        match = _adapter_key_match(key)
        if match:
            names.add(match["adapter"])
        parts = key.split(".")
        names.update(parts[i + 1] for i, p in enumerate(parts[:-1]) if p == _MODULES_TO_SAVE)
    return names


# --------------------------------------------------------------------------- model -> file


def get_adapter_state_dict(
    model_state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: PeftConfig,
    save_embedding_layers: bool | Literal["auto"] = "auto",
    embedding_module_names: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The entries of ``model_state_dict`` that make up adapter ``adapter_name``, with file keys
    (what ``peft.get_peft_model_state_dict`` returns): the adapter name removed, keys otherwise
    unchanged (so a ``PeftModel`` state dict gives ``base_model.model.``-prefixed keys).

    Included, as in PEFT: the adapter layers' tensors (AdaLoRA without ``ranknum``, and sliced
    to the kept ranks of ``config.rank_pattern``; the DoRA magnitude as
    ``<P>.lora_magnitude_vector``); ``bias="all"``: every ``*.bias`` (other adapters' removed);
    ``bias="lora_only"``: ``<P>.base_layer.bias`` of each adapted layer; ``modules_to_save``
    copies as ``<W>.<param>``; and the base weights of the embedding layers when
    ``save_embedding_layers`` is True, or "auto" and ``target_modules`` names an embedding
    (``embed_tokens``/``lm_head``; PEFT's check of a resized vocabulary is not done).
    ``embedding_module_names``: state-dict paths of the input/output embeddings (default:
    paths ending in ``embed_tokens`` or ``lm_head``).
    """
    others = _adapter_names_in(model_state_dict) - {adapter_name}
    state = {k: v for k, v in model_state_dict.items()
             if not any(f".{o}." in k or k.endswith(f".{o}") for o in others)}

    out = {k: v for k, v in state.items() if _is_layer_key(k, adapter_name)}
    out = {k: v for k, v in out.items() if k not in _tied_token_aliases(out)}
    layer_paths = {_adapter_key_match(k)["path"] for k in out}
    bias = getattr(config, "bias", "none")
    if bias == "all":
        out.update({k: v for k, v in state.items() if k == "bias" or k.endswith(".bias")})
    elif bias.endswith("_only"):
        out.update({f"{p}.base_layer.bias": state[f"{p}.base_layer.bias"]
                    for p in layer_paths if f"{p}.base_layer.bias" in state})

    kind = peft_type_name(config)
    if kind == "ADALORA":
        out = {k: v for k, v in out.items() if not k.endswith(f".ranknum.{adapter_name}")}
        out = _slice_adalora(out, config, adapter_name)
    elif kind == "LORA" and getattr(config, "use_dora", False):
        dora = f"lora_magnitude_vector.{adapter_name}.weight"
        out = {k.removesuffix(".weight") if k.endswith(dora) else k: v for k, v in out.items()}

    for key, value in state.items():
        split = _modules_to_save_key(key, adapter_name)
        if split:
            out[f"{split[0]}.{split[1]}"] = value

    out.update(_embedding_entries(state, config, layer_paths, save_embedding_layers, embedding_module_names))
    return {remove_adapter_name(k, adapter_name): v for k, v in out.items()}


def _tied_token_aliases(state) -> set[str]:
    """Keys of ``trainable_tokens_delta`` entries holding the same tensor as an earlier entry: an
    output layer tied to the input embedding shares its rows, which PEFT saves once (under the
    input embedding, before the LM head in a model's state dict)."""
    seen, aliases = set(), set()
    for key, value in state.items():
        if ".trainable_tokens_delta." not in key or not isinstance(value, torch.Tensor) or value.device.type == "meta":
            continue
        ident = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ident in seen:
            aliases.add(key)
        seen.add(ident)
    return aliases


def _slice_adalora(out: dict, config: AdaLoraConfig, adapter_name: str) -> dict:
    """Keep only the ranks marked True in ``rank_pattern`` (PEFT's resize_state_dict_by_rank_pattern)."""
    out = dict(out)
    for name, mask in (config.rank_pattern or {}).items():
        path = name.removesuffix(f".{adapter_name}").removesuffix(".lora_E")
        keep = torch.tensor([bool(m) for m in mask])
        for prefix in ("", PEFT_PREFIX):
            for container, dim in (("lora_E", 0), ("lora_A", 0), ("lora_B", 1)):
                key = f"{prefix}{path}.{container}.{adapter_name}"
                if key in out and out[key].shape[dim] != int(keep.sum()):
                    out[key] = out[key][keep] if dim == 0 else out[key][:, keep]
    return out


def _embedding_targeted(config: PeftConfig, module_paths: set[str]) -> bool:
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return False
        inner = {p.removeprefix(PEFT_PREFIX) for p in module_paths}
        return any(
            re.fullmatch(targets, p) for p in inner
            if any(re.match(rf"(.*\.)?{e}$", p) for e in _EMBEDDING_LAYER_NAMES)
        )
    return bool(targets) and any(e in targets for e in _EMBEDDING_LAYER_NAMES)


def _embedding_entries(state, config, layer_paths, save_embedding_layers, embedding_module_names) -> dict:
    module_paths = {k.rsplit(".", i)[0] for k in state for i in range(1, k.count(".") + 1)}
    targeted = _embedding_targeted(config, module_paths)
    if save_embedding_layers == "auto":
        save_embedding_layers = targeted and getattr(config, "trainable_token_indices", None) is None
    if not save_embedding_layers:
        return {}
    if embedding_module_names is None:
        embedding_module_names = sorted(
            p for p in module_paths if p.rpartition(".")[2] in _EMBEDDING_LAYER_NAMES
        )
    entries = {}
    for path in embedding_module_names:
        if path in layer_paths:  # an adapted embedding: save its base weights
            prefix = f"{path}.base_layer."
        elif not targeted:  # e.g. a resized vocabulary: save the whole layer
            prefix = f"{path}."
        else:
            continue
        entries.update({k: v for k, v in state.items() if k.startswith(prefix)})
    return entries


# --------------------------------------------------------------------------- file -> model


def adapter_keys_to_model_keys(
    file_state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: PeftConfig,
    model_param_names: Iterable[str],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a weights file's entries to the model's state-dict names for adapter ``adapter_name``
    (what ``peft.set_peft_model_state_dict`` does before ``load_state_dict``).

    Args:
        file_state_dict: file keys, with or without the ``base_model.model.`` prefix.
        adapter_name: the name the adapter gets in the model.
        config: the adapter's config.
        model_param_names: the model's ``state_dict()`` keys once the adapter layers exist
            (with or without the ``base_model.model.`` prefix).

    Returns:
        ``(mapped, unexpected)``: ``mapped`` maps model keys relative to the inner model (no
        ``base_model.model.`` prefix) to tensors; ``unexpected`` lists the file keys that match
        nothing in the model. AdaLoRA's ``ranknum`` is not in files, so it is never mapped.
    """
    names = {n.removeprefix(PEFT_PREFIX) for n in model_param_names}
    to_model: dict[str, str] = {}
    for name in names:
        split = _modules_to_save_key(name, adapter_name)
        if split:
            to_model[f"{split[0]}.{split[1]}"] = name
        elif _is_layer_key(name, adapter_name):
            to_model[remove_adapter_name(name, adapter_name)] = name
    dora_rename = peft_type_name(config) == "LORA"

    mapped, unexpected = {}, []
    for file_key, tensor in file_state_dict.items():
        key = file_key.removeprefix(PEFT_PREFIX)
        if key not in to_model and dora_rename and key.endswith("lora_magnitude_vector"):
            key += ".weight"
        target = to_model.get(key, key if key in names else None)
        if target is None:
            unexpected.append(file_key)
        else:
            mapped[target] = tensor
    return mapped, unexpected


def expected_adapter_keys(model_param_names: Iterable[str], adapter_name: str) -> list[str]:
    """The model keys (relative to the inner model) a file for ``adapter_name`` should fill: the
    adapter layers' tensors (without AdaLoRA's ``ranknum``, which is never saved) and the
    ``modules_to_save`` copies. Compare with the keys of ``adapter_keys_to_model_keys`` to find
    missing ones."""
    tensors = getattr(model_param_names, "mapping", None)  # a state dict's keys(): its values tell tied rows
    aliases = _tied_token_aliases(tensors) if tensors is not None else set()
    names = [n.removeprefix(PEFT_PREFIX) for n in model_param_names if n not in aliases]
    return [
        n for n in names
        if _modules_to_save_key(n, adapter_name)
        or (_is_layer_key(n, adapter_name) and _adapter_key_match(n)["container"] != "ranknum")
    ]
