"""Adapter configs with PEFT's field names, defaults and JSON format.

``LoraConfig``, ``IA3Config`` and ``AdaLoraConfig`` accept every field that PEFT 0.21's
dataclasses have, so any ``adapter_config.json`` written by PEFT loads here and every file
written here loads in PEFT. Fields whose behaviour fastpeft does not implement (LoftQ, EVA,
CorDA, Megatron, ...) are accepted, kept and written back unchanged.

Validation happens in ``__post_init__``; errors name the field, the bad value and what would
be accepted.

The package's modules: ``_base`` (``PeftConfig``: shared fields, loading and saving; the enums),
``_lora`` (``LoraConfig``, ``AdaLoraConfig``), ``_ia3`` (``IA3Config``), ``_checks`` (validation
and serialisation helpers). Import from ``fastpeft.config``.
"""

from __future__ import annotations

from ._base import _CONFIG_CLASSES, CONFIG_NAME, PeftConfig, PeftType, TaskType, peft_type_name
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
]

# ``PeftConfig.from_dict`` / ``from_pretrained`` pick the class named by a file's ``peft_type``
_CONFIG_CLASSES.update({
    PeftType.LORA.value: LoraConfig,
    PeftType.IA3.value: IA3Config,
    PeftType.ADALORA.value: AdaLoraConfig,
})
