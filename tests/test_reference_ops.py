"""The pure-PyTorch operators against a naive fp64 loop; opcheck; the two mixed-batch paths."""
import pytest
import torch

import fastpeft  # noqa: F401
from fastpeft.ops import reference

from tolerance import assert_close_to_ref


def naive_linear(x, w, b, a, bt, sc, ts, dora, ins, outs):
    """Row-by-row fp64 loop of the adapter_linear contract."""
    x, w = x.double(), w.double()
    M = x.shape[0]
    xs = x * ins.double() if ins is not None else x
    base = xs @ w.t()
    y = base.clone()
    if b is not None:
        y += b.double()
    for m in range(M):
        row = ts[0] if ts.shape[0] == 1 else ts[m]
        for s in row.tolist():
            if s < 0:
                continue
            lora = (xs[m] @ a[s].double().t()) @ bt[s].double() * float(sc[s])
            if dora is None:
                y[m] += lora
            else:
                g = dora[s].double()
                y[m] += (g - 1) * base[m] + g * lora
    if outs is not None:
        y = y * outs.double()
    return y


def make(M, K, N, S, R, dtype, J=1, mixed=True, with_dora=False, ins=False, outs=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, w = r(M, K).to(dtype), (r(N, K) / K**0.5).to(dtype)
    b = r(N).to(dtype) if bias else None
    a, bt = (r(S, R, K) / K**0.5).to(dtype), (r(S, R, N) / R**0.5).to(dtype)
    sc = torch.rand(S, generator=g) + 0.5
    rows = M if mixed else 1
    ts = torch.randint(-1, S, (rows, J), generator=g, dtype=torch.int32)
    if not mixed:
        ts[0, 0] = 0
    dora = (torch.rand(S, N, generator=g) + 0.5).to(dtype) if with_dora else None
    isc = (torch.rand(K, generator=g) + 0.5).to(dtype) if ins else None
    osc = (torch.rand(N, generator=g) + 0.5).to(dtype) if outs else None
    return (x, w, b, a, bt, sc, ts, dora, isc, osc)


CASES = [
    dict(M=5, K=123, N=77, S=3, R=7),
    dict(M=1, K=64, N=33, S=1, R=1, mixed=False),
    dict(M=9, K=40, N=50, S=4, R=16, J=2),
    dict(M=6, K=31, N=29, S=2, R=8, with_dora=True),
    dict(M=4, K=32, N=16, S=2, R=4, ins=True, mixed=False),
    dict(M=4, K=32, N=16, S=2, R=4, outs=True, bias=True),
    dict(M=3, K=256, N=64, S=2, R=256, mixed=False, bias=False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_reference_linear_matches_naive(case, dtype):
    args = make(dtype=dtype, **CASES[case])
    out = reference.adapter_linear(*args)
    assert out.dtype == dtype and out.shape == (args[0].shape[0], args[1].shape[0])
    exact = naive_linear(*args)
    if dtype == torch.float32:
        err = (out.double() - exact).abs().max().item()
        assert err <= 1e-4 * max(1.0, exact.abs().max().item()), err
        return
    # low precision: at most ~2x the error of rounding the fp32 computation of the same inputs
    plain32 = reference.adapter_linear(*[t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in args])
    assert_close_to_ref(out, plain32.to(dtype), exact, name=f"case {case}")


def test_mixed_batch_segment_path_equals_gather_path(monkeypatch):
    args = make(M=12, K=48, N=40, S=5, R=8, dtype=torch.float32, J=2, seed=3)
    gathered = reference.adapter_linear(*args)
    monkeypatch.setattr(reference, "GATHER_LIMIT", 0)
    segmented = reference.adapter_linear(*args)
    torch.testing.assert_close(segmented, gathered, atol=1e-5, rtol=1e-5)


def test_lora_dtype_differs_from_input():
    x, w, b, a, bt, sc, ts, *_ = make(M=4, K=24, N=20, S=2, R=4, dtype=torch.bfloat16)
    out = reference.adapter_linear(x, w, b, a.float(), bt.float(), sc, ts, None, None, None)
    assert out.dtype == torch.bfloat16
    exact = naive_linear(x, w, b, a.float(), bt.float(), sc, ts, None, None, None)
    assert (out.double() - exact).abs().max() < 0.1


def test_opcheck_and_autograd():
    args = make(M=5, K=23, N=17, S=3, R=4, dtype=torch.float32, with_dora=True)
    torch.library.opcheck(torch.ops.fastpeft.adapter_linear.default, args)
    x, w, b, a, bt, sc, ts, dora, _, _ = args
    x = x.clone().requires_grad_(True)
    a = a.clone().requires_grad_(True)
    out = torch.ops.fastpeft.adapter_linear(x, w, b, a, bt, sc, ts, dora, None, None)
    out.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    a2 = a.detach().clone().requires_grad_(True)
    reference.adapter_linear(x2, w, b, a2, bt, sc, ts, dora, None, None).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(a.grad, a2.grad)


def test_embedding_op():
    g = torch.Generator().manual_seed(0)
    V, D, S, R, M = 50, 12, 3, 4, 9
    ids = torch.randint(0, V, (M,), generator=g)
    w = torch.randn(V, D, generator=g)
    a, bt = torch.randn(S, R, V, generator=g), torch.randn(S, R, D, generator=g)
    sc = torch.rand(S, generator=g)
    ts = torch.tensor([[0], [1], [-1], [2], [0], [1], [2], [-1], [0]], dtype=torch.int32)
    out = torch.ops.fastpeft.adapter_embedding(ids, w, a, bt, sc, ts)
    exp = w[ids].clone()
    for m in range(M):
        s = int(ts[m, 0])
        if s >= 0:
            exp[m] += (a[s][:, ids[m]] @ bt[s]) * sc[s]
    torch.testing.assert_close(out, exp)
    torch.library.opcheck(torch.ops.fastpeft.adapter_embedding.default, (ids, w, a, bt, sc, ts))


def test_backend_selection_errors():
    from fastpeft.ops import backends

    with pytest.raises(ValueError, match="unknown backend"):
        fastpeft.set_backend("nope")
    status = fastpeft.available_backends(verbose=True)
    assert status["torch"] is None
    for name, reason in status.items():
        if reason is not None:
            with pytest.raises(fastpeft.BackendUnavailableError, match=name):
                fastpeft.set_backend(name)
    assert fastpeft.get_backend() == "auto"
    fastpeft.set_backend("torch")
    try:
        assert backends.resolve("adapter_linear", "cpu") is reference.adapter_linear
    finally:
        fastpeft.set_backend("auto")
