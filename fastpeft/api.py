"""Functional entry points mirroring PEFT's: ``inject_adapter_in_model`` & co."""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from torch import nn

from . import tuner
from ._progress import progress
from .config import PeftConfig, as_fastpeft_config

CONFIG_NAME = "adapter_config.json"


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: dict | None = None) -> nn.Module:
    """Add the adapter layers of ``peft_config`` to ``model`` in place and return ``model``
    (PEFT's parameters). ``state_dict``: PEFT uses it only to find the targets of a config
    without ``target_modules``, which fastpeft does not implement, so it raises when given;
    ``low_cpu_mem_usage`` changes nothing computed here."""
    if state_dict is not None:
        raise NotImplementedError("inject_adapter_in_model(state_dict=...) (targets from a state dict) is not "
                                  "supported by fastpeft; give target_modules in the config, then load the weights")
    del low_cpu_mem_usage
    tuner.inject(model, as_fastpeft_config(peft_config), adapter_name)  # a peft.LoraConfig & co. too
    return model


def _adapters_in_folder(folder: str) -> dict[str, str]:
    """PEFT's layout of ``save_pretrained`` with several adapters: ``default`` at the top (when
    there), every other adapter in a subfolder of its name."""
    found = {}
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        found["default"] = folder
    for entry in sorted(os.listdir(folder)):
        sub = os.path.join(folder, entry)
        if os.path.isfile(os.path.join(sub, CONFIG_NAME)):
            found[entry] = sub
    if not found:
        raise ValueError(f"load_adapters: {folder!r} holds no {CONFIG_NAME}, at the top or in a subfolder")
    return found


def load_adapters(model: nn.Module, adapters: str | Mapping[str, str] | Iterable[str],
                  progressbar: bool | None = None, **kwargs) -> list[str]:
    """Load many adapters into ``model`` (a ``fastpeft.PeftModel`` or a model with the adapter
    mixin) with its own ``load_adapter(model_id, adapter_name=..., **kwargs)``; returns their names.

    ``adapters``: a mapping ``name -> folder or Hub id``; a list of folders or Hub ids (each
    named after its last path component); or one folder saved by PEFT / fastpeft with several
    adapters (``default`` at the top, the others in subfolders named after them).
    ``progressbar``: a bar over the adapters (None: only for more than 64;
    ``HF_HUB_DISABLE_PROGRESS_BARS=1`` hides it). Names already on the model raise before
    anything is loaded; when one load fails, the adapters this call loaded are deleted again
    and the error is raised.
    """
    load = getattr(model, "load_adapter", None)
    if not callable(load):
        raise TypeError(f"load_adapters: {type(model).__name__} has no load_adapter; use fastpeft.PeftModel or "
                        f"fastpeft.with_adapters(model)")
    if isinstance(adapters, (str, os.PathLike)):
        if not os.path.isdir(adapters):
            raise ValueError(f"load_adapters: {os.fspath(adapters)!r} is not a local folder; for Hub repos pass a "
                             f"list of ids or a mapping name -> id")
        todo = _adapters_in_folder(os.fspath(adapters))
    elif isinstance(adapters, Mapping):
        todo = dict(adapters)
    else:
        todo = {}
        for source in adapters:
            name = os.path.basename(os.path.normpath(os.fspath(source)))
            if name in todo:
                raise ValueError(f"load_adapters: two sources are named {name!r}; pass a mapping name -> source")
            todo[name] = os.fspath(source)
    existing = set(getattr(model, "peft_config", {}) or {})
    clash = sorted(existing & set(todo))
    if clash:
        raise ValueError(f"load_adapters: adapter name(s) {clash} already exist on the model; delete them first")
    loaded = []
    try:
        for name, source in progress(list(todo.items()), "Loading adapters", enabled=progressbar):
            load(source, adapter_name=name, **kwargs)
            loaded.append(name)
    except BaseException:  # all or nothing: the adapters loaded by this call go again
        for name in reversed(loaded):
            model.delete_adapter(name)
        raise
    return list(todo)
