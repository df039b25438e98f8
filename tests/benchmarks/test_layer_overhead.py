"""Per-layer eager cost that must not regress (pytest-benchmark).

In the normal run (``--benchmark-disable`` in pyproject.toml) each benchmark runs its function
once, so these are also plain tests of the outputs. ``bash scripts/bench_regress.sh`` times them
and compares with the saved baseline in ``bench/baselines/`` (``--save`` writes a new one).

* a ``LoraLinear`` (rank 16, fp32, 512 x 512) at M = 1 beside the bare ``nn.Linear`` (group m1):
  the fixed per-call overhead of the fused path;
* the same layer with 16 adapters and one adapter per row of a 16-row batch (group mixed16).
"""
import peft
import pytest
import torch
from torch import nn

import fastpeft

K = N = 512
RANK = 16
ADAPTERS = 16


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(K, N)

    def forward(self, x):
        return self.proj(x)


def _models(n_adapters):
    """(fastpeft model, peft model) with the same ``n_adapters`` random adapters a0, a1, ..."""
    def cfg():
        return dict(r=RANK, lora_alpha=2 * RANK, target_modules=["proj"], init_lora_weights=False)

    pm = peft.get_peft_model(_Holder(), peft.LoraConfig(**cfg()), adapter_name="a0")
    fm = fastpeft.get_peft_model(_Holder(), fastpeft.LoraConfig(**cfg()), adapter_name="a0")
    for i in range(1, n_adapters):
        pm.add_adapter(f"a{i}", peft.LoraConfig(**cfg()))
        fm.add_adapter(f"a{i}", fastpeft.LoraConfig(**cfg()))
    fm.load_state_dict(pm.state_dict())
    pm.set_adapter("a0")
    fm.set_adapter("a0")
    return fm.eval(), pm.eval()


@pytest.fixture(scope="module")
def single():
    return _models(1)


@pytest.fixture(scope="module")
def mixed():
    return _models(ADAPTERS)


@pytest.mark.benchmark(group="m1")
def test_nn_linear_m1(benchmark, single):
    base = single[0].base_model.model.proj.base_layer
    x = torch.randn(1, K)
    with torch.no_grad():
        y = benchmark(base, x)
    assert y.shape == (1, N)


@pytest.mark.benchmark(group="m1")
def test_lora_linear_m1(benchmark, single):
    fm, pm = single
    layer = fm.base_model.model.proj
    x = torch.randn(1, K)
    with torch.no_grad():
        y = benchmark(layer, x)
        torch.testing.assert_close(y, pm.base_model.model.proj(x), atol=1e-5, rtol=1e-5)


@pytest.mark.benchmark(group="mixed16")
def test_lora_linear_mixed_16_adapters(benchmark, mixed):
    fm, pm = mixed
    names = [f"a{i}" for i in range(ADAPTERS)]
    x = torch.randn(ADAPTERS, 1, K)

    def run():
        return fm(x, adapter_names=names)

    with torch.no_grad():
        y = benchmark(run)
        torch.testing.assert_close(y, pm(x, adapter_names=names), atol=1e-5, rtol=1e-5)
