"""The adapter bank of a layer (fastpeft.nn.bank / slots / bank_offload).

Checked: a call's own selection (``token_slots(..., names=...)``) gives the slots that entering
that mixed batch gives, paged or not, and changes nothing of the layer's state; every kind of
adapter layer gets its bank from ``bank_class``; a pickled or copied layer's bank starts without
plans and packs again to the same outputs; offloading replaces the bank and keeps the layer's
class; an Entry that may not alias is watched by version (an in-place write repacks).
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.nn import AdaLoraLinear, IA3Linear, LoraEmbedding, LoraLinear, ModulesToSaveWrapper
from fastpeft.nn.bank import AdapterBank, ScaleBank
from fastpeft.nn.bank_offload import OffloadBank
from fastpeft.nn.selection import Selection, selecting
from fastpeft.nn.slots import SlotTable
from fastpeft.offload import keep_adapters_on_cpu

K, N = 23, 19


def _layer(ranks, seed=0) -> LoraLinear:
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(K, N))
    for i, r in enumerate(ranks):
        layer.add_adapter(f"a{i}", r=r, lora_alpha=r + 1, init_lora_weights=False)
    layer.set_adapter("a0")
    return layer.eval().requires_grad_(False)


@pytest.mark.parametrize("ranks", [[4, 4, 4], [1, 2, 3, 5, 8, 13, 21, 3, 1, 2, 34, 7]], ids=["plain", "paged"])
def test_per_call_selection_equals_the_mixed_batch_state_and_leaves_it(ranks):
    layer = _layer(ranks)
    x = torch.randn(4, 3, K)
    with torch.no_grad():
        layer(x)  # packs (and pages the second set)
    assert (layer.bank.page_table is not None) == (len(ranks) > 3)
    bank = layer.bank
    active_before = bank.active.clone()
    for names in [("a1", "__base__", "a2", "a0"), ("a2", "a2", "a1", "a0"), ("a1", "a0")]:
        got = bank.token_slots(12, 4, Selection(names, True))
        assert bank.rows is None and torch.equal(bank.active, active_before)  # state unchanged
        layer.set_mixed_names(names)
        try:
            assert torch.equal(got, layer.token_slots(12, 4))  # the recorded (compiled) route's slots
        finally:
            layer.set_mixed_names(None)
    with pytest.raises(ValueError, match="3 adapter names for a batch of 4"):
        bank.token_slots(12, 4, Selection(("a0", "a1", "a2"), True))
    with pytest.raises(ValueError, match="2 adapter names for a batch of 4"):  # a forward's names: one per row
        bank.token_slots(12, 4, Selection(("a0", "a1"), False))


def test_every_layer_kind_has_its_bank():
    lin = nn.Linear(K, N)
    assert type(LoraLinear(lin).bank) is AdapterBank
    assert type(AdaLoraLinear(lin).bank) is AdapterBank
    assert type(LoraEmbedding(nn.Embedding(K, N)).bank) is AdapterBank
    assert type(IA3Linear(lin, is_feedforward=False).bank) is ScaleBank
    assert type(ModulesToSaveWrapper(lin).bank) is SlotTable


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_copies_start_without_plans_and_give_the_same_outputs(how):
    layer = _layer([2, 5])
    x = torch.randn(3, K)
    with torch.no_grad():
        expected = layer(x)
        layer(x)
    assert layer.bank.plan is not None
    clone = pickle.loads(pickle.dumps(layer)) if how == "pickle" else copy.deepcopy(layer)
    assert clone.bank.plan is None and clone.bank.names == layer.bank.names
    with torch.no_grad():
        torch.testing.assert_close(clone(x), expected, atol=0, rtol=0)


def test_offloading_replaces_the_bank_not_the_class():
    base = nn.Sequential(nn.Linear(K, N))
    fm = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=3, target_modules=["0"], init_lora_weights=False))
    fm.add_adapter("b", fastpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    fm.eval()
    layer = fm.get_base_model()[0]
    cls, names = type(layer), list(layer.bank.names)
    x = torch.randn(2, K)
    with torch.no_grad():
        expected = {n: (fm.set_adapter(n), fm(x))[1] for n in ("default", "b")}
    handle = keep_adapters_on_cpu(fm, max_on_device=1)
    assert type(layer) is cls and isinstance(layer.bank, OffloadBank) and layer.bank.names == names
    with torch.no_grad():
        for n in ("default", "b", "default"):
            fm.set_adapter(n)
            torch.testing.assert_close(fm(x), expected[n], atol=1e-6, rtol=1e-6)
    assert handle.stats()["evictions"] >= 2 and layer.bank.a.shape[0] == 1


def test_derived_copies_are_watched_by_version():
    torch.manual_seed(1)
    layer = AdaLoraLinear(nn.Linear(K, N))
    layer.add_adapter("s", r=4, lora_alpha=8, init_lora_weights=False)
    layer.set_adapter("s")
    layer.eval().requires_grad_(False)
    x = torch.randn(2, K)
    with torch.no_grad():
        layer(x)
        assert "s" in layer.bank.copies and "s" not in layer.bank.aliased
        layer.lora_E["s"].mul_(3.0)  # the stacks hold A * E: an in-place write must repack
        got = layer(x)
        expected = layer._forward_unfused(x, ["s"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mixed_names_is_read_only_and_errors_name_the_layer():
    layer = _layer([2, 3])
    with pytest.raises(AttributeError):
        layer._mixed_names = ("a0",)  # would leave the bank's row slots behind: set_mixed_names
    with selecting({layer: Selection(("a0", "a1", "a0"), True)}):
        with torch.no_grad(), pytest.raises(ValueError, match="3 adapter names for a batch of 4 rows in LoraLinear"):
            layer(torch.randn(4, K))
    with pytest.raises(ValueError, match="2 adapter names for a batch of 4 rows in LoraLinear"):
        with torch.no_grad():
            layer(torch.randn(4, K), adapter_names=["a0", "a1"])  # PEFT's layer-level names: one per row


def _offloaded(capacity):
    base = nn.Sequential(nn.Linear(K, N))
    fm = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=3, target_modules=["0"], init_lora_weights=False))
    for i in range(1, 5):
        fm.add_adapter(f"b{i}", fastpeft.LoraConfig(r=2 + i % 2, target_modules=["0"], init_lora_weights=False))
    fm.eval()
    ref = copy.deepcopy(fm)
    handle = keep_adapters_on_cpu(fm, max_on_device=capacity)
    return fm, ref, handle


def test_offloaded_scaling_change_is_seen_in_the_same_stacks():
    fm, ref, _ = _offloaded(2)
    layer = fm.get_base_model()[0]
    x = torch.randn(3, K)
    with torch.no_grad():
        fm(x)
        a, bt, scales = layer.bank.a, layer.bank.bt, layer.bank.scales
        for m in (fm, ref):
            m.get_base_model()[0].set_scale("default", 0.25)
        torch.testing.assert_close(fm(x), ref(x), atol=1e-6, rtol=1e-6)
    assert layer.bank.a is a and layer.bank.bt is bt and layer.bank.scales is scales  # CUDA graphs read these


def test_offload_capacity_can_shrink():
    fm, ref, handle = _offloaded(4)
    x = torch.randn(3, K)
    with torch.no_grad():
        for n in ("b1", "b2", "b3", "default"):
            fm.set_adapter(n)
            fm(x)
        handle = keep_adapters_on_cpu(fm, max_on_device=2)  # keeps the two most recent: b3, default
        assert handle.resident_adapters() == {"b3", "default"}
        for n in ("b3", "b1", "default", "b4"):
            fm.set_adapter(n)
            ref.set_adapter(n)
            torch.testing.assert_close(fm(x), ref(x), atol=1e-6, rtol=1e-6)
    assert fm.get_base_model()[0].bank.a.shape[0] == 2


@pytest.mark.parametrize("kind", ["lora", "ia3", "embedding"])
def test_delete_adapter_frees_its_memory_before_returning(kind):
    import gc
    import weakref

    torch.manual_seed(2)
    if kind == "lora":
        layer = _layer([3, 5])
        x = torch.randn(2, K)
    elif kind == "ia3":
        layer = IA3Linear(nn.Linear(K, N), is_feedforward=False)
        for n in ("a0", "a1"):
            layer.add_adapter(n, init_ia3_weights=False)
        layer.set_adapter("a0")
        x = torch.randn(2, K)
    else:
        layer = LoraEmbedding(nn.Embedding(K, N))
        for i, n in enumerate(("a0", "a1")):
            layer.add_adapter(n, r=2 + i, lora_alpha=4, init_lora_weights=False)
        layer.set_adapter("a0")
        x = torch.randint(0, K, (2, 3))
    layer.eval().requires_grad_(False)
    with torch.no_grad():
        layer(x)
        layer(x)
    stack = layer.bank.stack if kind == "ia3" else layer.bank.a
    old = weakref.ref(stack)
    del stack
    layer.delete_adapter("a1")
    gc.collect()
    assert old() is None  # the stacks that held a1 are gone
    kept = layer.bank.stack if kind == "ia3" else layer.bank.a
    assert kept is not None and kept.shape[0] == (2 if kind == "ia3" else 1)
    with torch.no_grad():
        expected = layer._forward_unfused(x, ["a0"]) if kind != "ia3" else None
        got = layer(x)
    if expected is not None:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    layer.delete_adapter("a0")
    assert not layer.bank.holds_stacks()


def test_every_layer_kind_survives_a_cast():
    lin = nn.Linear(K, N)
    layers = [LoraLinear(copy.deepcopy(lin)), IA3Linear(copy.deepcopy(lin), is_feedforward=True),
              LoraEmbedding(nn.Embedding(K, N)), ModulesToSaveWrapper(copy.deepcopy(lin))]
    for layer in layers:
        if isinstance(layer, IA3Linear):
            layer.add_adapter("a")
        elif isinstance(layer, ModulesToSaveWrapper):
            layer.add_adapter("a")
        else:
            layer.add_adapter("a", r=2, lora_alpha=4)
        layer.set_adapter("a")
        layer.to(torch.float64)
        assert layer.bank.stale and layer.get_base_layer().weight.dtype == torch.float64
