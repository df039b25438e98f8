"""Adapter layers as ordinary modules (for custom models that build them directly)."""
from .adalora import AdaLoraLinear
from .base import AdapterLayer, find_adapter_layers
from .dora import DoraMagnitude
from .ia3 import IA3Linear
from .lora import LoraLinear
from .lora_embedding import LoraEmbedding
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
