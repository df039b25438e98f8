"""Triton kernels behind the ``"triton"`` backend of the fastpeft operators.

Modules (imported by :mod:`fastpeft.ops.triton` / ``triton_quant``, never by the layers):

* :mod:`fastpeft.kernels.lora_linear`: the host module of ``adapter_linear`` (base matmul fused
  with LoRA / DoRA / IA3 for one, several or per-row adapters): argument checks, plan lookup,
  launches. Its Triton code is :mod:`~fastpeft.kernels.lora_jit`, its planner (paths, tiles,
  split-K; the constants and ``override()``) :mod:`~fastpeft.kernels.lora_plan`.
* :mod:`fastpeft.kernels.quant_linear`: ``adapter_linear_4bit`` / ``_8bit`` (bitsandbytes bases
  dequantized in the kernel), with its planner.
* :mod:`fastpeft.kernels.lora_embedding`: ``adapter_embedding`` (row gather plus per-row LoRA).
* :mod:`fastpeft.kernels.tuning`: per-device tuning files (``configs/<device>.json``) over the
  planners' constants; :mod:`~fastpeft.kernels._common`: host helpers the planners share.
* :mod:`fastpeft.kernels.lora_aot`: compiles the kernels for a GPU architecture without a GPU.

``docs/kernels.md`` describes the tiling and every constant; ``docs/perf-notes.md`` the
predictions and measurements. Importing this package does not import Triton; the kernel
modules do, and they read ``TRITON_INTERPRET`` when they are imported (Triton decides between
compiling and interpreting when ``@triton.jit`` decorates a function), so it must be set
before the first import of a kernel module.
"""
