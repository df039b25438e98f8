"""One per-dtype tolerance table for every kernel-vs-reference comparison.

The rule (DESIGN.md): a fused result's error against an fp64 reference may be at most about
twice the error of the plain PyTorch computation in the same dtype. ``assert_close_to_ref``
checks exactly that, with a floor of ``ATOL[dtype]`` for results that are near zero.
"""
import torch

# absolute floor per dtype: a few ulps at the magnitudes the tests use (|y| ~ 1..30)
ATOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1.5e-1, torch.float64: 1e-9}
RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float64: 1e-9}
# allowed ratio of (fused error vs fp64) over (plain PyTorch error vs fp64)
ERROR_RATIO = 2.0


def tol(dtype):
    return dict(atol=ATOL[dtype], rtol=RTOL[dtype])


def assert_close_to_ref(out, plain, exact, name=""):
    """``out``: backend result; ``plain``: reference in the same dtype; ``exact``: reference in fp64.

    Passes when max|out - exact| <= ERROR_RATIO * max|plain - exact| + ATOL[dtype].
    """
    dtype = out.dtype
    err = (out.double() - exact.double()).abs().max().item()
    base = (plain.double() - exact.double()).abs().max().item()
    limit = ERROR_RATIO * base + ATOL[dtype]
    assert err <= limit, f"{name}: error {err:.3g} vs fp64 exceeds {limit:.3g} (plain {dtype} error {base:.3g})"
