"""Optional libraries (transformers, bitsandbytes, ...) without importing them.

An object can only be an instance of a class whose module has already been imported, so an
``isinstance`` check against an optional library's class never needs to import the library:
if the module is not in ``sys.modules``, no object of that class exists. This keeps
``import fastpeft`` from paying for ``import transformers`` (about 0.6 s here) when the model
at hand is a plain ``torch.nn.Module``.
"""
from __future__ import annotations

import importlib
import sys


def loaded_attr(module_name: str, attr: str):
    """``module_name.attr`` when ``module_name`` is already imported, else ``None`` (never imports)."""
    module = sys.modules.get(module_name)
    return getattr(module, attr, None) if module is not None else None


_found: dict = {}


def _transformers_class(name: str, module_name: str) -> type | None:
    """``transformers.<name>`` once transformers is imported (by anyone), else None.

    Looked up in ``module_name`` (where it is defined today) when that is loaded, else imported
    from there, so a release that moves the class and re-exports it keeps working; cached, so a
    forward pays a dict lookup."""
    cls = _found.get(name)
    if cls is None:  # where it is defined today: no import at all
        cls = loaded_attr(module_name, name)
        if cls is not None:
            _found[name] = cls
    if cls is None and "transformers" in sys.modules:
        try:
            module = importlib.import_module(module_name)
            cls = _found[name] = getattr(module, name)
        except (ImportError, AttributeError):
            return None
    return cls


def transformers_conv1d() -> type | None:
    """Transformers' GPT-2 style ``Conv1D`` (weight ``[in, out]``), or None when transformers is not loaded."""
    return _transformers_class("Conv1D", "transformers.pytorch_utils")


def transformers_pretrained_model() -> type | None:
    """``transformers.PreTrainedModel``, or None when transformers is not loaded."""
    return _transformers_class("PreTrainedModel", "transformers.modeling_utils")
