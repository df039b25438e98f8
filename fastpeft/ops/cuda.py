"""Backend ``"cuda"``: the compiled CUDA kernels of ``fastpeft._C``.

The same operators as the ``"cpp"`` backend (``torch.ops.fastpeft.native_*``, defined in
``csrc/fastpeft_ops.cpp``), with CUDA kernels (``csrc/cuda/*.cu``, bound in
``csrc/cuda_ops.cpp``) registered for the CUDA dispatch key when the extension was built
against a CUDA build of torch with nvcc present. This backend is available when that
extension is loaded and a CUDA device exists; otherwise it is marked unavailable with the
reason (extension not built / built without CUDA / no CUDA device).
"""
from __future__ import annotations

import torch

from .. import _ext
from . import backends


def _reason() -> str | None:
    if not _ext.available():
        return _ext.error or "extension not built"
    reasons = []
    if not _ext.has_cuda():
        why = "torch without CUDA" if torch.version.cuda is None else "nvcc not found (CUDA_HOME)"
        reasons.append(f"extension built without CUDA kernels ({why} at build time)")
    if not torch.cuda.is_available():
        reasons.append("no CUDA device")
    return "; ".join(reasons) or None


_why = _reason()
if _why is None:
    from . import cpp  # fake kernels and autograd of the native operators

    backends.register("adapter_linear", "cuda", cpp.native_op("native_adapter_linear"), devices=("cuda",))
    backends.register("adapter_embedding", "cuda", cpp.native_op("native_adapter_embedding"), devices=("cuda",))
else:
    backends.mark_unavailable("cuda", _why)
