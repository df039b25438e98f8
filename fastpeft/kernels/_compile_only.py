"""Compile Triton kernels for a CUDA architecture on a machine without a GPU (Triton's public API).

Triton's compiler and ``ptxas`` need a target, not a GPU: ``triton.compile(ASTSource(kernel,
signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=...)`` lowers a
``@triton.jit`` function to a cubin anywhere. What a launch adds is the *specialization*:
the signature types Triton derives from the arguments, the integers equal to 1 it turns into
constants, and the 16-divisibility of pointers and integers it passes as attributes. This
module does the same from example arguments, so a compile here is the one a GPU launch with
those arguments would make:

* :func:`compile_for` compiles one kernel for given arguments (``tests/test_quant_ops.py``);
* :func:`launches_compile_only` swaps a host module's kernels for stand-ins whose launches
  compile instead of running, so the real host code (plans, strides, constexprs) picks what
  is compiled (``fastpeft.kernels.lora_aot``).

Specialization as Triton 3.x's launcher does it (checked against ``triton.runtime.jit`` on
3.9 by ``tests/test_compile_only.py``): a tensor is a pointer ``*<dtype>``, divisible by 16
when its address is; an int is ``i32`` / ``i64`` / ``u64`` by range, the constant 1 when it
equals 1, divisible by 16 when it is; a float is ``fp32``; a bool ``u1``; None a constant.
Parameters marked ``do_not_specialize`` / ``do_not_specialize_on_alignment`` are honoured.
It must run with ``TRITON_INTERPRET`` unset: interpreted kernels are never compiled.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

from ._interpret import INTERPRET

#: torch dtype -> Triton's name for it in a signature (``*fp16`` is a pointer to fp16)
TRITON_TYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
    torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5",
}

_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def target(arch: int) -> GPUTarget:
    """The CUDA target of compute capability ``arch`` (x10: 90 = H100/H200, 80 = A100)."""
    return GPUTarget("cuda", arch, 32)


def _specialize(value: Any, specialize: bool, align: bool) -> tuple[str, Any, bool]:
    """(signature type, constant value or None, divisible by 16) of one non-constexpr argument."""
    if isinstance(value, torch.Tensor):
        try:
            name = TRITON_TYPES[value.dtype]
        except KeyError:
            raise TypeError(f"no Triton pointer type for a {value.dtype} tensor") from None
        return "*" + name, None, specialize and align and value.data_ptr() % 16 == 0
    if value is None:
        return "constexpr", None, False
    if isinstance(value, bool):
        return "u1", None, False
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", 1, False
        kind = "i32" if -(2**31) <= value < 2**31 else "i64" if -(2**63) <= value < 2**63 else "u64"
        return kind, None, specialize and align and value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"cannot specialize a launch argument of type {type(value).__name__}")


def specialize(kernel, args: Mapping[str, Any], arch: int = 90) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for ``ASTSource`` from ``args``: every parameter of the
    ``@triton.jit`` function ``kernel`` by name (constexpr parameters with their values)."""
    missing = [p.name for p in kernel.params if p.name not in args]
    if missing:
        raise TypeError(f"{kernel.fn.__name__}: no value for {', '.join(missing)}")
    divisible = make_backend(target(arch)).parse_attr("D")  # [["tt.divisibility", 16]]
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        value = args[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        kind, const, div16 = _specialize(value, not p.do_not_specialize, not p.do_not_specialize_on_alignment)
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = const
        elif div16:
            attrs[(i,)] = divisible
    return signature, constexprs, attrs


def compile_for(kernel, arch: int, args: Mapping[str, Any], **options):
    """Compile ``kernel`` for ``sm_<arch>`` as a launch with ``args`` (every parameter by name)
    would; ``options``: ``num_warps``, ``num_stages``, ... Returns Triton's ``CompiledKernel``
    (``.asm["cubin"]``, ``.metadata.shared``)."""
    if INTERPRET:
        raise RuntimeError("compiling needs TRITON_INTERPRET unset (interpreted kernels are never compiled)")
    signature, constexprs, attrs = specialize(kernel, args, arch)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target(arch), options=options)


class _CompileOnlyKernel:
    """Stands in for a ``@triton.jit`` kernel: ``stand_in[grid](*args, **kwargs)`` compiles for
    the target, records ``(name, kwargs, CompiledKernel)`` and returns without running."""

    def __init__(self, kernel, arch: int, compiled: list):
        self.kernel, self.arch, self.compiled = kernel, arch, compiled

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = [p.name for p in self.kernel.params]
            bound = dict(zip(names, args, strict=False))
            bound.update({k: v for k, v in kwargs.items() if k in names})
            for p in self.kernel.params:  # defaults of parameters the launch left out
                if p.name not in bound and p.has_default:
                    bound[p.name] = p.default
            options = {k: kwargs[k] for k in _LAUNCH_OPTIONS if k in kwargs}
            out = compile_for(self.kernel, self.arch, bound, **options)
            self.compiled.append((self.kernel.fn.__name__, kwargs, out))
            return out

        return launch


@contextlib.contextmanager
def launches_compile_only(module, arch: int = 90) -> Iterator[list]:
    """Within the block, every launch of a ``@triton.jit`` kernel that ``module`` (a host module
    such as ``lora_linear``) holds as a global compiles for ``sm_<arch>`` and returns without
    running. Yields the list that collects ``(kernel name, launch kwargs, CompiledKernel)``."""
    if INTERPRET:
        raise RuntimeError("compile-only launches need TRITON_INTERPRET unset (the interpreter never compiles)")
    compiled: list = []
    kernels = {name: k for name, k in vars(module).items() if isinstance(k, triton.JITFunction)}
    for name, k in kernels.items():
        setattr(module, name, _CompileOnlyKernel(k, arch, compiled))
    try:
        yield compiled
    finally:
        for name, k in kernels.items():
            setattr(module, name, k)
