"""AdaLoRA (SVD form) on ``nn.Conv2d``, PEFT 0.21's ``SVDConv2d``.

PEFT's parameters of adapter ``<name>`` on a base ``C_in -> C_out`` with kernel ``kh x kw``:
``lora_A [r, C_in * kh * kw]``, ``lora_E [r, 1]``, ``lora_B [C_out, r]`` and the non-trainable
``ranknum [1]`` (not saved). The delta is the kernel ``dK = (B @ (A * E) * scaling / (ranknum +
1e-5)).view(W.shape)``, applied with the base's stride, padding and dilation (PEFT's
``conv2d(dropout(x), dK, ...)``), so dilated bases work; grouped ones do not (PEFT's reshape
fails: refused) and neither do Conv1d / Conv3d (PEFT refuses them). Rank 0 (a layer whose ranks
the allocator pruned) holds zero-size tensors and adds nothing, as in PEFT.

Routes, caching and merging are :class:`fastpeft.nn.lora_conv.LoraConv`'s (the cached kernel
for inference, PEFT's composition for training).
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from .adalora import AdaLoraLinear, add_svd_triplet
from .lora_conv import LoraConv, check_conv_base


class AdaLoraConv2d(LoraConv):
    """AdaLoRA adapters on an ``nn.Conv2d`` (groups 1)."""

    adapter_param_dicts = ("lora_A", "lora_B", "lora_E", "ranknum")
    method = "AdaLoRA"

    def __init__(self, base_layer: nn.Module, where: str = ""):
        super().__init__(base_layer, where)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self.inference_mode: dict[str, bool] = {}  # the config's, per adapter (as AdaLoraLinear records it)

    def _check_base(self, base: nn.Module, where: str) -> None:
        at = f" (module {where!r})" if where else ""
        if not isinstance(base, nn.Conv2d):
            raise ValueError(f"AdaLoRA on a {type(base).__name__}{at} is not supported: PEFT's AdaLoRA adapts "
                             f"torch.nn.Linear, Conv1D and torch.nn.Conv2d only")
        if base.groups > 1:
            raise ValueError(f"AdaLoRA on a Conv2d with groups={base.groups}{at} is not supported: PEFT's AdaLoRA kernel "
                             f"[C_out, C_in * kh * kw] does not fit a grouped weight (PEFT fails in forward)")
        check_conv_base(base, self.method, where)

    def add_adapter(self, name, r, lora_alpha, lora_dropout=0.0, init_lora_weights=True, dtype=None, ranknum=None,
                    inference_mode=None, **_):
        """``r`` >= 0; ``ranknum``: the scaling divisor (PEFT keeps the initial rank there after
        pruning); ``inference_mode``: the config's, recorded (None: not known). ``lora_A`` is
        [r, C_in * kh * kw], as PEFT's SVDConv2d."""
        add_svd_triplet(self, name, r, lora_alpha, lora_dropout, init_lora_weights, dtype, ranknum, inference_mode,
                        self.in_features * math.prod(self.base_layer.kernel_size),
                        order=("lora_A", "lora_E", "lora_B"))

    def _remove(self, name: str) -> None:
        super()._remove(name)
        self.inference_mode.pop(name, None)

    def resize_adapter(self, name: str, keep) -> None:
        """Keep only the ranks ``keep`` (bool mask [r]) of adapter ``name``, as
        :meth:`AdaLoraLinear.resize_adapter` (the same code: the SVD triplet is laid out alike)."""
        AdaLoraLinear.resize_adapter(self, name, keep)

    def _frozen_param(self, name, p):
        return name in self.ranknum and p is self.ranknum[name]

    def _scale(self, name):
        return self.scaling[name] / (float(self.ranknum[name]) + 1e-5)

    def _watched(self, name):
        return (self.lora_A[name], self.lora_B[name], self.lora_E[name], self.ranknum[name])

    def _delta_weight(self, name):
        # PEFT's order of operations (ranknum a tensor), so merges match PEFT's in fp32
        A, B, E = self.lora_A[name], self.lora_B[name], self.lora_E[name]
        delta = B @ (A * E) * self.scaling[name] / (self.ranknum[name] + 1e-5)
        return delta.reshape(self.base_layer.weight.shape)

    def get_delta_weight(self, adapter):
        """PEFT's ``get_delta_weight``: the kernel ``dK`` in the adapter dtype."""
        return self._delta_weight(adapter)

    def _adapter_delta(self, name, x, result):
        base = self.base_layer
        xl = x.to(self.lora_A[name].dtype)
        return F.conv2d(self.lora_dropout[name](xl), self._delta_weight(name), None, base.stride, base.padding,
                        base.dilation, base.groups)
