"""Saving and sharing adapters as PEFT does: ``save_pretrained``'s folder layout and files, the
model card, and ``push_to_hub``.

One folder per adapter (``default`` at the top, every other adapter in a subfolder named after
it), each with ``adapter_config.json`` and ``adapter_model.safetensors`` (``adapter_model.bin``
with ``safe_serialization=False``), plus a ``README.md`` model card at the top, as
``peft.PeftModel.save_pretrained`` writes them. Files get ordinary permissions (0666 less the
umask). A folder's config and weights are written to temporary files first and then moved into
place back to back, with SIGINT/SIGTERM held off between the two moves: an interrupted save
leaves the old adapter or the new one. (A power loss in the microseconds between the two
renames can still leave a mix; no reader of PEFT's format can be protected from that without a
second file layout.)
"""
from __future__ import annotations

import contextlib
import copy
import os
import signal
import tempfile
import threading

import torch

from . import checkpoint
from .config import CONFIG_NAME, PeftConfig, peft_type_name

README_NAME = "README.md"
_UNSAFE_NAMES = {"", ".", ".."}


def check_adapter_name_is_path_safe(name: str) -> None:
    """Raise ValueError unless ``name`` can be one folder name inside a save directory (PEFT
    writes adapter ``x`` to ``<dir>/x``: a name such as ``/`` or ``../y`` would escape it)."""
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not isinstance(name, str) or name in _UNSAFE_NAMES or any(s in name for s in seps) or "\0" in name:
        raise ValueError(
            f"adapter name {name!r} cannot be saved: it is written to a subfolder of that name, so it must be "
            "a single path component (no '/', '\\', '.', '..' or empty name); rename it before saving"
        )


@contextlib.contextmanager
def _signals_held():
    """SIGINT / SIGTERM wait until the block ends (main thread on POSIX; elsewhere a no-op)."""
    can = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if not can:
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _write_weights(state_dict: dict, folder: str, safe: bool) -> tuple[str, str]:
    """Write the weights to a temp file in ``folder``; (temp path, final path)."""
    name = checkpoint.SAFETENSORS_WEIGHTS_NAME if safe else checkpoint.WEIGHTS_NAME
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + name, dir=folder)
    os.close(fd)
    try:
        tensors = checkpoint.independent_tensors(state_dict)
        if safe:
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)
    except BaseException:
        os.remove(tmp)
        raise
    return tmp, os.path.join(folder, name)


def _write_config(config: PeftConfig, folder: str, auto_mapping: dict | None) -> tuple[str, str]:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + CONFIG_NAME, dir=folder)
    os.close(fd)
    try:
        config.save_pretrained_to(tmp, auto_mapping_dict=auto_mapping)
    except BaseException:
        os.remove(tmp)
        raise
    return tmp, os.path.join(folder, CONFIG_NAME)


def write_adapter_folder(folder: str, state_dict: dict, config: PeftConfig, safe_serialization: bool = True,
                         auto_mapping: dict | None = None) -> None:
    """Write one adapter's config and weights into ``folder`` (created), replacing both together.

    ``state_dict``: file keys (``base_model.model.<path>.lora_A.weight`` ...). With
    ``safe_serialization`` the weights go to ``adapter_model.safetensors`` and an old
    ``adapter_model.bin`` is removed (and the other way round), so the folder never holds two
    different adapters' weights."""
    os.makedirs(folder, exist_ok=True)
    staged = []
    try:
        staged.append(_write_weights(state_dict, folder, safe_serialization))
        staged.append(_write_config(config, folder, auto_mapping))
        for tmp, _ in staged:
            checkpoint.ordinary_permissions(tmp)
        other = checkpoint.WEIGHTS_NAME if safe_serialization else checkpoint.SAFETENSORS_WEIGHTS_NAME
        with _signals_held():
            for tmp, final in staged:
                os.replace(tmp, final)
            staged = []
            stale = os.path.join(folder, other)
            if os.path.exists(stale):  # loaders prefer safetensors: an old file of the other kind would win
                os.remove(stale)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)


def adapter_file_state_dict(model, adapter_name: str, config: PeftConfig, state_dict: dict | None = None,
                            save_embedding_layers: bool | str = "auto") -> dict:
    """Adapter ``adapter_name`` of ``model`` (the user's model, with adapter layers) in file
    format: ``base_model.model.``-prefixed keys without the adapter name, as PEFT's
    ``get_peft_model_state_dict``. ``state_dict``: the model's state dict to take it from (keys
    relative to ``model``; default: the live model's)."""
    if state_dict is None:
        state_dict = {k: v.detach() for k, v in model.state_dict().items()}
    sd = checkpoint.get_adapter_state_dict(state_dict, adapter_name, config, save_embedding_layers)
    return checkpoint.add_peft_prefix(sd)


# ----- the config PEFT writes next to the weights ---------------------------------------------
def config_to_save(config: PeftConfig, model, adapter_name: str = "default") -> tuple[PeftConfig, dict | None]:
    """(a copy of ``config`` as PEFT saves it, the ``auto_mapping`` PEFT adds). PEFT fills
    ``base_model_name_or_path`` from the model's ``name_or_path`` and drops the adapter name from
    AdaLoRA's ``rank_pattern`` keys (both on the live config too, which is done here as well),
    saves ``inference_mode=True`` (leaving the live config as it was) and, without a
    ``task_type``, an ``auto_mapping`` naming the base model's class."""
    pattern = getattr(config, "rank_pattern", None)
    if peft_type_name(config) == "ADALORA" and pattern:
        suffix = f".{adapter_name}"
        config.rank_pattern = {k.removesuffix(suffix): v for k, v in pattern.items()}
    if config.base_model_name_or_path is None:
        name = model.__dict__.get("name_or_path", None) or None
        if name is not None:
            config.base_model_name_or_path = name
    saved = copy.copy(config)
    object.__setattr__(saved, "inference_mode", True)
    auto_mapping = None
    if config.task_type is None:
        cls = type(model)
        for base in cls.__mro__:  # fastpeft.with_adapters makes a subclass named after the model's class
            if base.__module__ != "fastpeft.mixin" and not base.__name__.startswith("_"):
                cls = base
                break
        auto_mapping = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    return saved, auto_mapping


def as_plain_lora(state_dict: dict, config: PeftConfig, initial_folder: str,
                  inference_mode: bool = False) -> tuple[dict, PeftConfig]:
    """The trained PiSSA / OLoRA adapter ``state_dict`` (file keys) as the plain LoRA adapter on
    the original base weights (fastpeft/init_methods.py), given the folder where the adapter was
    saved right after its initialization. As PEFT, that folder's config is rewritten with
    ``init_lora_weights=True`` (its weights are then the plain adapter's second half).
    ``inference_mode``: the live config's, which that copy keeps. modules_to_save copies stay in
    the converted file (PEFT drops them, losing a trained head)."""
    from . import init_methods

    if peft_type_name(config) != "LORA":
        raise ValueError("path_initial_model_for_weight_conversion is for LoRA adapters (PiSSA / OLoRA / CorDA)")
    initial = checkpoint.load_adapter_weights(initial_folder)
    initial = {k if k.startswith(checkpoint.PEFT_PREFIX) else checkpoint.PEFT_PREFIX + k: v for k, v in initial.items()}
    converted, plain_config = init_methods.convert_to_plain_lora(state_dict, initial, config)
    initial_config = copy.copy(config)  # PEFT writes a copy of the live config there (its inference_mode too)
    object.__setattr__(initial_config, "init_lora_weights", True)
    object.__setattr__(initial_config, "inference_mode", inference_mode)
    initial_config.save_pretrained(initial_folder)
    return converted, plain_config


# ----- the model card ---------------------------------------------------------------------------
def update_model_card(folder: str, model, configs: dict, active: list[str], task_type) -> None:
    """Create or update ``<folder>/README.md`` as PEFT's ``create_or_update_model_card``: card
    data ``library_name: peft``, the tags (the model's ``model_tags``, ``transformers``, ``lora``,
    ``base_model:adapter:<name>``), ``pipeline_tag: text-generation`` for causal LM adapters,
    ``base_model`` from the model config's ``_name_or_path``, and the PEFT format version."""
    from huggingface_hub import ModelCard, ModelCardData

    from .config import PEFT_FORMAT_VERSION

    path = os.path.join(folder, README_NAME)
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    tags = set(getattr(model, "model_tags", None) or [])
    if _is_transformers_model(model):
        tags.add("transformers")
    config = configs[active[0]] if active and active[0] in configs else next(iter(configs.values()))
    if peft_type_name(config) == "LORA":
        tags.add("lora")
    name_or_path = getattr(model, "name_or_path", None)
    if name_or_path is not None:
        tags.add(f"base_model:adapter:{name_or_path}")
    if tags:
        card.data["tags"] = sorted(tags)
    if not card.data.pipeline_tag and str(task_type) == "CAUSAL_LM":
        card.data.pipeline_tag = "text-generation"
    model_config = getattr(model, "config", None)
    model_config = model_config.to_dict() if hasattr(model_config, "to_dict") else {}
    if model_config.get("_name_or_path"):
        card.data["base_model"] = model_config["_name_or_path"]
    lines = card.text.splitlines()
    heading = "### Framework versions"
    entry = f"- PEFT {PEFT_FORMAT_VERSION}"
    if entry not in lines:
        if heading in lines:
            lines.insert(lines.index(heading) + 2, entry)
        else:
            lines.append(f"{heading}\n\n{entry}")
    card.text = "\n".join(lines)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + README_NAME, dir=folder)
    os.close(fd)
    try:
        card.save(tmp)
        checkpoint.ordinary_permissions(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _is_transformers_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


# ----- the Hub ----------------------------------------------------------------------------------
def push_folder_to_hub(save, repo_id: str, *, commit_message: str | None = None,
                       commit_description: str | None = None, private: bool | None = None, token=None,
                       revision: str | None = None, create_pr: bool = False, tags: list[str] | None = None,
                       default_message: str = "Upload model") -> str:
    """Create ``repo_id`` when missing (``private`` as given), ``save(folder)`` into a temporary
    folder and upload all of it in one commit (to branch ``revision``, created when missing; as
    a pull request with ``create_pr``). ``tags`` are added to the card's tags. Returns the commit
    URL (or the pull request's)."""
    from huggingface_hub import HfApi, ModelCard

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        save(folder)
        if tags:
            path = os.path.join(folder, README_NAME)
            card = ModelCard.load(path) if os.path.exists(path) else ModelCard("---\n---\n")
            card.data.tags = sorted(set(card.data.tags or []) | set(tags))
            card.save(path)
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message or default_message,
                                 commit_description=commit_description, token=token, revision=revision,
                                 create_pr=create_pr)
    return getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or str(info)
