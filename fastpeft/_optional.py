"""Optional libraries (transformers, bitsandbytes, ...) without importing them.

An object can only be an instance of a class whose module has already been imported, so an
``isinstance`` check against an optional library's class never needs to import the library:
if the module is not in ``sys.modules``, no object of that class exists. This keeps
``import fastpeft`` from paying for ``import transformers`` (about 0.6 s here) when the model
at hand is a plain ``torch.nn.Module``.
"""
from __future__ import annotations

import sys


def loaded_attr(module_name: str, attr: str):
    """``module_name.attr`` when ``module_name`` is already imported, else ``None`` (never imports)."""
    module = sys.modules.get(module_name)
    return getattr(module, attr, None) if module is not None else None


def transformers_conv1d() -> type | None:
    """Transformers' GPT-2 style ``Conv1D`` (weight ``[in, out]``), or None when transformers is not loaded."""
    return loaded_attr("transformers.pytorch_utils", "Conv1D")


def transformers_pretrained_model() -> type | None:
    """``transformers.PreTrainedModel``, or None when transformers' modelling code is not loaded."""
    return loaded_attr("transformers.modeling_utils", "PreTrainedModel")
