"""Backend ``"cpp"``: the compiled C++ CPU kernels of ``fastpeft._C``.

The extension defines (in C++, ``csrc/fastpeft_ops.cpp``) the operators

* ``torch.ops.fastpeft.native_adapter_linear``: same arguments and semantics as the routed
  ``torch.ops.fastpeft.adapter_linear`` (see ``_schema.py``),
* ``torch.ops.fastpeft.native_adapter_embedding``: same as ``adapter_embedding``,
* ``torch.ops.fastpeft.native_lora_shrink_expand``: ``y + sum_j lora_j(x)`` for per-row slots
  (the BGMV/SGMV building block, functional: returns a new tensor),

with CPU kernels (and CUDA kernels when built with CUDA, see ``cuda.py``). This module adds
what only Python can: fake (meta) kernels so ``torch.compile`` traces them, autograd (the
backward differentiates the PyTorch reference, as for the routed operators), and the
registration of the CPU kernels as backend ``"cpp"`` of the routed operators. When the
extension is not built, ``"cpp"`` is marked unavailable with the reason.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from . import backends, reference
from ._schema import register_recompute_autograd

OPS = ("native_adapter_linear", "native_adapter_embedding", "native_lora_shrink_expand")


def lora_shrink_expand_reference(
    y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, slot_scales: Tensor, token_slots: Tensor
) -> Tensor:
    """PyTorch semantics of ``native_lora_shrink_expand``.

    y [M, N], x [M, K], lora_a [S, R, K], lora_b [S, R, N] (B transposed), slot_scales [S], token_slots
    [M or 1, J] int32 (-1 = none). Returns, in y's dtype, a new tensor
    ``y + sum_j ((x.to(A.dtype) @ lora_a[s].T) @ lora_b[s]) * slot_scales[s]``, s = token_slots[:, j].
    """
    out = y
    if token_slots.numel() > 0:
        xl = x.to(lora_a.dtype)
        for j in range(token_slots.shape[1]):
            col = token_slots[:, j]
            if col.shape[0] != x.shape[0]:
                col = col.expand(x.shape[0])
            out = out + reference.lora_rows(xl, lora_a, lora_b, slot_scales, col)
    return out.to(y.dtype) if out is not y else y.clone()


REFERENCES = {
    "native_adapter_linear": reference.adapter_linear,
    "native_adapter_embedding": reference.adapter_embedding,
    "native_lora_shrink_expand": lora_shrink_expand_reference,
}

_registered = False


def _register_python_parts() -> None:
    """Fake kernels and autograd of the compiled operators (once per process)."""
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake("fastpeft::native_adapter_linear")
    def _(x, weight, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale, input_scale, output_scale):
        torch._check(x.dim() == 2, lambda: f"native_adapter_linear: x must be [M, K], got {tuple(x.shape)}")
        torch._check(weight.dim() == 2, lambda: "native_adapter_linear: weight must be [N, K]")
        torch._check(
            weight.shape[1] == x.shape[1],
            lambda: f"native_adapter_linear: weight must be [N, K] with K = {x.shape[1]}, got {tuple(weight.shape)}",
        )
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("fastpeft::native_adapter_embedding")
    def _(ids, weight, lora_a, lora_b, slot_scales, token_slots):
        if lora_a is None or token_slots is None or token_slots.numel() == 0:
            return weight.new_empty(*ids.shape, weight.shape[1])
        return weight.new_empty(ids.shape[0], weight.shape[1])

    @torch.library.register_fake("fastpeft::native_lora_shrink_expand")
    def _(y, x, lora_a, lora_b, slot_scales, token_slots):
        torch._check(y.dim() == 2 and x.dim() == 2, lambda: "native_lora_shrink_expand: x and y must be 2-D")
        return y.new_empty(y.shape)

    for name, ref in REFERENCES.items():
        register_recompute_autograd(f"fastpeft::{name}", ref)


def native_op(name: str):
    """``torch.ops.fastpeft.<name>.default`` (the extension must be loaded)."""
    return getattr(torch.ops.fastpeft, name).default


if _ext.available():
    _register_python_parts()
    backends.register("adapter_linear", "cpp", native_op("native_adapter_linear"), devices=("cpu",))
    backends.register("adapter_embedding", "cpp", native_op("native_adapter_embedding"), devices=("cpu",))
else:
    backends.mark_unavailable("cpp", _ext.error or "extension not built")
