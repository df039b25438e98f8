"""Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

Read once, at import, like Triton itself (``@triton.jit`` decides when it decorates). Kernels
use it for interpreter-only workarounds, e.g. bf16 tiles upcast to fp32 before ``tl.dot``
(the interpreter's bf16 ``tl.dot`` is wrong; on a GPU the bf16 dot is what uses tensor cores).
"""
import os

import triton

try:  # triton >= 3.4
    INTERPRET = bool(triton.knobs.runtime.interpret)
except AttributeError:  # pragma: no cover - older triton
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
