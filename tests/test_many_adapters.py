"""Hundreds of adapters of different ranks on one model: outputs, memory of the slot stacks,
switching / adding / deleting without recompiling, and keeping adapters on the CPU (LRU of
device slots, tested with both "devices" being the CPU)."""
import copy
import warnings

import peft
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import fastpeft
from fastpeft.nn import AdapterLayer, LoraLinear
from fastpeft.offload import keep_adapters_on_cpu

from models import fresh_copy, logits, randomize_adapters, tiny

ATOL = 1e-5
N_ADAPTERS = 200
TARGETS = ["q_proj", "v_proj"]


def _rank(i):
    return i % 16 + 1  # ranks 1..16


def _cfg(i):
    return fastpeft.LoraConfig(r=_rank(i), lora_alpha=2 * _rank(i), target_modules=TARGETS)


@pytest.fixture(scope="module")
def many():
    base, inputs = tiny("llama")
    pristine = fresh_copy(base)
    fm = fastpeft.get_peft_model(base, _cfg(0), adapter_name="a0")
    for i in range(1, N_ADAPTERS):
        fm.add_adapter(f"a{i}", _cfg(i))
    randomize_adapters(fm, seed=1)
    fm.eval()
    for p in fm.parameters():
        p.requires_grad_(False)
    return fm, pristine, inputs


def _stack_stats(model):
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    stack = sum(m.bank.a.nbytes + m.bank.bt.nbytes for m in layers)
    own = sum(p.numel() * p.element_size() for m in layers for n in m._adapters for p in m._params_of(n))
    return layers, stack, own


def test_every_adapter_aliases_its_stack_and_memory_ratio(many):
    fm, _, inputs = many
    fastpeft.optimize.prepare(fm)
    layers, stack, own = _stack_stats(fm)
    ranks = [_rank(i) for i in range(N_ADAPTERS)]
    for m in layers:
        a, bt = m.bank.a, m.bank.bt
        # ranks 1..16 mixed: pages of 4 rank rows (fastpeft.nn.paging), not 200 slots of 16
        assert a.shape[1:] == (4, m.in_features) and a.shape[0] == sum(-(-r // 4) for r in ranks)
        table = m.bank.page_table
        assert table.shape == (N_ADAPTERS + 1, 4) and (table[-1] == -1).all()
        flat_a, flat_b = a.view(-1, a.shape[-1]), bt.view(-1, bt.shape[-1])
        for s, n in enumerate(m._adapters):  # parameters are views of the stacks: held once
            r = ranks[s]
            pages = table[s][table[s] >= 0].tolist()
            assert pages == list(range(pages[0], pages[0] + -(-r // 4)))  # consecutive pages
            assert m.lora_A[n].weight.data_ptr() == flat_a[pages[0] * 4].data_ptr()
            assert m.lora_B[n].weight.data_ptr() == flat_b[pages[0] * 4].data_ptr()
            assert torch.equal(flat_a[pages[0] * 4:pages[0] * 4 + r], m.lora_A[n].weight)
            assert (flat_a[pages[0] * 4 + r:(pages[-1] + 1) * 4] == 0).all()  # the page's tail: zeros
        assert m.bank.scales.tolist() == pytest.approx(
            [m.scaling[n] for n, r in zip(m._adapters, ranks, strict=True) for _ in range(-(-r // 4))])
    padded = sum(-(-r // 4) * 4 for r in ranks) / sum(ranks)  # zero rows only up to a page
    assert stack / own == pytest.approx(padded, rel=1e-6) and stack / own < 1.2
    print(f"\n{N_ADAPTERS} adapters, ranks 1..16: stacks {stack / 1e6:.2f} MB, adapter weights "
          f"{own / 1e6:.2f} MB, ratio {stack / own:.3f} (pages of 4 rank rows; "
          f"{16 * N_ADAPTERS / sum(ranks):.3f} if padded to rank 16)")


def test_outputs_match_peft_for_sampled_adapters_and_mixed_batch(many, tmp_path):
    fm, pristine, inputs = many
    kw = inputs(batch=16, seq=5)
    sample = ["a0", "a7", "a15", "a104", "a199"]
    expected = {}
    for n in sample:
        fm.save_pretrained(str(tmp_path), selected_adapters=[n])
        ref = peft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path / n), adapter_name=n).eval()
        expected[n] = logits(ref, kw)
        fm.set_adapter(n)
        torch.testing.assert_close(logits(fm, kw), expected[n], atol=ATOL, rtol=1e-5)
    # 16 rows, 16 distinct adapters of different ranks (and the base) in one batch
    names = [f"a{i}" for i in range(3, 199, 13)][:15] + ["__base__"]
    assert len(set(names)) == 16
    with fastpeft.mixed_batch(fm, names):
        got = logits(fm, kw)
    for i, n in enumerate(names):
        row = {k: v[i:i + 1] for k, v in kw.items()}
        if n == "__base__":
            with fm.disable_adapter():
                exp = logits(fm, row)
        else:
            fm.set_adapter(n)
            exp = logits(fm, row)
        torch.testing.assert_close(got[i:i + 1], exp, atol=ATOL, rtol=1e-5)


def test_delete_and_add_repack_and_keep_outputs(many):
    fm, _, inputs = many
    model = copy.deepcopy(fm)
    kw = inputs(batch=2, seq=4)
    keep = ["a3", "a50", "a150"]
    before = {}
    for n in keep:
        model.set_adapter(n)
        before[n] = logits(model, kw)
    deleted = [f"a{i}" for i in range(0, N_ADAPTERS, 2) if f"a{i}" not in keep]  # about half
    for n in deleted:
        model.delete_adapter(n)
    for n in keep:  # the others are untouched by the repack
        model.set_adapter(n)
        torch.testing.assert_close(logits(model, kw), before[n], atol=ATOL, rtol=1e-5)
    model.add_adapter("late", fastpeft.LoraConfig(r=32, lora_alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".late." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    for n in keep + ["late"]:
        model.set_adapter(n)
        got = logits(model, kw)
        if n in before:
            torch.testing.assert_close(got, before[n], atol=ATOL, rtol=1e-5)
        layer = model.get_base_model().model.layers[0].self_attn.q_proj
        # repacked: fewer slots; the new rank-32 adapter takes 8 pages of 4 rows
        slots = N_ADAPTERS - len(deleted) + 1
        assert layer.bank.page_table.shape == (slots + 1, 8) and layer.bank.a.shape[1] == 4
        assert (layer.bank.page_table[layer.slot_of("late")] >= 0).sum() == 8
        layer.bank.mark_stale()  # a fresh pack gives the same result
        torch.testing.assert_close(got, logits(model, kw), atol=ATOL, rtol=1e-5)


@pytest.mark.slow
def test_compiled_model_does_not_recompile_on_switch_add_delete():
    torch._dynamo.reset()
    counters.clear()
    base, inputs = tiny("llama")
    fm = fastpeft.get_peft_model(base, _cfg(0), adapter_name="a0")
    for i in range(1, 24):
        fm.add_adapter(f"a{i}", _cfg(i))
    randomize_adapters(fm, seed=2)
    fm.eval()
    model = fm.get_base_model()
    fastpeft.optimize.prepare(model)
    kw = inputs(batch=4, seq=3)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**kw).logits, logits(model, kw), atol=ATOL, rtol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for n in ("a5", "a17", "a22"):
                fm.set_adapter(n)
                torch.testing.assert_close(compiled(**kw).logits, logits(model, kw), atol=ATOL, rtol=1e-5)
            fm.add_adapter("new", fastpeft.LoraConfig(r=40, lora_alpha=8, target_modules=TARGETS))  # more slots, larger rank
            randomize_adapters(fm, seed=3)
            fm.delete_adapter("a1")
            fm.set_adapter("new")
            fastpeft.optimize.prepare(model)  # repack eagerly (a compiled forward cannot)
            torch.testing.assert_close(compiled(**kw).logits, logits(model, kw), atol=ATOL, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_keep_adapters_on_cpu_lru_bookkeeping_and_outputs():
    base, inputs = tiny("llama")
    fm = fastpeft.get_peft_model(base, _cfg(0), adapter_name="a0")
    for i in range(1, 12):
        fm.add_adapter(f"a{i}", _cfg(i))
    fm.add_adapter("dora", fastpeft.LoraConfig(r=2, use_dora=True, target_modules=["o_proj"]))
    randomize_adapters(fm, seed=4)
    fm.eval()
    ref = copy.deepcopy(fm)
    kw = inputs(batch=3, seq=4)
    handle = keep_adapters_on_cpu(fm, max_on_device=3)
    n_layers = len(handle.layers)
    assert n_layers == 4 and len(handle.skipped) == 2  # q/v of 2 blocks; the DoRA o_proj layers stay
    layer = handle.layers[0][1]
    assert all(p.device.type == "cpu" for n in layer._adapters for p in layer._params_of(n))
    fastpeft.optimize.prepare(fm)
    stack_ids = (id(layer.bank.a), layer.bank.a.shape)
    assert layer.bank.a.shape[0] == 3  # 3 device slots, whatever the number of adapters

    def check(n):
        fm.set_adapter(n)
        ref.set_adapter(n)
        torch.testing.assert_close(logits(fm, kw), logits(ref, kw), atol=ATOL, rtol=1e-5)

    loads0 = handle.stats()["loads"]
    for n in ("a1", "a2"):  # fill the free slots
        check(n)
    assert handle.stats() == dict(loads=loads0 + 2 * n_layers, evictions=0)
    assert handle.resident_adapters() == {"a0", "a1", "a2"}
    check("a1")  # a hit: nothing copied
    assert handle.stats()["loads"] == loads0 + 2 * n_layers
    check("a3")  # evicts the least recently used: a0
    assert handle.resident_adapters() == {"a1", "a2", "a3"}
    assert handle.stats()["evictions"] == n_layers
    # a mixed batch loads its adapters (evicting others), leaving it reloads the active one
    names = ["a7", "a8", "a9"]
    with fastpeft.mixed_batch(fm, names):
        got = logits(fm, kw)
    with fastpeft.mixed_batch(ref, names):
        torch.testing.assert_close(got, logits(ref, kw), atol=ATOL, rtol=1e-5)
    assert "a3" in handle.resident_adapters()
    torch.testing.assert_close(logits(fm, kw), logits(ref, kw), atol=ATOL, rtol=1e-5)
    # the stacks were updated in place (compiled graphs / CUDA graphs stay valid)
    assert (id(layer.bank.a), layer.bank.a.shape) == stack_ids
    with pytest.raises(ValueError, match="max_on_device=3"):
        with fastpeft.mixed_batch(fm, ["a1", "a2", "a4", "a5"]):
            logits(fm, kw)
    check("a11")  # still consistent after the refused batch


@pytest.mark.slow
def test_offload_with_compiled_model_no_recompile():
    torch._dynamo.reset()
    counters.clear()
    base, inputs = tiny("llama")
    fm = fastpeft.get_peft_model(base, _cfg(0), adapter_name="a0")
    for i in range(1, 8):
        fm.add_adapter(f"a{i}", _cfg(i))
    randomize_adapters(fm, seed=6)
    fm.eval()
    ref = copy.deepcopy(fm)
    keep_adapters_on_cpu(fm, max_on_device=2)
    model = fm.get_base_model()
    fastpeft.optimize.prepare(model)
    kw = inputs(batch=2, seq=3)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled(**kw)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for n in ("a3", "a6", "a1", "a3"):
                fm.set_adapter(n)
                ref.set_adapter(n)
                torch.testing.assert_close(compiled(**kw).logits, logits(ref, kw), atol=ATOL, rtol=1e-5)
    torch._dynamo.reset()


def test_many_peft_adapters_then_optimize():
    base, inputs = tiny("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.LoraConfig(r=1, target_modules=TARGETS), adapter_name="p0")
        for i in range(1, 40):
            pm.add_adapter(f"p{i}", peft.LoraConfig(r=_rank(i), lora_alpha=3, target_modules=TARGETS))
    randomize_adapters(pm, seed=8)
    pm.eval()
    kw = inputs(batch=4, seq=4)
    names = ["p3", "p39", "__base__", "p17"]
    with torch.no_grad():
        expected = pm(**kw, adapter_names=names).logits
    fastpeft.optimize(pm)
    layer = pm.get_base_model().model.layers[1].self_attn.v_proj
    assert isinstance(layer, AdapterLayer) and layer.bank.a.shape[1] == 4 and layer.bank.page_table.shape == (41, 4)
    with torch.no_grad():
        torch.testing.assert_close(pm(**kw, adapter_names=names).logits, expected, atol=ATOL, rtol=1e-5)
