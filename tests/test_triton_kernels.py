"""The Triton backend of ``adapter_linear`` / ``adapter_embedding`` against the PyTorch reference.

Runs on CUDA tensors on a GPU machine and on CPU tensors in the Triton interpreter elsewhere
(tests/conftest.py sets TRITON_INTERPRET=1 before fastpeft is imported). Shapes are small and
odd (masked edges everywhere) so the whole file stays within the CI budget in the interpreter.
Tolerances: tests/tolerance.py (error vs fp64 at most ~2x the plain same-dtype computation's).
"""
import math

import pytest
import torch

import fastpeft.ops as ops
from fastpeft.ops import backends, reference

from marks import interpreted
from tolerance import assert_close_to_ref

HAS_CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.skipif(
        "triton" not in ops.available_backends(),
        reason=f"triton backend unavailable: {ops.available_backends(verbose=True).get('triton')}",
    ),
    interpreted,  # without a GPU every test here runs in the Triton interpreter
]

if "triton" in ops.available_backends():
    from fastpeft.kernels import lora_embedding as LE
    from fastpeft.kernels import lora_linear as LL
    from fastpeft.kernels import lora_plan as LP

PATHS = ["decode", "fused", "preshrunk", "split"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def triton_backend():
    prev = ops.get_backend()
    ops.set_backend("triton")
    yield
    ops.set_backend(prev)


def make_case(
    device, M, K, N, *, S=3, R=7, J=1, dtype=torch.float16, lora_dtype=None, bcast=False, bias=True,
    dora=False, ins=None, outs=None, w_t=False, slots=None, seed=0,
):
    """adapter_linear arguments. ins: None | "k" | "mk"; outs: None | "n" | "mn"; w_t: weight
    given as the transpose of a [K, N] tensor (non-contiguous, as Conv1D passes it)."""
    g = torch.Generator().manual_seed(seed)
    ldt = lora_dtype or (torch.float32 if dtype != torch.float32 else dtype)

    def rn(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    def ru(*shape, dt=dtype):
        return (torch.rand(*shape, generator=g) + 0.5).to(dt)

    x = rn(M, K)
    w = rn(K, N, scale=K**-0.5).t() if w_t else rn(N, K, scale=K**-0.5)
    b = rn(N) if bias else None
    a = rn(S, R, K, dt=ldt, scale=K**-0.5)
    bt = rn(S, R, N, dt=ldt, scale=0.5)
    sc = (torch.rand(S, generator=g) * 1.5 + 0.25).float()
    if slots is not None:
        ts = torch.tensor(slots, dtype=torch.int32).reshape(-1, J)
    elif bcast:
        ts = torch.tensor([[(1 + j) % S for j in range(J)]], dtype=torch.int32)
    else:
        ts = torch.randint(-1, S, (M, J), generator=g, dtype=torch.int32)
        ts[0, :] = -1  # a row with no adapter
        if M > 1:
            ts[1, 0] = S - 1
    d = ru(S, N, dt=ldt) if dora else None
    i = {None: None, "k": ru(K), "mk": ru(M, K)}[ins]
    o = {None: None, "n": ru(N), "mn": ru(M, N)}[outs]
    args = (x, w, b, a, bt, sc, ts, d, i, o)
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in args)


def _f64(args):
    return tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args)


def check(args, path=None, split_k=None, name="", split_shrink=None):
    """Run the op with the triton backend (optionally forcing a path) and compare."""
    with LP.override(path=path, split_k=split_k, split_shrink=split_shrink):
        out = torch.ops.fastpeft.adapter_linear(*args)
        if path is not None:
            assert [p.path for p in LP._plans.values()] == [path]
    x, w = args[0], args[1]
    assert out.shape == (x.shape[0], w.shape[0]) and out.dtype == x.dtype and out.device == x.device
    cpu = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in args)
    plain = reference.adapter_linear(*cpu)
    exact = reference.adapter_linear(*_f64(cpu))
    assert_close_to_ref(out.cpu(), plain, exact, name or str(path))
    return out


# ---- every path, every dtype, odd shapes ------------------------------------------------------


@pytest.mark.parametrize("path", PATHS + [None])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bcast", [False, True], ids=["mixed", "bcast"])
def test_paths_odd_shape(device, triton_backend, path, dtype, bcast):
    args = make_case(device, 5, 123, 77, dtype=dtype, bcast=bcast)
    check(args, path)


@pytest.mark.parametrize("rank", [1, 7, 16, 64])
@pytest.mark.parametrize("path", ["decode", "fused", "preshrunk", "split"])
def test_ranks(device, triton_backend, rank, path):
    # adapters in the activations' dtype (merged-style fp16 bank), 4 slots, -1 rows
    args = make_case(device, 9, 96, 40, S=4, R=rank, dtype=torch.float16, lora_dtype=torch.float16, seed=rank)
    check(args, path, name=f"r{rank}-{path}")


@pytest.mark.parametrize("path", [None, "decode", "split"])
def test_rank_256(device, triton_backend, path):
    args = make_case(device, 3, 40, 24, S=2, R=256, J=1, dtype=torch.bfloat16, seed=3)
    check(args, path, name=f"r256-{path}")


def test_rank_256_two_adapters_chunks_j(device, triton_backend):
    # J * RP = 512 > ADD_MAX_JRP: the split path launches once per adapter, keeping the DoRA base
    args = make_case(device, 4, 40, 24, S=3, R=256, J=2, dtype=torch.float16, dora=True, outs="n", seed=4)
    with LP.override():
        torch.ops.fastpeft.adapter_linear(*args)
        assert [p.path for p in LP._plans.values()] == ["split"]
    check(args, None)


# ---- several adapters per row, DoRA, IA3, bias ------------------------------------------------

VARIANTS = {
    "j2-ia3k-outn": dict(J=2, ins="k", outs="n", dora=False, bias=True),
    "j2-dora-ia3mk-outmn": dict(J=2, ins="mk", outs="mn", dora=True, bias=False),
    "j1-dora-bias": dict(J=1, dora=True, bias=True),
    "j3-nobias": dict(J=3, bias=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bcast", [False, True], ids=["mixed", "bcast"])
def test_multi_adapter_dora_ia3(device, triton_backend, variant, path, bcast):
    args = make_case(device, 6, 50, 33, S=4, R=5, dtype=torch.bfloat16, bcast=bcast, seed=7, **VARIANTS[variant])
    check(args, path, name=f"{variant}-{path}")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("bcast", [False, True], ids=["mixed", "bcast"])
def test_split_with_shrink_kernel(device, triton_backend, variant, bcast):
    # the prefill path with the shrink as its own kernel (x read once), then expand-only programs
    args = make_case(device, 40, 50, 150, S=4, R=5, dtype=torch.float16, bcast=bcast, seed=8, **VARIANTS[variant])
    check(args, "split", split_shrink="preshrunk", name=f"{variant}-split-preshrunk")
    with LP.override(path="split", split_shrink="preshrunk"):
        torch.ops.fastpeft.adapter_linear(*args)
        assert list(LP._plans.values())[0].xa_splits >= 1


@pytest.mark.parametrize("path", PATHS)
def test_dora_fp32(device, triton_backend, path):
    args = make_case(device, 7, 45, 30, S=3, R=8, J=2, dtype=torch.float32, dora=True, ins="k", outs="mn", seed=11)
    check(args, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_weight_transposed(device, triton_backend, path, dtype):
    args = make_case(device, 5, 64, 48, dtype=dtype, w_t=True, seed=5)
    assert not args[1].is_contiguous()
    check(args, path)


def test_lora_in_bf16(device, triton_backend):
    args = make_case(device, 5, 70, 50, dtype=torch.bfloat16, lora_dtype=torch.bfloat16, dora=True, seed=9)
    for path in ("decode", "split"):
        check(args, path)


# ---- split-K (decode) and grid edges ----------------------------------------------------------


@pytest.mark.parametrize("split_k", [2, 3, 4])
def test_split_k(device, triton_backend, split_k):
    # linearity across K slices: base, shrink/expand, DoRA's (g - 1) * base all split; bias,
    # IA3 out and the cast happen once, after the reduction
    args = make_case(device, 4, 300, 40, S=3, R=6, J=2, dtype=torch.float16, dora=True, ins="k", outs="n", seed=split_k)
    check(args, "decode", split_k=split_k)
    with LP.override(path="decode", split_k=split_k):
        torch.ops.fastpeft.adapter_linear(*args)
        assert list(LP._plans.values())[0].split_k == min(split_k, math.ceil(300 / 128))


def test_split_k_preshrunk_and_fused(device, triton_backend):
    args = make_case(device, 20, 200, 40, S=5, R=4, J=1, dtype=torch.float16, seed=13)
    check(args, "preshrunk", split_k=2)
    check(args, "fused", split_k=2)
    args = make_case(device, 20, 200, 40, S=5, R=4, J=1, dtype=torch.float16, bcast=True, seed=13)
    check(args, "fused", split_k=2)


def test_many_rows_several_tiles(device, triton_backend):
    # more rows than one tile in every path (auto: 300 rows -> split path)
    args = make_case(device, 300, 24, 20, S=6, R=3, J=1, dtype=torch.float16, seed=17)
    check(args, None)
    check(args, "fused")
    args = make_case(device, 70, 24, 150, S=6, R=3, J=1, dtype=torch.float16, seed=18)
    check(args, "preshrunk")


@pytest.mark.parametrize("path", PATHS)
def test_rows_without_adapter(device, triton_backend, path):
    M = 6
    args = make_case(device, M, 40, 30, S=2, R=4, J=2, dtype=torch.float16, slots=[-1] * (M * 2), dora=True)
    out = check(args, path)
    base = torch.nn.functional.linear(args[0].float(), args[1].float(), args[2].float())
    torch.testing.assert_close(out.float(), base, atol=2e-2, rtol=1e-2)
    args = make_case(device, M, 40, 30, S=2, R=4, J=1, dtype=torch.float16, slots=[-1], outs="n")
    check(args, path)


@pytest.mark.parametrize("path", ["decode", "fused", "split"])
def test_no_adapter(device, triton_backend, path):
    x, w, b, *_ = make_case(device, 5, 33, 21, dtype=torch.float16)
    ins = torch.rand(33, device=device).half() + 0.5
    outs = torch.rand(21, device=device).half() + 0.5
    check((x, w, b, None, None, None, None, None, ins, outs), path)
    check((x, w, None, None, None, None, None, None, None, None), path)
    empty = torch.empty(1, 0, dtype=torch.int32, device=device)
    a = torch.randn(2, 4, 33, device=device)
    bt = torch.randn(2, 4, 21, device=device)
    check((x, w, b, a, bt, torch.ones(2, device=device), empty, None, None, outs), path)


def test_zero_rows(device, triton_backend):
    x, w, b, a, bt, sc, _, *_ = make_case(device, 3, 16, 8)
    out = torch.ops.fastpeft.adapter_linear(x[:0], w, b, a, bt, sc, torch.zeros(0, 1, dtype=torch.int32, device=device),
                                            None, None, None)
    assert out.shape == (0, 8)


# ---- dispatcher -------------------------------------------------------------------------------


def test_dispatch_ranges():
    dev = torch.device("cpu")
    h, f32 = torch.float16, torch.float32

    def plan(M, R=16, J=1, bcast=True, S=1, N=4096, K=4096):
        return LP._make_plan(dev, M, N, K, h, h, f32, R, J, bcast, S, True, False, False, False, "highest")

    assert plan(1).path == "decode" and plan(16).path == "decode"
    assert plan(17).path == "fused" and plan(64).path == "fused"
    assert plan(LP.FUSED_MAX_ROWS + 1).path == "split" and plan(4096).path == "split"
    # A re-read by every output tile above MAX_AREREAD_FRACTION of W: shrink kernel first
    assert plan(1, R=64).path == "preshrunk"  # 64 fp32 columns per 128 bf16 weight columns: 1.0
    assert plan(LP.FUSED_MAX_ROWS).path == "preshrunk"  # 4 row tiles x 0.25
    assert plan(8, bcast=False, S=2).path == "decode"  # two adapters: shrink in the tile
    assert plan(64, bcast=False, S=64).path == "preshrunk"  # many: per-row-tile shrink kernel first
    assert plan(1, R=256, J=2).path == "split"  # J * RP too large for the fused tile
    # prefill: the x re-read of one-kernel shrink + expand is small at 300 rows, large at 4096
    assert plan(300).xa_splits == 0 and plan(4096).xa_splits >= 1
    p = plan(1)
    assert p.split_k > 1 and p.grid[0] * p.split_k >= LP.ASSUMED_SMS  # >= 1 wave (K slices >= 512)
    assert p.meta["PREC_L"] == LP.FP32_ADAPTER_PRECISION and p.meta["SHRINK"] == LP.SHRINK_SHARED_SLOTS == 1


def test_registration(device):
    prev = ops.get_backend()
    try:
        ops.set_backend("triton")
        assert backends.resolve("adapter_linear", device.type) is LL.adapter_linear
        assert backends.resolve("adapter_embedding", device.type) is LE.adapter_embedding
    finally:
        ops.set_backend(prev)


# ---- torch integration: opcheck, autograd, torch.compile, CUDA graphs --------------------------


def test_opcheck(device, triton_backend):
    for bcast in (False, True):
        args = make_case(device, 4, 24, 20, S=2, R=3, J=1, dtype=torch.float32, bcast=bcast, dora=not bcast, outs="n")
        torch.library.opcheck(torch.ops.fastpeft.adapter_linear.default, args)


def test_grad_matches_reference(device):
    args = make_case(device, 5, 24, 20, S=3, R=4, J=2, dtype=torch.float32, dora=True, ins="k", outs="n", seed=21)
    grads = {}
    prev = ops.get_backend()
    try:
        for name in ("torch", "triton"):
            ops.set_backend(name)
            leaves = [t.detach().clone().requires_grad_(True) if t is not None and t.is_floating_point() else t
                      for t in args]
            out = torch.ops.fastpeft.adapter_linear(*leaves)
            (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
            grads[name] = [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
    finally:
        ops.set_backend(prev)
    assert len(grads["torch"]) == len(grads["triton"]) == 9
    for gr, gt in zip(grads["torch"], grads["triton"], strict=True):
        torch.testing.assert_close(gt, gr, atol=1e-4, rtol=1e-4)


def test_compile_fullgraph(device, triton_backend):
    args = make_case(device, 5, 40, 24, S=3, R=4, J=1, dtype=torch.float32, outs="n", seed=23)

    def f(x, w, b, a, bt, sc, ts, d, i, o):
        y = torch.ops.fastpeft.adapter_linear(x, w, b, a, bt, sc, ts, d, i, o)
        return y * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    out = compiled(*args)
    torch.testing.assert_close(out, f(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu  # CUDA graphs
@pytest.mark.parametrize("path", PATHS)
def test_cuda_graph_capture(triton_backend, path):
    device = torch.device("cuda")
    args = make_case(device, 8, 256, 192, S=4, R=16, J=1, dtype=torch.bfloat16, dora=True, outs="n", seed=29)
    with LP.override(path=path, split_k=2 if path in ("decode", "preshrunk") else None):
        torch.ops.fastpeft.adapter_linear(*args)  # compile + plan outside the capture
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # no host synchronisation on the hot path
        try:
            torch.ops.fastpeft.adapter_linear(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = torch.ops.fastpeft.adapter_linear(*args)
        args[0].copy_(torch.randn_like(args[0]))
        args[6].copy_(torch.randint_like(args[6], -1, 4))
        graph.replay()
        torch.cuda.synchronize()
        want = torch.ops.fastpeft.adapter_linear(*args)
    torch.testing.assert_close(out, want)


# ---- adapter_embedding ------------------------------------------------------------------------


@pytest.mark.parametrize("bcast", [False, True], ids=["mixed", "bcast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_embedding(device, triton_backend, bcast, dtype):
    g = torch.Generator().manual_seed(31)
    V, D, S, R, M, J = 50, 300, 3, 5, 7, 2
    w = torch.randn(V, D, generator=g).to(dtype)
    a = torch.randn(S, R, V, generator=g)
    bt = torch.randn(S, R, D, generator=g)
    sc = torch.rand(S, generator=g) + 0.5
    ids = torch.randint(0, V, (M,), generator=g)
    ts = torch.tensor([[2, 0]], dtype=torch.int32) if bcast else torch.randint(-1, S, (M, J), generator=g, dtype=torch.int32)
    args = [t.to(device) for t in (ids, w, a, bt, sc, ts)]
    out = torch.ops.fastpeft.adapter_embedding(*args)
    plain = reference.adapter_embedding(*[t.cpu() for t in args])
    exact = reference.adapter_embedding(*_f64([t.cpu() for t in args]))
    assert out.dtype == dtype
    assert_close_to_ref(out.cpu(), plain, exact, "embedding")
    no_lora = torch.ops.fastpeft.adapter_embedding(args[0], args[1], None, None, None, None)
    torch.testing.assert_close(no_lora, args[1][args[0]])


# ---- the kernels compile for real GPUs (no GPU needed) ----------------------------------------


def _aot_tools_present():
    import os

    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.exists(os.path.join(bin_dir, "ptxas"))


@pytest.mark.skipif(not _aot_tools_present(), reason="triton's NVIDIA backend (ptxas) is not installed")
@pytest.mark.parametrize("arch", [90, 80])
def test_compiles_for_gpu(arch):
    """Lower every kernel path for sm_90 (H100/H200) and sm_80 (A100) with Triton's compiler and
    ptxas, in a fresh process without the interpreter: compile errors, shared memory over the
    limit and register spills (16-bit activations) fail here even on a CPU-only machine."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "fastpeft.kernels.lora_aot", "--arch", str(arch)] + (["--quick"] if arch != 90 else [])
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
