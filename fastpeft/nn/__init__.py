"""Adapter layers as ordinary modules (for custom models that build them directly)."""
from .base import AdapterLayer, find_adapter_layers
from .ia3 import IA3Linear
from .lora import AdaLoraLinear, DoraMagnitude, LoraEmbedding, LoraLinear
from .modules_to_save import ModulesToSaveWrapper

__all__ = [
    "AdapterLayer",
    "AdaLoraLinear",
    "DoraMagnitude",
    "IA3Linear",
    "LoraEmbedding",
    "LoraLinear",
    "ModulesToSaveWrapper",
    "find_adapter_layers",
]
