"""Where the Triton kernels can run: Triton's CPU interpreter flag and the CUDA device check.

Both are read without importing Triton (``import triton`` costs about 0.17 s on the 2-core
machine): :mod:`fastpeft.ops.triton` decides the backend's devices with them before anything
imports Triton (``tools/import_time.py`` measures that ``import fastpeft`` stays clear of it).

* :func:`interpret_requested` / :data:`INTERPRET`: whether ``TRITON_INTERPRET`` asks Triton to
  run kernels in its interpreter, parsed as Triton's knobs parse it
  (``triton.knobs.runtime.interpret``: ``1``, ``true``, ``on``, ``yes`` or ``y`` in any case;
  ``tests/test_compile_only.py`` compares the two). Triton decides between compiling and
  interpreting when ``@triton.jit`` decorates a function, so the kernel modules read
  :data:`INTERPRET` for interpreter-only workarounds, e.g. bf16 tiles upcast to fp32 before
  ``tl.dot`` (the interpreter's bf16 ``tl.dot`` is wrong; on a GPU the bf16 dot is what uses
  tensor cores). :data:`INTERPRET` is evaluated once, when it is first read: by the first
  kernel module imported, as its kernels are decorated.
* :func:`cuda_usable`: whether the current CUDA device can run the kernels (compute capability
  7.0 or newer), with the reason when not.
"""
from __future__ import annotations

import os

import torch

#: values of ``TRITON_INTERPRET`` that Triton reads as true (compared in lower case)
TRUE_VALUES = ("1", "true", "on", "yes", "y")


def interpret_requested(environ=None) -> bool:
    """Whether ``TRITON_INTERPRET`` (in ``environ``, default ``os.environ``) turns Triton's CPU
    interpreter on. Does not import Triton."""
    value = (os.environ if environ is None else environ).get("TRITON_INTERPRET", "")
    return value.lower() in TRUE_VALUES


def __getattr__(name: str):
    # INTERPRET: interpret_requested() when first read (the first kernel module's import, the
    # moment its @triton.jit decorators chose), then a plain module attribute
    if name == "INTERPRET":
        value = globals()["INTERPRET"] = interpret_requested()
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: oldest compute capability (major) the Triton kernels run on
MIN_CUDA_MAJOR = 7


def cuda_usable() -> tuple[bool, str]:
    """``(True, "")`` when a CUDA device is present whose compute capability is at least
    :data:`MIN_CUDA_MAJOR`, else ``(False, why)``. Does not import Triton."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        major, _ = torch.cuda.get_device_capability()
    except Exception as e:  # pragma: no cover - broken driver
        return False, f"CUDA device not usable: {e}"
    if major < MIN_CUDA_MAJOR:
        return False, (f"CUDA device has compute capability {major}.x; the Triton kernels need "
                       f"{MIN_CUDA_MAJOR}.0 or newer")
    return True, ""
