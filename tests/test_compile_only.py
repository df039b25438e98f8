"""Running the Triton kernels without a GPU: the interpreter flag (fastpeft/kernels/_interpret.py)
and compile-only launches through Triton's public API (fastpeft/kernels/_compile_only.py).

The flag is parsed without importing Triton, so it must agree with Triton's own reading; the
compile-only launches specialize the arguments themselves, so they must agree with Triton's
launcher (else an AOT report would describe another compile than a GPU launch makes).
"""
import os
import subprocess
import sys

import pytest
import torch

from fastpeft.kernels import _interpret

triton = pytest.importorskip("triton")


@pytest.mark.parametrize("value", ["1", "0", "", "true", "TRUE", "On", "yes", "y", "no", " 1", "2", "off"])
def test_interpreter_flag_is_read_as_triton_reads_it(monkeypatch, value):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _interpret.interpret_requested() == bool(triton.knobs.runtime.interpret)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not _interpret.interpret_requested() and not triton.knobs.runtime.interpret


def test_interpreter_flag_does_not_import_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys; from fastpeft.kernels import _interpret; _interpret.interpret_requested(); "
            "_interpret.cuda_usable(); print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_specialization_matches_triton_launcher():
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.compiler import make_backend

    from fastpeft.kernels import _compile_only as CO

    backend = make_backend(CO.target(90))
    buf = torch.zeros(64, dtype=torch.int32)
    values = [1, 0, 16, 17, -16, -3, 2**31 - 1, 2**31, 2**40 + 16, 2**63, 1.5, True, False, None,
              torch.zeros(3, dtype=torch.bfloat16), buf[1:], buf, torch.zeros(2, dtype=torch.uint8),
              torch.zeros(2, dtype=torch.float16)]
    for v in values:
        for specialize, align in ((True, True), (False, True), (True, False)):
            kind, const, div16 = CO._specialize(v, specialize, align)
            want_kind, want_attr = native(backend, v, False, specialize, align)
            assert kind == want_kind, (v, specialize, align)
            if kind == "constexpr":
                assert const == want_attr, v
            else:
                assert div16 == (want_attr == "D"), (v, specialize, align, want_attr)


_AOT = r"""
import torch
from fastpeft.kernels import _compile_only as CO
from fastpeft.kernels import lora_embedding as host  # a host module with a kernel global

kernel = host._embedding_kernel
V, D, S, R, M = 50, 300, 3, 5, 2
args = (torch.zeros(M, dtype=torch.int64), torch.zeros(V, D, dtype=torch.bfloat16), torch.zeros(S, R, V),
        torch.zeros(S, R, D), torch.ones(S), torch.zeros(M, 1, dtype=torch.int32))
with CO.launches_compile_only(host, 80) as compiled:
    host.adapter_embedding(*args)  # the real host code: strides, constexprs, grid
assert host._embedding_kernel is kernel  # restored
(name, kwargs, out), = compiled
assert name == "_embedding_kernel" and kwargs["BD"] == 256 and out.asm.get("cubin")
print("ok", out.metadata.num_warps)
"""


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                                    "ptxas")), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_compile_only_launch():
    """A launch inside launches_compile_only compiles for sm_80 (fresh process, no interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _AOT], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["ok", "4"]
