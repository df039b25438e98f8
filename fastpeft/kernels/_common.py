"""Host-side helpers the Triton kernel modules share (``lora_plan``/``lora_linear`` and ``quant_linear``)."""
from __future__ import annotations

import torch
from torch import Tensor

# SM count assumed when no GPU is present (interpreter): an H100 SXM, so the plans made on the
# CPU are the ones an H100 would get.
ASSUMED_SMS = 132

_sms: dict = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached); ``ASSUMED_SMS`` for a CPU (the interpreter)."""
    n = _sms.get(device)
    if n is None:
        n = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else ASSUMED_SMS
        _sms[device] = n
    return n


def pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def strides2(t: Tensor | None, rows: int) -> tuple:
    """(row stride, column stride) of a [N] / [1, N] / [rows, N] scale; 0 for broadcast dims."""
    if t is None:
        return 0, 0
    if t.dim() == 1:
        return 0, t.stride(0)
    return (0 if t.shape[0] == 1 and rows != 1 else t.stride(0)), t.stride(1)
