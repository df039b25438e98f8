"""The compiled extension fastpeft._C: operators torch.ops.fastpeft.native_*.

Checks: opcheck on every operator, results against the PyTorch reference on random inputs
(odd shapes, ranks 1-256, mixed batches with -1 rows, J = 2, DoRA, IA3, dtypes), routing of
the routed operators through set_backend("cpp"), torch.compile, autograd, use from a C++
program, and that fastpeft imports without the extension. Runs on every device the
extension has kernels for (CPU always; CUDA when built with CUDA and a GPU is present).

Skipped, with the reason, when the extension is not built (build: pip install
--no-build-isolation -e .).
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastpeft import _ext
from fastpeft.ops import backends
from fastpeft.ops import reference as ref

from tolerance import assert_close_to_ref

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"fastpeft._C not usable: {_ext.error}")

if _ext.available():
    from fastpeft.ops import cpp as cpp_backend

REPO = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICES = ["cpu"] + (["cuda"] if _ext.has_cuda() and torch.cuda.is_available() else [])


def native(name):
    return getattr(torch.ops.fastpeft, name).default


# --------------------------------------------------------------------------- inputs
def make_linear(
    M=5,
    K=123,
    N=77,
    S=3,
    R=16,
    J=1,
    slots="mixed",
    dtype=torch.float32,
    lora_dtype=None,
    bias=True,
    dora=False,
    ia3_in=None,
    ia3_out=None,
    transposed=False,
    lora=True,
    seed=0,
    device="cpu",
):
    """Arguments of adapter_linear. slots: "mixed" (random, with -1 rows), "broadcast" ([1, J]),
    "none" ([[-1]]), "same" (every row the same slot, given as [M, J])."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    lora_dtype = lora_dtype or dtype
    x = rnd(M, K)
    w = rnd(K, N, scale=1 / math.sqrt(K)).t() if transposed else rnd(N, K, scale=1 / math.sqrt(K))
    b = rnd(N, scale=0.1) if bias else None
    a = bt = sc = ts = None
    if lora:
        a = rnd(S, R, K, scale=1 / math.sqrt(K))
        bt = rnd(S, R, N, scale=1 / math.sqrt(R))
        for s in range(S):  # adapters of different ranks padded to R (zero rows)
            r_s = max(1, R - 3 * s)
            a[s, r_s:] = 0
            bt[s, r_s:] = 0
        sc = torch.rand(S, generator=g) * 2 + 0.25
        if slots == "mixed":
            ts = torch.randint(-1, S, (M, J), generator=g)
            ts[0, 0] = -1
            if M > 2:
                ts[1, :] = -1
                ts[2, 0] = S - 1
        elif slots == "broadcast":
            ts = torch.randint(0, S, (1, J), generator=g)
        elif slots == "same":
            ts = torch.randint(0, S, (1, J), generator=g).expand(M, J).contiguous()
        elif slots == "none":
            ts = torch.full((1, J), -1)
        ts = ts.to(torch.int32)
    d = torch.rand(S, N, generator=g) + 0.5 if (dora and lora) else None
    si = None
    if ia3_in == "vec":
        si = torch.rand(K, generator=g) + 0.5
    elif ia3_in == "rows":
        si = torch.rand(M, K, generator=g) + 0.5
    so = None
    if ia3_out == "vec":
        so = torch.rand(N, generator=g) + 0.5
    elif ia3_out == "rows":
        so = torch.rand(M, N, generator=g) + 0.5

    def cast(t, dt):
        return None if t is None else t.to(device=device, dtype=dt)

    return (
        cast(x, dtype),
        cast(w, dtype),
        cast(b, dtype),
        cast(a, lora_dtype),
        cast(bt, lora_dtype),
        cast(sc, torch.float32),
        None if ts is None else ts.to(device),
        cast(d, dtype),
        cast(si, dtype),
        cast(so, dtype),
    )


def to_fp64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def check_against_reference(op_name, reference, args, name):
    out = native(op_name)(*args)
    plain = reference(*args)
    exact = reference(*to_fp64(args))
    assert out.shape == plain.shape and out.dtype == plain.dtype, (
        f"{name}: {out.shape} {out.dtype} vs {plain.shape} {plain.dtype}")
    assert out.is_contiguous()
    assert_close_to_ref(out, plain, exact, name)


# --------------------------------------------------------------------------- adapter_linear vs reference
LINEAR_CASES = {
    "broadcast-r16": dict(slots="broadcast"),
    "broadcast-r256": dict(slots="broadcast", R=256),
    "same-slot-rows": dict(slots="same"),
    "mixed-r1": dict(R=1),
    "mixed-r7": dict(R=7),
    "mixed-r16": dict(R=16),
    "mixed-r64": dict(R=64),
    "mixed-r256": dict(R=256, S=2),
    "no-adapter-slot": dict(slots="none"),
    "J2-mixed": dict(J=2),
    "J2-broadcast": dict(J=2, slots="broadcast"),
    "dora-broadcast": dict(dora=True, slots="broadcast"),
    "dora-mixed": dict(dora=True),
    "dora-mixed-nobias": dict(dora=True, bias=False),
    "dora-J2": dict(dora=True, J=2),
    "ia3-in-vec": dict(ia3_in="vec"),
    "ia3-in-rows": dict(ia3_in="rows"),
    "ia3-out-vec": dict(ia3_out="vec"),
    "ia3-out-rows-broadcast": dict(ia3_out="rows", slots="broadcast"),
    "ia3-only": dict(lora=False, ia3_in="vec", ia3_out="vec"),
    "base-only": dict(lora=False),
    "no-bias": dict(bias=False),
    "transposed-weight": dict(transposed=True),
    "single-row": dict(M=1),
    "large-mixed": dict(M=40, K=300, N=600),
    "large-broadcast-dora": dict(M=40, K=300, N=600, slots="broadcast", dora=True),
    # >= 16 rows on one adapter: the GEMM path (shrink GEMM + expand addmm_ into the output)
    "large-broadcast": dict(M=40, K=300, N=600, slots="broadcast"),
    "large-broadcast-J2-ia3": dict(M=24, slots="broadcast", J=2, ia3_in="vec", ia3_out="rows", bias=False),
    "large-same-slot-rows": dict(M=20, slots="same", J=2),
    "everything": dict(J=2, dora=True, ia3_in="rows", ia3_out="vec", transposed=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_adapter_linear_matches_reference(case, dtype, device):
    args = make_linear(dtype=dtype, device=device, **LINEAR_CASES[case])
    check_against_reference("native_adapter_linear", ref.adapter_linear, args, f"{case}/{dtype}/{device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slots", ["mixed", "broadcast"])
@pytest.mark.parametrize("dtype,lora_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                              (torch.float32, torch.bfloat16)], ids=str)
def test_adapter_linear_adapters_in_other_dtype(dtype, lora_dtype, slots, device):
    """The low-rank path runs in lora_a's dtype, the result is cast to x's dtype."""
    for dora in (False, True):
        args = make_linear(dtype=dtype, lora_dtype=lora_dtype, slots=slots, dora=dora, ia3_out="vec", device=device)
        check_against_reference("native_adapter_linear", ref.adapter_linear, args, f"{dtype}/{lora_dtype}/dora={dora}")


def test_adapter_linear_input_scale_changes_dtype():
    """x fp32 with bf16 weights: the reference casts x * input_scale to the weight's dtype."""
    args = list(make_linear(dtype=torch.bfloat16, ia3_in="vec", ia3_out="vec"))
    args[0] = args[0].float()
    args[8] = args[8].float()
    out = native("native_adapter_linear")(*args)
    assert out.dtype == torch.float32
    plain = ref.adapter_linear(*args)
    exact = ref.adapter_linear(*to_fp64(args))
    assert_close_to_ref(out.bfloat16(), plain.bfloat16(), exact, "x fp32, weight bf16")


def test_adapter_linear_float64():
    args = make_linear(dtype=torch.float64, J=2, dora=True, ia3_out="vec")
    torch.testing.assert_close(native("native_adapter_linear")(*args), ref.adapter_linear(*args))


def test_adapter_linear_int64_slots_and_noncontiguous_x():
    args = list(make_linear(M=7))
    args[6] = args[6].long()
    args[0] = torch.randn(7, 2 * 123)[:, ::2]
    torch.testing.assert_close(native("native_adapter_linear")(*args), ref.adapter_linear(*args), rtol=1e-4, atol=1e-4)


def test_adapter_linear_empty_batch():
    args = make_linear(M=0, slots="broadcast")
    out = native("native_adapter_linear")(*args)
    assert out.shape == (0, 77)


def test_adapter_linear_errors():
    op = native("native_adapter_linear")
    args = list(make_linear())
    with pytest.raises(RuntimeError, match=r"lora_a must be \[S, R, K\]"):
        bad = list(args)
        bad[3] = args[3][:, :, :-1]
        op(*bad)
    with pytest.raises(RuntimeError, match=r"lora_b must be \[S, R, N\]"):
        bad = list(args)
        bad[4] = args[4][:, :, :-1]
        op(*bad)
    with pytest.raises(RuntimeError, match="out of range for 3 adapter slots"):
        bad = list(args)
        bad[6] = torch.full_like(args[6], 3)
        op(*bad)
    with pytest.raises(RuntimeError, match=r"token_slots must be \[M, J\]"):
        bad = list(args)
        bad[6] = args[6][:2]
        op(*bad)
    with pytest.raises(RuntimeError, match=r"weight must be \[N, K\]"):
        bad = list(args)
        bad[1] = args[1][:, :-1]
        op(*bad)
    with pytest.raises(RuntimeError, match=r"dora_scale must be \[S, N\]"):
        bad = list(args)
        bad[7] = torch.ones(3, 5)
        op(*bad)


# --------------------------------------------------------------------------- embedding
def make_embedding(M=9, V=50, D=77, S=3, R=16, J=1, slots="mixed", dtype=torch.float32, lora_dtype=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    lora_dtype = lora_dtype or dtype
    ids = torch.randint(0, V, (M,), generator=g)
    w = torch.randn(V, D, generator=g)
    a = torch.randn(S, R, V, generator=g)
    bt = torch.randn(S, R, D, generator=g) / math.sqrt(R)
    sc = torch.rand(S, generator=g) + 0.25
    if slots == "mixed":
        ts = torch.randint(-1, S, (M, J), generator=g)
        ts[0] = -1
    else:
        ts = torch.randint(0, S, (1, J), generator=g)
    return (
        ids.to(device),
        w.to(device, dtype),
        a.to(device, lora_dtype),
        bt.to(device, lora_dtype),
        sc.to(device),
        ts.to(device, torch.int32),
    )


EMBEDDING_CASES = {
    "mixed-r16": dict(),
    "mixed-r1": dict(R=1),
    "mixed-r64-wide": dict(R=64, D=600),
    "broadcast": dict(slots="broadcast"),
    "J2": dict(J=2),
    "lora-fp32": dict(lora_dtype=torch.float32),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(EMBEDDING_CASES))
def test_adapter_embedding_matches_reference(case, dtype, device):
    args = make_embedding(dtype=dtype, device=device, **EMBEDDING_CASES[case])
    check_against_reference("native_adapter_embedding", ref.adapter_embedding, args, f"{case}/{dtype}")


def test_adapter_embedding_without_adapters_keeps_ids_shape():
    ids = torch.randint(0, 10, (2, 3))
    w = torch.randn(10, 4)
    out = native("native_adapter_embedding")(ids, w, None, None, None, None)
    torch.testing.assert_close(out, torch.nn.functional.embedding(ids, w))


def test_adapter_embedding_bad_id():
    args = list(make_embedding())
    args[0] = args[0].clone()
    args[0][3] = 50
    with pytest.raises(IndexError, match="out of range for 50 embeddings"):
        native("native_adapter_embedding")(*args)


# --------------------------------------------------------------------------- lora_shrink_expand
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["mixed-r16", "mixed-r256", "broadcast-J2", "lora-fp32", "large", "large-broadcast-J2"])
def test_lora_shrink_expand_matches_reference(case, dtype, device):
    kw = {
        "mixed-r16": dict(),
        "mixed-r256": dict(R=256, S=2),
        "broadcast-J2": dict(J=2, slots="broadcast"),
        "lora-fp32": dict(lora_dtype=torch.float32),
        "large": dict(M=40, K=300, N=600),
        "large-broadcast-J2": dict(M=40, K=300, N=600, J=2, slots="broadcast"),
    }[case]
    x, w, b, a, bt, sc, ts, *_ = make_linear(dtype=dtype, device=device, **kw)
    y = torch.randn(x.shape[0], w.shape[0], dtype=dtype, device=device)
    args = (y, x, a, bt, sc, ts)
    check_against_reference("native_lora_shrink_expand", cpp_backend.lora_shrink_expand_reference, args, case)
    out = native("native_lora_shrink_expand")(*args)
    assert out.data_ptr() != y.data_ptr()


# --------------------------------------------------------------------------- opcheck
def opcheck_samples():
    lin = [
        make_linear(),
        make_linear(dtype=torch.bfloat16, slots="broadcast", J=2),
        make_linear(dora=True, ia3_in="vec", ia3_out="rows", J=2),
        make_linear(lora=False, ia3_out="vec"),
        make_linear(dtype=torch.float16, lora_dtype=torch.float32, dora=True),
    ]
    emb = [make_embedding(), make_embedding(dtype=torch.bfloat16, slots="broadcast", J=2)]
    se = []
    for kw in (dict(), dict(dtype=torch.bfloat16, slots="broadcast")):
        x, w, b, a, bt, sc, ts, *_ = make_linear(**kw)
        se.append((torch.randn(x.shape[0], w.shape[0], dtype=x.dtype), x, a, bt, sc, ts))
    return [("native_adapter_linear", a) for a in lin] + [("native_adapter_embedding", a) for a in emb] + [
        ("native_lora_shrink_expand", a) for a in se
    ]


@pytest.mark.parametrize("i", range(len(opcheck_samples())))
def test_opcheck(i):
    name, args = opcheck_samples()[i]
    torch.library.opcheck(native(name), args)


def test_opcheck_with_grad():
    """opcheck's autograd checks (inputs that require grad)."""
    args = list(make_linear(J=2, dora=True, slots="broadcast"))
    for k in (0, 3, 4):
        args[k] = args[k].requires_grad_(True)
    torch.library.opcheck(
        native("native_adapter_linear"), tuple(args), test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
    )


def test_backward_matches_reference():
    args = list(make_linear(J=2, dora=True, ia3_out="vec"))
    leaves = (0, 1, 2, 3, 4, 7, 9)
    a1 = [t.clone().requires_grad_(True) if i in leaves else t for i, t in enumerate(args)]
    a2 = [t.clone().requires_grad_(True) if i in leaves else t for i, t in enumerate(args)]
    g = torch.randn(5, 77)
    (native("native_adapter_linear")(*a1) * g).sum().backward()
    (ref.adapter_linear(*a2) * g).sum().backward()
    for i in leaves:
        torch.testing.assert_close(a1[i].grad, a2[i].grad, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- routing + compile
@pytest.fixture
def cpp_backend_selected():
    before = backends.get_backend()
    backends.set_backend("cpp")
    try:
        yield
    finally:
        backends.set_backend(before)


def test_cpp_backend_registered():
    status = backends.available_backends(verbose=True)
    assert status["cpp"] is None
    assert backends._impls["adapter_linear"]["cpp"]["cpu"] is native("native_adapter_linear")
    assert backends._impls["adapter_embedding"]["cpp"]["cpu"] is native("native_adapter_embedding")


def test_set_backend_cpp_routes_adapter_linear(cpp_backend_selected):
    assert backends.resolve("adapter_linear", "cpu") is native("native_adapter_linear")
    args = make_linear(J=2, dora=True, ia3_out="vec")
    torch.testing.assert_close(torch.ops.fastpeft.adapter_linear(*args), native("native_adapter_linear")(*args), rtol=0, atol=0)
    eargs = make_embedding()
    torch.testing.assert_close(
        torch.ops.fastpeft.adapter_embedding(*eargs), native("native_adapter_embedding")(*eargs), rtol=0, atol=0
    )


def test_auto_prefers_cpp_on_cpu():
    before = backends.get_backend()
    backends.set_backend("auto")
    try:
        assert backends.resolve("adapter_linear", "cpu") is native("native_adapter_linear")
    finally:
        backends.set_backend(before)


def test_routed_op_trains_through_cpp(cpp_backend_selected):
    args = [t.clone().requires_grad_(True) if i in (3, 4) else t for i, t in enumerate(make_linear())]
    torch.ops.fastpeft.adapter_linear(*args).square().sum().backward()
    args2 = [t.clone().requires_grad_(True) if i in (3, 4) else t for i, t in enumerate(make_linear())]
    ref.adapter_linear(*args2).square().sum().backward()
    torch.testing.assert_close(args[3].grad, args2[3].grad, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_fullgraph(cpp_backend_selected):
    torch._dynamo.reset()

    def f(x, w, b, a, bt, sc, ts):
        h = torch.ops.fastpeft.native_adapter_linear(x, w, b, a, bt, sc, ts, None, None, None)
        h2 = torch.ops.fastpeft.adapter_linear(x, w, b, a, bt, sc, ts, None, None, None)  # routed to cpp
        return torch.relu(h) + h2

    args = make_linear()[:7]
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(*args), f(*args))
    # a second batch size re-uses or re-traces without graph breaks
    args2 = make_linear(M=9, seed=1)[:7]
    torch.testing.assert_close(compiled(*args2), f(*args2))


# --------------------------------------------------------------------------- C++ program
@pytest.mark.slow
def test_cpp_program_calls_native_op(tmp_path):
    """A C++ program linked against libtorch loads the library, calls
    fastpeft::native_adapter_linear through the dispatcher; the output matches the reference."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    torch_dir = Path(torch.__file__).parent
    exe = tmp_path / "call_native"
    t0 = time.perf_counter()
    build = subprocess.run(
        [
            cxx,
            "-std=c++20",
            "-O0",
            str(REPO / "csrc" / "examples" / "call_native_adapter_linear.cpp"),
            "-o",
            str(exe),
            f"-I{torch_dir / 'include'}",
            f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            f"-L{torch_dir / 'lib'}",
            "-ltorch_cpu",
            "-lc10",
            f"-Wl,-rpath,{torch_dir / 'lib'}",
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    build_s = time.perf_counter() - t0

    M, K, N, S, R, J = 6, 123, 77, 3, 16, 1
    args = make_linear(M=M, K=K, N=N, S=S, R=R, J=J)
    x, w, b, a, bt, sc, ts = args[:7]
    (tmp_path / "dims.txt").write_text(f"{M} {K} {N} {S} {R} {J}\n")
    for name, t in dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bt, slot_scales=sc, token_slots=ts).items():
        (tmp_path / f"{name}.bin").write_bytes(t.contiguous().numpy().tobytes())
    run = subprocess.run([str(exe), _ext.library_path(), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "fastpeft::native_adapter_linear(Tensor x, Tensor weight" in run.stdout
    out = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.float32).reshape(M, N)
    expect = ref.adapter_linear(*args)
    assert_close_to_ref(out, expect, ref.adapter_linear(*to_fp64(args)), "C++ program")
    # the self-check mode (no input files) passes too
    run = subprocess.run([str(exe), _ext.library_path()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    print(f"C++ program built in {build_s:.1f}s")


# --------------------------------------------------------------------------- import without the extension
@pytest.mark.slow
def test_import_without_extension_marks_backends_unavailable():
    code = (
        "import sys; sys.modules['fastpeft._C'] = None\n"
        "import fastpeft, fastpeft.ops as o\n"
        "st = o.available_backends(verbose=True)\n"
        "assert 'extension not built' in st['cpp'] and 'pip install --no-build-isolation -e .' in st['cpp'], st\n"
        "assert st['cuda'] is not None and st['torch'] is None\n"
        "try:\n"
        "    o.set_backend('cpp')\n"
        "except o.BackendUnavailableError as e:\n"
        "    assert 'extension not built' in str(e)\n"
        "else:\n"
        "    raise AssertionError('set_backend(cpp) should fail')\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


# --------------------------------------------------------------------------- CUDA only
needs_cuda = pytest.mark.skipif("cuda" not in DEVICES, reason="no CUDA device, or the extension was built without CUDA")


@pytest.mark.gpu
@needs_cuda
def test_cuda_backend_registered():
    assert backends.available_backends(verbose=True)["cuda"] is None
    before = backends.get_backend()
    backends.set_backend("cuda")
    try:
        assert backends.resolve("adapter_linear", "cuda") is native("native_adapter_linear")
    finally:
        backends.set_backend(before)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kw", [dict(M=64, J=2, dora=True), dict(M=128, slots="broadcast"), dict(M=3, ia3_out="vec")])
def test_cuda_ops_do_not_sync_with_host(kw):
    args = make_linear(device="cuda", dtype=torch.bfloat16, **kw)
    eargs = make_embedding(device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        native("native_adapter_linear")(*args)
        native("native_adapter_embedding")(*eargs)
        y = torch.zeros(args[0].shape[0], args[1].shape[0], device="cuda", dtype=torch.bfloat16)
        native("native_lora_shrink_expand")(y, *args[:1], *args[3:7])
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_capture():
    args = make_linear(M=16, device="cuda", dtype=torch.float16, J=2, dora=True)
    op = native("native_adapter_linear")
    expect = op(*args)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        op(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = op(*args)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expect)


@pytest.mark.gpu
@needs_cuda
def test_cuda_float64_falls_back_to_aten():
    args = make_linear(device="cuda", dtype=torch.float64, J=2, dora=True)
    torch.testing.assert_close(native("native_adapter_linear")(*args), ref.adapter_linear(*args))
