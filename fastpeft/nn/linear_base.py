"""What every adapter layer on a linear-like base shares (LoRA, DoRA, AdaLoRA, IA3): the kind of
base (nn.Linear, transformers Conv1D, bitsandbytes 4/8-bit), the one call of the fused operator
for it, and writing a merged weight back into it."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..ops import _schema  # noqa: F401  (defines torch.ops.fastpeft.*)
from ..parallel import tensor_parallel as _tensor_parallel
from ._base_kinds import base_kind, in_out_features
from .base import AdapterLayer


class LinearLayerBase(AdapterLayer):
    """An adapter layer over a linear-like base: ``kind`` ("linear", "conv1d" or "quant"),
    ``in_features`` K, ``out_features`` N and ``fan_in_fan_out`` (Conv1D stores W as [K, N])."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.kind = base_kind(base_layer)
        self.in_features, self.out_features = in_out_features(base_layer)
        if self._tp is not None:  # a tensor-parallel base: this rank's features (fastpeft/parallel)
            self.in_features, self.out_features = self._tp.local_in, self._tp.local_out
        self.fan_in_fan_out = self.kind == "conv1d"

    def _base_weight_nk(self) -> Tensor:
        """The base weight as the operator takes it, [N, K] (a transposed view for Conv1D).
        Not for quantized bases (their operator reads the packed weight)."""
        W = self.base_layer.weight
        return W.t() if self.kind == "conv1d" else W

    def _run_fused(self, x2: Tensor, lora_a=None, lora_bt=None, slot_scales=None, token_slots=None, dora_scale=None,
                   input_scale=None, output_scale=None) -> Tensor:
        """``y [M, N]`` = the base layer on ``x2 [M, K]`` fused with the adapters, in one call of
        ``torch.ops.fastpeft.adapter_linear`` (or its quantized variant): the stacks ``lora_a
        [S, R, K]`` and ``lora_bt [S, R, N]`` (B transposed), ``slot_scales [S]``,
        ``token_slots [M or 1, J]``, DoRA's ``[S, N]`` scale, IA3's input / output scales."""
        args = (lora_a, lora_bt, slot_scales, token_slots, dora_scale, input_scale, output_scale)
        if self._tp is not None:  # on this rank's shards (row-parallel: one all-reduce for base and adapters)
            return _tensor_parallel.run_fused(self, x2, *args)
        if self.kind == "quant":
            from ..quant.layers import quantized_adapter_linear

            return quantized_adapter_linear(self.base_layer, x2, *args)
        return torch.ops.fastpeft.adapter_linear(x2, self._base_weight_nk(), self.base_layer.bias, *args)

    def _set_base_weight(self, w_nk: Tensor) -> None:
        """Write a merged weight ``w_nk [N, K]`` into the base (requantized for 4/8-bit)."""
        if self.kind == "quant":
            from ..quant.layers import quantized_like

            warnings.warn("merging into a quantized base: dequantize, merge, requantize (rounding errors possible)", stacklevel=3)
            self.base_layer = quantized_like(self.base_layer, w_nk)
            return
        with torch.no_grad():
            self.base_layer.weight.copy_(w_nk.t() if self.kind == "conv1d" else w_nk)
