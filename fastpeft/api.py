"""Functional entry points mirroring PEFT's: ``inject_adapter_in_model`` & co."""
from __future__ import annotations

from torch import nn

from . import tuner
from .config import PeftConfig


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, **kwargs) -> nn.Module:
    """Add the adapter layers of ``peft_config`` to ``model`` in place and return ``model``."""
    tuner.inject(model, peft_config, adapter_name)
    return model
