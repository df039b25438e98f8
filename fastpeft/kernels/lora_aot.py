"""Compile the adapter_linear kernels for a CUDA architecture on a machine without a GPU.

The Triton interpreter checks what the kernels compute, not whether they compile: constexpr
branches, loop-carried types, shared memory and register pressure only show when Triton lowers
them for a real target. Triton's compiler and ``ptxas`` need no GPU, only a target: this module
runs the real host code (plans, arguments, specialisation) of ``lora_linear`` on CPU tensors
with its kernels swapped for compile-only stand-ins (:mod:`fastpeft.kernels._compile_only`:
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, Triton's public API,
specialized as a launch with those arguments would be), and reads each cubin's registers,
spill stack and shared memory with ``cuobjdump``.

    python -m fastpeft.kernels.lora_aot            # the sweep below, sm_90 (H100/H200)
    python -m fastpeft.kernels.lora_aot --arch 80  # A100

It must run in a process where ``TRITON_INTERPRET`` is unset (the tests start one). Exit
status 1 when a kernel fails to compile, needs more shared memory than the architecture has,
or (16-bit activations) spills registers.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from ._compile_only import launches_compile_only
from ._interpret import INTERPRET

# bytes of shared memory one block may use, per architecture (sm_80: 163 KB, sm_90: 227 KB)
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

# (M, K, N, R, S, J, per_row_slots, dora, x dtype, adapter dtype): decode, mixed decode, fused
# GEMM, per-row shrink ("preshrunk"), split path, fp32 activations, large ranks.
SWEEP = [
    (1, 4096, 4096, 16, 1, 1, False, False, torch.bfloat16, torch.float32),  # decode, one launch
    (4, 4096, 4096, 16, 2, 1, True, True, torch.bfloat16, torch.float32),  # decode, per-row slots, DoRA
    (4, 4096, 4096, 16, 4, 1, True, True, torch.bfloat16, torch.float32),  # preshrunk (shrink kernel)
    (1, 4096, 14336, 256, 1, 1, False, False, torch.float16, torch.float16),  # preshrunk, rank 256
    (64, 4096, 4096, 16, 1, 1, False, False, torch.bfloat16, torch.float32),  # fused GEMM tile
    (32, 4096, 4096, 16, 2, 1, True, True, torch.float16, torch.float32),  # fused GEMM, per-row slots, DoRA
    (128, 4096, 4096, 64, 1, 1, False, False, torch.bfloat16, torch.float32),  # preshrunk, GEMM tile
    (64, 4096, 4096, 32, 64, 2, True, False, torch.bfloat16, torch.float32),  # 64 distinct adapters
    (300, 4096, 4096, 16, 4, 1, True, True, torch.bfloat16, torch.float32),  # split, shrink inside
    (1024, 4096, 4096, 16, 4, 1, True, True, torch.bfloat16, torch.float32),  # split, shrink kernel first
    (1024, 4096, 4096, 128, 2, 2, False, False, torch.float16, torch.float32),  # split, J*RP = 256
    (8, 4096, 4096, 16, 2, 1, True, False, torch.float32, torch.float32),  # fp32 ("ieee") decode
]
QUICK = [SWEEP[i] for i in (0, 1, 2, 4, 5, 7, 8, 9)]


@contextlib.contextmanager
def compile_only(arch: int = 90):
    """Within the block, ``lora_linear``'s kernel launches compile for ``sm_<arch>`` and return
    without running. Yields the list that collects ``(kernel name, launch kwargs, CompiledKernel)``."""
    from . import lora_linear as LL

    with launches_compile_only(LL, arch) as compiled:
        yield compiled


def resource_usage(kernel) -> dict:
    """Registers, spill stack and shared memory of a compiled kernel (via ``cuobjdump``)."""
    import triton

    usage = {"shared": kernel.metadata.shared, "regs": None, "stack": None}
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool) or "cubin" not in kernel.asm:
        return usage
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, timeout=60).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    if m:
        usage["regs"], usage["stack"] = int(m.group(1)), int(m.group(2))
    return usage


def compile_case(M, K, N, R, S, J, per_row, dora, xdt, ldt, compiled, path=None):
    """Run adapter_linear's host code on CPU tensors of this case (launches compile only)."""
    from . import lora_linear as LL
    from . import lora_plan as LP

    x = torch.zeros(M, K, dtype=xdt)
    w = torch.zeros(N, K, dtype=xdt)
    a = torch.zeros(S, R, K, dtype=ldt)
    b = torch.zeros(S, R, N, dtype=ldt)
    sc = torch.ones(S)
    ts = torch.zeros(M if per_row else 1, J, dtype=torch.int32)
    d = torch.ones(S, N, dtype=ldt) if dora else None
    with LP.override(path=path):
        LL.adapter_linear(x, w, None, a, b, sc, ts, d, None, None)
        plan = next(iter(LP._plans.values()))
    out = []
    for name, kwargs, kernel in compiled:
        out.append(dict(kernel=name, path=plan.path, **{k: kwargs.get(k) for k in ("BM", "BN", "BK", "num_warps", "num_stages")},
                        **resource_usage(kernel)))
    compiled.clear()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 = A100, 90 = H100/H200)")
    p.add_argument("--quick", action="store_true", help="a smaller sweep (the tests)")
    args = p.parse_args(argv)
    limit = SMEM_LIMIT.get(args.arch, 101376)
    failures = []
    if INTERPRET:
        raise SystemExit("TRITON_INTERPRET is set: the interpreter never compiles; run in a fresh process without it")
    with compile_only(args.arch) as compiled:
        for case in QUICK if args.quick else SWEEP:
            t0 = time.time()
            M, K, N, R, S, J, per_row, dora, xdt, ldt = case
            label = (f"M={M} K={K} N={N} R={R} S={S} J={J} {'rows' if per_row else 'bcast'}{' dora' if dora else ''} "
                     f"{str(xdt)[6:]}/{str(ldt)[6:]}")
            try:
                rows = compile_case(*case, compiled)
            except Exception as e:  # a compile error is the finding
                failures.append(f"{label}: {type(e).__name__}: {str(e)[:400]}")
                print(f"FAIL {label}: {type(e).__name__}: {str(e)[:400]}", flush=True)
                continue
            for r in rows:
                bad = []
                if r["shared"] > limit:
                    bad.append(f"shared {r['shared']} > {limit}")
                if r["stack"] and xdt != torch.float32:
                    bad.append(f"spills {r['stack']} bytes")
                status = "FAIL" if bad else "ok  "
                print(f"{status} {label:58s} {r['kernel']:22s} {r['path']:9s} BM={r['BM']} BN={r['BN']} BK={r['BK']} "
                      f"warps={r['num_warps']} stages={r['num_stages']} smem={r['shared']} regs={r['regs']} "
                      f"stack={r['stack']} ({time.time() - t0:.1f}s) {'; '.join(bad)}", flush=True)
                if bad:
                    failures.append(f"{label} {r['kernel']}: {'; '.join(bad)}")
    if failures:
        print("\n".join(["", "FAILURES:"] + failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
