"""Adapter configs with PEFT's field names, defaults and JSON format.

``LoraConfig``, ``IA3Config`` and ``AdaLoraConfig`` have every field that PEFT 0.21's
dataclasses have, with the same names, defaults and JSON keys, and every file written here loads
in PEFT. Each field is classified in one table per method (``_fields.FIELD_TABLES``):
*implemented* (with PEFT's meaning), *metadata* (kept and saved, no effect on what the layers
compute or save: training-only, runtime-only, or read only by a PEFT tool), or *unsupported*:
setting one of those raises ``UnsupportedConfigError`` (a ``ValueError``) naming the field, in the
constructor, when a saved ``adapter_config.json`` is loaded (before any model is touched) and on
attribute assignment. fastpeft never accepts an option and then ignores it.

Validation happens in ``__post_init__`` (PEFT's checks first, then the unsupported options);
errors name the field, the bad value and what would be accepted.

The package's modules: ``_base`` (``PeftConfig``: shared fields, loading and saving; the enums),
``_lora`` (``LoraConfig``, ``AdaLoraConfig``), ``_ia3`` (``IA3Config``), ``_fields`` (the table of
fields and the refusal), ``_checks`` (validation and serialisation helpers). Import from
``fastpeft.config``.
"""

from __future__ import annotations

from ._base import (
    _CONFIG_CLASSES,
    CONFIG_NAME,
    PEFT_FORMAT_VERSION,
    PeftConfig,
    PeftType,
    TaskType,
    as_fastpeft_config,
    peft_type_name,
)
from ._fields import FIELD_TABLES, UnsupportedConfigError
from ._ia3 import IA3Config
from ._lora import AdaLoraConfig, LoraConfig

__all__ = [
    "CONFIG_NAME",
    "PeftType",
    "TaskType",
    "PeftConfig",
    "LoraConfig",
    "IA3Config",
    "AdaLoraConfig",
    "peft_type_name",
    "as_fastpeft_config",
    "PEFT_FORMAT_VERSION",
    "FIELD_TABLES",
    "UnsupportedConfigError",
]

# ``PeftConfig.from_dict`` / ``from_pretrained`` pick the class named by a file's ``peft_type``
_CONFIG_CLASSES.update({
    PeftType.LORA.value: LoraConfig,
    PeftType.IA3.value: IA3Config,
    PeftType.ADALORA.value: AdaLoraConfig,
})
