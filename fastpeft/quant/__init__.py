"""Quantized base layers: bitsandbytes-format 4-bit (NF4/FP4) and 8-bit (LLM.int8) weights.

``formats`` holds the formats in pure PyTorch; ``layers`` is what the adapter layers call for a
``bitsandbytes.nn.Linear4bit`` / ``Linear8bitLt`` base; :func:`fastpeft.quantize.quantize` turns
a model's linear layers into such layers.
"""
from .formats import (  # noqa: F401
    QuantState4bit,
    dequantize_4bit,
    dequantize_8bit,
    quantize_4bit,
    quantize_8bit_rowwise,
)
