"""The eager fast path of LoRA linear layers (fastpeft.ops.fastpath): the plan a layer keeps
after a fused forward, in C++ (``fastpeft._fastpath.LinearPlan``, when built) or in Python
(``PyPlan``, any other backend).

Checks, for both kinds: a plan gives exactly the general path's output (and PEFT's within
fp32 tolerance), for one adapter and for mixed batches; it declines (returns None) when a
gradient is needed, when a parameter was replaced or the backend choice changed, and on a
wrongly shaped input (the layer then raises the general path's error); copies and pickles of a
layer that holds a plan work.
"""
from __future__ import annotations

import copy
import io
import pickle

import peft
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.ops import backends, fastpath

ATOL = 1e-5
K, N = 37, 29

BACKENDS = ["torch"] + (["cpp"] if "cpp" in backends.available_backends() else [])


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(K, N)
        self.o = nn.Linear(N, K, bias=False)

    def forward(self, x):
        return self.o(self.q(x))


CONFIGS = {"a": dict(r=4, lora_alpha=8, target_modules=["q", "o"]),
           "b": dict(r=7, lora_alpha=3, target_modules=["q", "o"])}


def _models(seed=0, configs=CONFIGS):
    """(peft model, fastpeft model) with the same adapters (default: ranks 4 and 7 on q and o),
    random non-zero weights, in eval mode with nothing trainable."""
    torch.manual_seed(seed)
    base = TwoLinear().eval()
    (first, kw0), *rest = configs.items()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw0), adapter_name=first)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**kw0), adapter_name=first)
    for name, kw in rest:
        pm.add_adapter(name, peft.LoraConfig(**kw))
        fm.add_adapter(name, fastpeft.LoraConfig(**kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    fm.load_state_dict(pm.state_dict())
    for m in (pm, fm):
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return pm, fm


def _layer(fm):
    return fm.base_model.model.q


@pytest.fixture(params=BACKENDS)
def backend(request):
    backends.set_backend(request.param)
    yield request.param
    backends.set_backend("auto")


def _expected_plan_type(backend):
    if backend == "cpp" and fastpath.module is not None:
        return fastpath.module.LinearPlan
    return fastpath.PyPlan


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2,)])
def test_plan_output_is_the_general_paths(backend, shape):
    pm, fm = _models()
    layer = _layer(fm)
    x = torch.randn(*shape, K)
    with torch.no_grad():
        first = layer(x)  # general path; builds the plan
        assert isinstance(layer.bank.plan, _expected_plan_type(backend))
        again = layer(x)  # through the plan
        direct = layer.bank.plan(x)
        peft_out = pm.base_model.model.q(x)
    assert again.shape == direct.shape == (*shape, N)
    assert torch.equal(again, first) and torch.equal(direct, first)
    torch.testing.assert_close(again, peft_out, atol=ATOL, rtol=1e-5)


def test_plans_survive_model_forwards(backend):
    """Nothing in a forward retires plans: the second and later forwards all use them."""
    _, fm = _models()
    x = torch.randn(2, 3, K)
    with torch.no_grad():
        fm(x)
        plans = [fm.base_model.model.q.bank.plan, fm.base_model.model.o.bank.plan]
        assert all(p is not None for p in plans)
        for _ in range(3):
            fm(x)
        assert [fm.base_model.model.q.bank.plan, fm.base_model.model.o.bank.plan] == plans
        assert all(p(torch.randn(1, p_in)) is not None for p, p_in in zip(plans, (K, N), strict=True))


def test_replaced_modules_and_assigned_state_dicts_are_seen(backend):
    pm, fm = _models()
    layer = _layer(fm)
    x = torch.randn(2, K)
    with torch.no_grad():
        layer(x)
        plan = layer.bank.plan
        nn.Linear(3, 3)  # registrations elsewhere leave the plan alone
        assert plan(x) is not None
        torch.manual_seed(5)
        new_a = nn.Linear(K, 4, bias=False)
        for m in (pm, fm):  # a new module in place of an adapter's A
            m.base_model.model.q.lora_A["a"] = copy.deepcopy(new_a).requires_grad_(False)
        assert plan(x) is None
        torch.testing.assert_close(layer(x), pm.base_model.model.q(x), atol=ATOL, rtol=1e-5)
        plan = layer.bank.plan
        state = {k: torch.randn_like(v) * 0.3 for k, v in pm.state_dict().items()}
        for m in (pm, fm):  # new Parameter objects, not copies into the old ones
            m.load_state_dict(state, assign=True)
            m.requires_grad_(False)
        assert plan(x) is None
        torch.testing.assert_close(fm(x), pm(x), atol=ATOL, rtol=1e-5)


def test_plan_follows_set_adapter_and_writes_in_place(backend):
    pm, fm = _models()
    x = torch.randn(4, K)
    with torch.no_grad():
        fm(x)
        fm.set_adapter("b")
        pm.set_adapter("b")
        for _ in range(2):
            torch.testing.assert_close(fm(x), pm(x), atol=ATOL, rtol=1e-5)
        for m in (pm, fm):  # an optimizer-like in-place update of an adapter and of the base
            m.base_model.model.q.lora_B["b"].weight.mul_(-2.0)
            m.base_model.model.q.base_layer.weight.add_(0.5)
        torch.testing.assert_close(fm(x), pm(x), atol=ATOL, rtol=1e-5)


def test_plan_declines_when_a_gradient_is_needed(backend):
    pm, fm = _models()
    layer = _layer(fm)
    x = torch.randn(3, K)
    with torch.no_grad():
        layer(x)
    plan = layer.bank.plan
    assert plan is not None
    xg = x.clone().requires_grad_(True)
    assert plan(xg) is None  # grad mode is on and x needs a gradient
    out = layer(xg)
    out.square().sum().backward()
    ref_x = x.clone().requires_grad_(True)
    pm.base_model.model.q(ref_x).square().sum().backward()
    torch.testing.assert_close(xg.grad, ref_x.grad, atol=ATOL, rtol=1e-5)
    # a trainable adapter parameter also declines the plan
    with torch.no_grad():
        layer(x)
    plan = layer.bank.plan
    layer.lora_A["a"].weight.requires_grad_(True)
    assert plan(x) is None
    with torch.no_grad():
        assert plan(x) is not None  # no_grad: nothing needs a gradient


def test_plan_declines_a_replaced_parameter(backend):
    pm, fm = _models()
    layer = _layer(fm)
    x = torch.randn(2, K)
    with torch.no_grad():
        layer(x)
        plan = layer.bank.plan
        new = torch.randn(N, 4) * 0.2
        for m in (pm, fm):
            m.base_model.model.q.lora_B["a"].weight = nn.Parameter(new.clone(), requires_grad=False)
        assert plan(x) is None
        torch.testing.assert_close(layer(x), pm.base_model.model.q(x), atol=ATOL, rtol=1e-5)
        new_w = torch.randn(N, K)
        for m in (pm, fm):
            m.base_model.model.q.base_layer.weight = nn.Parameter(new_w.clone(), requires_grad=False)
        torch.testing.assert_close(layer(x), pm.base_model.model.q(x), atol=ATOL, rtol=1e-5)


def test_backend_change_retires_plans():
    if "cpp" not in BACKENDS or fastpath.module is None:
        pytest.skip("needs the compiled extension and fastpeft._fastpath")
    pm, fm = _models()
    layer = _layer(fm)
    x = torch.randn(2, K)
    with torch.no_grad():
        layer(x)
        plan = layer.bank.plan
        assert isinstance(plan, fastpath.module.LinearPlan)
        try:
            backends.set_backend("torch")
            assert plan(x) is None  # made under another backend choice
            y = layer(x)
            assert isinstance(layer.bank.plan, fastpath.PyPlan)
        finally:
            backends.set_backend("auto")
        assert plan(x) is None  # stays retired
        torch.testing.assert_close(y, pm.base_model.model.q(x), atol=ATOL, rtol=1e-5)


def test_wrong_input_width_raises_like_the_general_path(backend):
    _, fm = _models()
    layer = _layer(fm)
    with torch.no_grad():
        layer(torch.randn(2, K))
        assert layer.bank.plan(torch.randn(2, K + 1)) is None
        with pytest.raises(RuntimeError):
            layer(torch.randn(2, K + 1))
        torch.testing.assert_close(layer(torch.randn(2, K)).shape, torch.Size([2, N]))


def test_mixed_batch_plans(backend):
    pm, fm = _models()
    names = ["b", "__base__", "a", "b"]
    x = torch.randn(4, 3, K)
    with torch.no_grad():
        expected = pm(x, adapter_names=names)
        for _ in range(3):  # first call builds the mixed plan, the next ones use it
            torch.testing.assert_close(fm(x, adapter_names=names), expected, atol=ATOL, rtol=1e-5)
        assert _layer(fm).bank.mixed_plans
        with fastpeft.mixed_batch(fm, names[:2]):
            torch.testing.assert_close(fm(x[:2]), pm(x[:2], adapter_names=names[:2]), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(fm(x), pm(x), atol=ATOL, rtol=1e-5)  # back to the active adapter


def test_copy_and_pickle_of_a_layer_holding_a_plan(backend):
    pm, fm = _models()
    x = torch.randn(3, K)
    with torch.no_grad():
        y = fm(x)
        assert _layer(fm).bank.plan is not None
        clone = copy.deepcopy(fm)
        assert _layer(clone).bank.plan is None
        torch.testing.assert_close(clone(x), y, atol=0, rtol=0)
        buf = io.BytesIO()
        torch.save(fm, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        torch.testing.assert_close(loaded(x), y, atol=0, rtol=0)
        assert pickle.loads(pickle.dumps(_layer(fm)))(x).shape == (3, N)


class _Tagged(torch.Tensor):
    """A tensor subclass: the C++ plan leaves it to the general path."""


def test_tensor_subclass_inputs(backend):
    _, fm = _models()
    layer = _layer(fm)
    x = torch.randn(2, K)
    with torch.no_grad():
        expected = layer(x)
        plan = layer.bank.plan
        xt = x.as_subclass(_Tagged)
        if fastpath.module is not None and isinstance(plan, fastpath.module.LinearPlan):
            assert plan(xt) is None
        torch.testing.assert_close(layer(xt).as_subclass(torch.Tensor), expected, atol=0, rtol=0)
        assert plan(torch.randn(1, K)) is not None  # declining a subclass retires nothing


def test_without_the_compiled_fast_path_plans_run_in_python(monkeypatch):
    """fastpeft._fastpath missing (not built): the same backend runs through a PyPlan."""
    monkeypatch.setattr(fastpath, "module", None)
    pm, fm = _models()
    layer = _layer(fm)
    x = torch.randn(3, K)
    with torch.no_grad():
        first = layer(x)
        assert isinstance(layer.bank.plan, fastpath.PyPlan)
        assert torch.equal(layer(x), first)
        torch.testing.assert_close(first, pm.base_model.model.q(x), atol=ATOL, rtol=1e-5)


def test_scaling_changed_in_place_is_seen(backend):
    """PEFT's set_scale / scale_layer assign new values in ``layer.scaling``; a plan built
    before must not keep the old scale."""
    pm, fm = _models()
    layer = _layer(fm)
    x = torch.randn(2, K)
    with torch.no_grad():
        layer(x)
        plan = layer.bank.plan
        for m in (pm, fm):
            m.base_model.model.q.scaling["a"] = 0.37
        assert plan(x) is None
        torch.testing.assert_close(layer(x), pm.base_model.model.q(x), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(layer(x), pm.base_model.model.q(x), atol=ATOL, rtol=1e-5)  # via the new plan
        pm.base_model.model.q.scale_layer(2.0)
        layer.scaling["a"] *= 2.0
        torch.testing.assert_close(layer(x), pm.base_model.model.q(x), atol=ATOL, rtol=1e-5)


def test_peft_scale_api_on_native_layers(backend):
    """fastpeft's own LoRA layers have PEFT's set_scale / scale_layer / unscale_layer, with the
    same scalings as PEFT's layer (rsLoRA included) and outputs that follow them."""
    pm, fm = _models(seed=3, configs={"a": dict(r=4, lora_alpha=8, target_modules=["q"]),
                                      "b": dict(r=9, lora_alpha=3, use_rslora=True, target_modules=["q"])})
    pl, fl = pm.base_model.model.q, _layer(fm)
    x = torch.randn(3, K)
    steps = [("set_scale", ("b", 0.25)), ("set_scale", ("a", 3.0)), ("scale_layer", (0.5,)),
             ("unscale_layer", (0.5,)), ("unscale_layer", (None,))]
    for active in (["a"], ["b"], ["a", "b"]):
        for m in (pm, fm):
            m.base_model.set_adapter(active)
        for meth, args in steps:
            with torch.no_grad():
                fm(x)  # a plan exists before each change
            getattr(pl, meth)(*args)
            getattr(fl, meth)(*args)
            assert fl.scaling == pytest.approx(pl.scaling), (active, meth, args)
            with torch.no_grad():
                torch.testing.assert_close(fm(x), pm(x), atol=ATOL, rtol=1e-5)
