"""The quantized-base operators: reference semantics, opcheck, and the Triton kernels vs the reference.

``adapter_linear_4bit`` / ``adapter_linear_8bit`` must equal ``adapter_linear`` on the
dequantized weight. The Triton kernels (interpreter on CPU, see tests/conftest.py) are compared
with the reference through tests/tolerance.py: error vs an fp64 evaluation at most ~2x the error
of the plain same-dtype reference.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # normally done by tests/conftest.py; harmless twice
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastpeft.ops as ops  # noqa: E402
from fastpeft.ops import reference as ref  # noqa: E402
from fastpeft.quant import formats as F  # noqa: E402

from marks import interpreted  # noqa: E402
from tolerance import assert_close_to_ref  # noqa: E402

HAS_TRITON = "triton" in ops.available_backends()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason=f"triton: {ops.available_backends(verbose=True).get('triton')}")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def dev(request):
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def triton_backend():
    prev = ops.get_backend()
    ops.set_backend("triton")
    yield
    ops.set_backend(prev)


@pytest.fixture
def knobs():
    """Force a path / split-K of the quantized kernels for one test."""
    from fastpeft.kernels import quant_linear as QL

    saved = (QL.FORCE_PATH, QL.FORCE_SPLIT_K)
    yield QL
    QL.FORCE_PATH, QL.FORCE_SPLIT_K = saved


class Case:
    """One operator call: a quantized weight plus adapter_linear's other arguments."""

    def __init__(self, dev, M, K, N, *, fmt=4, quant_type="nf4", nested=True, dtype=torch.float16, lora_dtype=None,
                 compute_dtype=None, S=3, R=16, J=1, mixed=True, slots=None, bias=True, dora=False, ins=None,
                 outs=None, lora=True, blocksize=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.dtype, self.fmt = dtype, fmt
        ldt = lora_dtype or dtype
        rn = lambda *s, sc=1.0: torch.randn(*s, generator=g) * sc  # noqa: E731
        w = rn(N, K, sc=K ** -0.5)
        self.x = rn(M, K).to(dtype).to(dev)
        self.cd = compute_dtype or dtype
        if fmt == 4:
            p, st = F.quantize_4bit(w, quant_type, blocksize, nested)
            st = st.to(dev)
            self.w = F.dequantize_4bit(p.to(dev), st, self.cd)
            s2 = st.state2
            self.qargs = (p.to(dev), st.absmax, st.code, None if s2 is None else s2.absmax, None if s2 is None else s2.code,
                          st.offset if s2 is not None else None, N, blocksize, 256, compute_dtype)
            self.op = torch.ops.fastpeft.adapter_linear_4bit
        else:
            cb, scb = F.quantize_8bit_rowwise(w)
            self.w = F.dequantize_8bit(cb, scb, dtype).to(dev)
            self.qargs = (cb.to(dev), scb.to(dev))
            self.op = torch.ops.fastpeft.adapter_linear_8bit
        self.bias = rn(N).to(dtype).to(dev) if bias else None
        a = b = sc = ts = ds = None
        if lora:
            a = rn(S, R, K, sc=K ** -0.5).to(ldt).to(dev)
            b = rn(S, R, N, sc=0.5).to(ldt).to(dev)
            if R > 3:  # padded rank: the last rows of one slot are zero
                a[1, R - 3:] = 0
                b[1, R - 3:] = 0
            sc = (torch.rand(S, generator=g) + 0.25).float().to(dev)
            if slots is not None:
                ts = torch.tensor(slots, dtype=torch.int32).reshape(-1, J)
            elif mixed:
                ts = torch.randint(-1, S, (M, J), generator=g, dtype=torch.int32)
            else:
                ts = torch.randint(0, S, (1, J), generator=g, dtype=torch.int32)
            ts = ts.to(dev)
            if dora:
                ds = (torch.rand(S, N, generator=g) + 0.5).to(ldt).to(dev)
        ins_t = None if ins is None else (torch.rand(*((K,) if ins == "k" else (M, K)), generator=g) + 0.5).to(dtype).to(dev)
        outs_t = None if outs is None else (torch.rand(*((N,) if outs == "n" else (M, N)), generator=g) + 0.5).to(dtype).to(dev)
        self.rest = (a, b, sc, ts, ds, ins_t, outs_t)

    def args(self):
        return (self.x, *self.qargs, self.bias, *self.rest)

    def run(self, backend):
        prev = ops.get_backend()
        ops.set_backend(backend)
        try:
            return self.op(*self.args())
        finally:
            ops.set_backend(prev)

    def exact(self):
        """fp64 evaluation of the semantics (weight and, for the base, x rounded to the compute dtype)."""
        a, b, sc, ts, ds, ins, outs = self.rest
        d = lambda t: None if t is None else t.double()  # noqa: E731
        bias_cd = None if self.bias is None else self.bias.to(self.cd)
        if self.cd == self.dtype:
            return ref.adapter_linear(self.x.double(), self.w.double(), d(bias_cd), d(a), d(b), d(sc), ts, d(ds), d(ins), d(outs))
        assert ins is None and outs is None and ds is None
        y = torch.nn.functional.linear(self.x.to(self.cd).double(), self.w.double(), d(bias_cd))
        return ref.apply_adapters(y, self.x.double(), None, d(a), d(b), d(sc), ts, None)


# ---- reference semantics ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt,nested", [(4, False), (4, True), (8, False)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_equals_dequantize_then_adapter_linear(dev, fmt, nested, dtype):
    c = Case(dev, 5, 128, 77, fmt=fmt, nested=nested, dtype=dtype, dora=True, ins="k", outs="n")
    got = c.run("torch")
    want = ref.adapter_linear(c.x, c.w, c.bias, *c.rest)
    assert got.dtype == dtype and got.shape == (5, 77)
    assert torch.equal(got, want)


def test_reference_compute_dtype_follows_bnb(dev):
    # x float32 on a bfloat16-compute 4-bit layer: base in bf16, cast back, adapters from fp32 x
    c = Case(dev, 4, 128, 64, dtype=torch.float32, compute_dtype=torch.bfloat16, lora_dtype=torch.float32)
    got = c.run("torch")
    a, b, sc, ts, *_ = c.rest
    y = torch.nn.functional.linear(c.x.to(torch.bfloat16), c.w, c.bias.to(torch.bfloat16)).float()
    want = ref.apply_adapters(y, c.x, None, a, b, sc, ts, None)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("fmt", [4, 8])
def test_opcheck(dev, fmt):
    c = Case(dev, 3, 64, 48, fmt=fmt, dtype=torch.float32, S=2, R=4, dora=True)
    x, *rest = c.args()
    x = x.clone().requires_grad_(True)
    torch.library.opcheck(c.op, (x, *rest))


def test_backward_matches_dequantized_reference(dev):
    c = Case(dev, 4, 64, 48, dtype=torch.float32, S=2, R=4, mixed=False, dora=True, ins="k")
    a, b, sc, ts, ds, ins, outs = c.rest
    x1, a1, b1 = (t.clone().requires_grad_(True) for t in (c.x, a, b))
    y1 = c.op(x1, *c.qargs, c.bias, a1, b1, sc, ts, ds, ins, outs)
    x2, a2, b2 = (t.clone().requires_grad_(True) for t in (c.x, a, b))
    y2 = ref.adapter_linear(x2, c.w, c.bias, a2, b2, sc, ts, ds, ins, outs)
    g = torch.randn_like(y1)
    for t1, t2 in zip(torch.autograd.grad(y1, (x1, a1, b1), g), torch.autograd.grad(y2, (x2, a2, b2), g), strict=True):
        torch.testing.assert_close(t1, t2)


# ---- Triton kernels vs reference -----------------------------------------------------------


def _check(c, name):
    out = c.run("triton")
    plain = c.run("torch")
    assert out.dtype == plain.dtype and out.shape == plain.shape
    assert_close_to_ref(out, plain, c.exact(), name)


@interpreted
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False), ("nf4", False), ("fp4", True)])
def test_triton_4bit_decode_mixed(dev, dtype, quant_type, nested):
    c = Case(dev, 5, 128, 77, quant_type=quant_type, nested=nested, dtype=dtype, R=16)
    _check(c, f"4bit {quant_type} nested={nested} {dtype}")


@interpreted
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_8bit_decode_mixed(dev, dtype):
    c = Case(dev, 5, 128, 77, fmt=8, dtype=dtype, R=16)
    _check(c, f"8bit {dtype}")


@interpreted
@needs_triton
@pytest.mark.parametrize("fmt", [4, 8])
@pytest.mark.parametrize("shape", [(1, 64, 40), (7, 75, 40), (3, 63, 33), (20, 192, 130)])
def test_triton_odd_shapes_rank1(dev, fmt, shape):
    # K odd (nibbles straddle rows), N*K odd (padded last byte), M above the decode tile
    M, K, N = shape
    c = Case(dev, M, K, N, fmt=fmt, dtype=torch.float16, R=1, S=2, mixed=False, lora_dtype=torch.float32)
    _check(c, f"fmt={fmt} {shape}")


@interpreted
@needs_triton
@pytest.mark.parametrize("fmt", [4, 8])
def test_triton_epilogue_dora_ia3_multi(dev, fmt):
    # two adapters per row (one -1), DoRA, IA3 on both sides, bf16 x with fp32 adapters
    slots = [[0, 2], [1, -1], [-1, -1], [2, 0], [1, 1]]
    c = Case(dev, 5, 128, 72, fmt=fmt, dtype=torch.bfloat16, lora_dtype=torch.float32, J=2, slots=slots,
             dora=True, ins="mk", outs="mn", R=8)
    _check(c, f"fmt={fmt} dora ia3 J=2")
    c = Case(dev, 5, 128, 72, fmt=fmt, dtype=torch.float16, J=2, slots=[[2, 0]], dora=True, ins="k", outs="n", R=8)
    _check(c, f"fmt={fmt} dora broadcast J=2")


@interpreted
@needs_triton
@pytest.mark.parametrize("M,K,N,blocksize", [(3, 128, 40, 32), (20, 256, 48, 256), (4, 100, 40, 64), (2, 512, 24, 128)])
def test_triton_4bit_blocksizes(dev, M, K, N, blocksize):
    # several blocks per K step, several K steps per block, and blocks that straddle rows
    c = Case(dev, M, K, N, blocksize=blocksize, nested=True, dtype=torch.float16, R=4, mixed=False)
    _check(c, f"blocksize={blocksize} K={K}")


@interpreted
@needs_triton
def test_triton_backend_is_the_triton_kernel(dev, triton_backend):
    from fastpeft.ops import backends, triton_quant

    assert backends.resolve("adapter_linear_4bit", dev.type) is triton_quant.adapter_linear_4bit
    assert backends.resolve("adapter_linear_8bit", dev.type) is triton_quant.adapter_linear_8bit


@interpreted
@needs_triton
def test_triton_ia3_only_no_bias(dev):
    c = Case(dev, 6, 128, 64, dtype=torch.float32, lora=False, bias=False, ins="k", outs="mn")
    _check(c, "ia3 only")


@interpreted
@needs_triton
def test_triton_compute_dtype_differs_from_x(dev):
    c = Case(dev, 4, 128, 64, dtype=torch.float32, compute_dtype=torch.bfloat16, lora_dtype=torch.float32)
    _check(c, "fp32 x, bf16 compute")


@interpreted
@needs_triton
@pytest.mark.parametrize("path,split", [("fused", 3), ("base_fused", 1), ("dequant", 1)])
@pytest.mark.parametrize("fmt", [4, 8])
def test_triton_paths_and_split_k(dev, knobs, fmt, path, split):
    knobs.FORCE_PATH, knobs.FORCE_SPLIT_K = path, split
    c = Case(dev, 9, 256, 80, fmt=fmt, dtype=torch.float16, lora_dtype=torch.float32, J=2, dora=True, ins="k", R=4)
    _check(c, f"{path} split={split}")


@interpreted
@needs_triton
def test_triton_prefill_rows(dev, knobs):
    # more rows than the decode tile, fused GEMM tiling, and the same shape through the dequant path
    c = Case(dev, 70, 128, 48, dtype=torch.bfloat16, R=16, S=2)
    knobs.FORCE_PATH = "fused"
    _check(c, "fused M=70")
    knobs.FORCE_PATH = None
    from fastpeft.kernels import quant_linear as QL

    assert QL.plan_path(QL.PREFILL_MIN_ROWS, 16) == "dequant" and QL.plan_path(1, 16) == "fused"
    assert QL.plan_path(1, 2 * QL.MAX_FUSED_COLS_DECODE) == "base_fused"
    assert QL.plan_path(32, 2 * QL.MAX_FUSED_COLS) == "base_fused" and QL.plan_path(32, QL.MAX_FUSED_COLS) == "fused"


@interpreted
@needs_triton
def test_triton_dequantize_kernel_exact(dev):
    from fastpeft.kernels import quant_linear as QL

    for nested in (False, True):
        w = torch.randn(33, 63) * 0.1
        p, st = F.quantize_4bit(w, "fp4", 64, nested)
        st = st.to(dev)
        s2 = st.state2
        got = QL.dequantize_4bit_triton(p.to(dev), st.absmax, st.code, None if s2 is None else s2.absmax,
                                        None if s2 is None else s2.code, st.offset if s2 else None, 33, 63, 64, 256,
                                        torch.float32)
        want = F.dequantize_4bit(p.to(dev), st, torch.float32)
        torch.testing.assert_close(got, want, rtol=2e-7, atol=0)  # an FMA may round the nested absmax once


@interpreted
@needs_triton
def test_triton_rejects_bad_shapes(dev, triton_backend):
    c = Case(dev, 3, 64, 48, dtype=torch.float32, lora=False)
    x, p, *rest = c.args()
    with pytest.raises(ValueError, match="bytes"):
        c.op(x, p[:-1], *rest)
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        c.op(x[None], p, *rest)


# ---- the kernels compile for real GPUs (no GPU needed: Triton ships ptxas) -------------------

_COMPILE_SCRIPT = r"""
import sys
import torch
import triton.language as tl
from fastpeft.kernels import quant_linear as QL
from fastpeft.kernels._compile_only import compile_for

fmt, dt, mixed = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
tdt, tld = {"bf16": (torch.bfloat16, tl.bfloat16), "fp16": (torch.float16, tl.float16)}[dt]
const = dict(BLOCKSIZE=64, NBLOCKSIZE=256, FMT=fmt, NESTED=fmt == 4, EVEN_K=True, ALIGNED=fmt == 4, HAS_BIAS=True,
             HAS_LORA=True, MIXED=mixed, J=2, HAS_DORA=True, HAS_INS=True, HAS_OUTS=True, CD=tld, LD=tld,
             SPLIT_K=2, BM=16, BN=64, BK=64, CP=64, INTERP=False, IDX64=False)
u8, f32 = torch.uint8, torch.float32
ptrs = dict(x_ptr=tdt, w_ptr=u8 if fmt == 4 else torch.int8, absmax_ptr=u8 if fmt == 4 else f32, code_ptr=f32,
            nabsmax_ptr=f32, ncode_ptr=f32, noff_ptr=f32, bias_ptr=tdt, a_ptr=tdt, b_ptr=tdt, scale_ptr=f32,
            slots_ptr=torch.int32, dora_ptr=tdt, ins_ptr=tdt, outs_ptr=tdt, y_ptr=f32)
# a decode launch: strides and sizes as a [1, 4096] x [4096, 4096] call with rank-16 adapters would pass
ints = dict(sxm=4096, sxk=1, swn=4096, swk=1, sas=65536, sar=4096, sak=1, sbs=65536, sbr=4096, sbn=1, stm=2, stj=1,
            sds=4096, sdn=1, sim=0, sik=1, som=0, son=1, sym=4096, syn=1, M=1, N=4096, K=4096, R=16, C=64)
args = {**const, **{k: torch.empty(16, dtype=v) for k, v in ptrs.items()}, **ints}
out = compile_for(QL._quant_linear_kernel, 90, args, num_warps=8, num_stages=3)
assert out.asm.get("cubin"), "no cubin"
print("compiled", len(out.asm["cubin"]), "bytes of sm_90 code")
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above compile and run the kernels")
@pytest.mark.parametrize("fmt,dt,mixed", [(4, "bf16", True), (8, "fp16", False)])
def test_kernel_compiles_for_sm90(fmt, dt, mixed):
    """Compile the fused kernel for an H100 (sm_90) with Triton's bundled ptxas, in a subprocess
    without TRITON_INTERPRET: catches what the interpreter accepts but the compiler would not."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(fmt), dt, "1" if mixed else "0"], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("no ptxas in this Triton build")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled" in r.stdout
