"""Triton kernels behind the ``"triton"`` backend of the fastpeft operators.

Modules (imported by :mod:`fastpeft.ops.triton` / ``triton_quant``, never by the layers):

* :mod:`fastpeft.kernels.lora_linear`: the host module of ``adapter_linear`` (base matmul fused
  with LoRA / DoRA / IA3 for one, several or per-row adapters): plan lookup, launches. Its
  Triton code is :mod:`~fastpeft.kernels.lora_jit` (with the ``SHRINK_*`` modes), its planner
  (paths, tiles, split-K; the constants and ``override()``) :mod:`~fastpeft.kernels.lora_plan`.
* :mod:`fastpeft.kernels.quant_host`: the host side of ``adapter_linear_4bit`` / ``_8bit``
  (bitsandbytes bases): the path per call; :mod:`~fastpeft.kernels.quant_linear`: their
  kernels (dequantization in the matmul) and planner.
* :mod:`fastpeft.kernels.lora_embedding`: ``adapter_embedding`` (row gather plus per-row LoRA).
* :mod:`fastpeft.kernels.tuning`: per-device tuning files (``configs/<device>.json``) over the
  planners' constants; :mod:`~fastpeft.kernels._common`: host helpers the planners share.
* :mod:`fastpeft.kernels._interpret`: where the kernels can run (``TRITON_INTERPRET``, the CUDA
  device check), read without importing Triton.
* :mod:`fastpeft.kernels.lora_aot`: compiles the kernels for a GPU architecture without a GPU,
  through :mod:`~fastpeft.kernels._compile_only` (Triton's public ``triton.compile``).

The operator layer (:mod:`fastpeft.ops`) checks the arguments before it calls a backend
(:mod:`fastpeft.ops._checks`), so these modules check only what their kernels alone cannot do;
they import nothing of the operator layer or the API (what the quantized paths need of it comes
in as :class:`~fastpeft.kernels.quant_host.Fallbacks`).

``docs/kernels.md`` describes the tiling and every constant; ``docs/perf-notes.md`` the
predictions and measurements. Importing this package does not import Triton; the kernel
modules do, and ``TRITON_INTERPRET`` must be set before the first of them is imported (Triton
decides between compiling and interpreting when ``@triton.jit`` decorates a function;
:data:`fastpeft.kernels._interpret.INTERPRET` is what the kernels saw).
"""
