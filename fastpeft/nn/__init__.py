"""Adapter layers as ordinary modules (for custom models that build them directly)."""
from .adalora import AdaLoraLinear
from .adalora_conv import AdaLoraConv2d
from .base import AdapterLayer, find_adapter_layers
from .dora import DoraMagnitude
from .ia3 import IA3Linear
from .ia3_conv import IA3Conv
from .lora import LoraLinear
from .lora_conv import LoraConv
from .lora_embedding import LoraEmbedding
from .lora_mha import LoraMultiheadAttention
from .modules_to_save import ModulesToSaveWrapper

__all__ = [
    "AdapterLayer",
    "AdaLoraConv2d",
    "AdaLoraLinear",
    "DoraMagnitude",
    "IA3Conv",
    "IA3Linear",
    "LoraConv",
    "LoraEmbedding",
    "LoraLinear",
    "LoraMultiheadAttention",
    "ModulesToSaveWrapper",
    "find_adapter_layers",
]
