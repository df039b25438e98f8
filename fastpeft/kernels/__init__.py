"""Triton kernels behind the ``"triton"`` backend of the fastpeft operators.

Modules (imported by :mod:`fastpeft.ops.triton`, never by the layers):

* :mod:`fastpeft.kernels.lora_linear`: ``adapter_linear`` (base matmul fused with LoRA / DoRA /
  IA3 for one, several or per-row adapters) and its dispatcher.
* :mod:`fastpeft.kernels.lora_embedding`: ``adapter_embedding`` (row gather plus per-row LoRA).

``docs/kernels.md`` describes the tiling and every constant; ``docs/perf-notes.md`` the
predictions and measurements. Importing this package does not import Triton; the kernel
modules do, and they read ``TRITON_INTERPRET`` when they are imported (Triton decides between
compiling and interpreting when ``@triton.jit`` decorates a function), so it must be set
before the first import of a kernel module.
"""
