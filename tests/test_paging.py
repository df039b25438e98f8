"""Rank pages (fastpeft.nn.paging): a layer whose adapters' ranks differ much stores them in pages
of a few rank rows instead of padding each to the largest rank.

Checked: the page-size rule; that a paged layer gives PEFT's outputs on every backend, for one
adapter, several active adapters, mixed batches (with the base), in fp32 and bf16; that the
PEFT parameters stay views of the stacks (an optimizer's in-place step is seen, training works);
that the page tensors a captured CUDA graph reads are updated in place; and that layers move
between paged and unpaged as adapters come and go.
"""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.nn import LoraLinear, paging
from fastpeft.ops import backends

K, N = 37, 29
RANKS = [1, 2, 3, 5, 8, 13, 21, 3, 1, 2, 34, 7]  # mixed: padding to 34 would take 4x the rows
NAMES = [f"r{i}" for i in range(len(RANKS))]
BACKENDS = [b for b in ("torch", "cpp", "triton") if b in backends.available_backends()]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(K, N)

    def forward(self, x):
        return self.q(x)


def _models(dtype=torch.float32, ranks=RANKS, seed=0):
    """(peft model, fastpeft model) with the same adapters of ``ranks`` on ``q``."""
    torch.manual_seed(seed)
    base = Block().to(dtype).eval()
    cfg = lambda r: dict(r=r, lora_alpha=2 * r + 1, target_modules=["q"])  # noqa: E731
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg(ranks[0])), adapter_name=NAMES[0])
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg(ranks[0])), adapter_name=NAMES[0])
    for n, r in zip(NAMES[1:], ranks[1:], strict=True):
        pm.add_adapter(n, peft.LoraConfig(**cfg(r)))
        fm.add_adapter(n, fastpeft.LoraConfig(**cfg(r)))
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


def _layer(fm) -> LoraLinear:
    return fm.base_model.model.q


@pytest.fixture(params=BACKENDS)
def backend(request):
    backends.set_backend(request.param)
    yield request.param
    backends.set_backend("auto")


# ----- the rule ----------------------------------------------------------------------------------
def test_page_rows_rule():
    assert paging.choose_page_rows([16] * 300) == 16  # equal ranks: the plain stacks
    assert paging.choose_page_rows([4, 8]) == 8  # little to save: unpaged
    assert paging.choose_page_rows([8, 8, 8, 16]) == 16  # within PAGE_SLACK
    cycle = [i % 16 + 1 for i in range(200)]
    assert paging.choose_page_rows(cycle) == 4  # 8 rows would pad by 1.41x, 4 rows by 1.18x
    assert paging.choose_page_rows(RANKS) == 4
    c = paging.choose_page_rows([64] * 10 + [8] * 100)
    assert c == 8 and paging.padded_rows([64] * 10 + [8] * 100, c) == 64 * 10 + 8 * 100  # no waste at all
    assert paging.choose_page_rows([1, 2, 3] * 20) == 3  # R <= MIN_PAGE_ROWS: never paged
    for ranks in (cycle, RANKS, [1] * 50 + [32], [3, 5, 7, 11, 13] * 9):
        c = paging.choose_page_rows(ranks)
        assert c == max(ranks) or paging.padded_rows(ranks, c) <= paging.padded_rows(ranks, max(ranks))


def test_page_table_and_slot_mapping():
    table = paging.build_page_table([3, 9, 4], 4, "cpu")
    assert table.tolist() == [[0, -1, -1], [1, 2, 3], [4, -1, -1], [-1, -1, -1]]
    slots = torch.tensor([[1, 0], [-1, 2]], dtype=torch.int32)
    assert paging.slots_to_pages(table, slots).tolist() == [[1, 2, 3, 0, -1, -1], [-1, -1, -1, 4, -1, -1]]
    assert paging.slots_to_pages(None, slots) is slots


# ----- outputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_layer_matches_peft(backend, dtype):
    pm, fm = _models(dtype)
    layer = _layer(fm)
    x = torch.randn(3, 5, K, dtype=dtype)
    checks = [[n] for n in NAMES] + [["r10", "r4"], ["r0", "r6", "r11"]]
    for names in checks:
        pm.base_model.set_adapter(names)
        fm.base_model.set_adapter(names)
        with torch.no_grad():
            exp = pm(x)
            got = fm(x)
            again = fm(x)  # the fast path's plan, built by the first call
        torch.testing.assert_close(got, exp, **TOL[dtype])
        assert torch.equal(again, got)
    assert layer.bank.a.shape[1] == 4 and layer.bank.page_table is not None
    row_names = ["r10", "__base__", "r6", "r0"]
    with torch.no_grad():
        exp = pm(x.repeat(4, 1, 1)[:4], adapter_names=row_names)
        with fastpeft.mixed_batch(fm, row_names):
            got = fm(x.repeat(4, 1, 1)[:4])
        got_kw = fm(x.repeat(4, 1, 1)[:4], adapter_names=row_names)
    torch.testing.assert_close(got, exp, **TOL[dtype])
    torch.testing.assert_close(got_kw, exp, **TOL[dtype])


def test_paged_and_unpaged_stacks_agree(backend):
    """The same adapters packed in pages and padded to the largest rank give the same outputs
    (the per-page sums differ only by rounding)."""
    _, fm = _models()
    layer = _layer(fm)
    x = torch.randn(6, K)
    fm.base_model.set_adapter(["r10", "r5"])
    with torch.no_grad():
        paged = layer(x)
        with fastpeft.mixed_batch(fm, ["r10", "r1", "__base__", "r6", "r10", "r3"]):
            paged_mixed = layer(x)
    old = paging.PAGE_SLACK
    paging.PAGE_SLACK = 100.0  # padding always acceptable: one page per adapter
    try:
        layer.bank.mark_stale()
        with torch.no_grad():
            plain = layer(x)
            with fastpeft.mixed_batch(fm, ["r10", "r1", "__base__", "r6", "r10", "r3"]):
                plain_mixed = layer(x)
        assert layer.bank.page_table is None and layer.bank.a.shape[:2] == (len(RANKS), 34)
    finally:
        paging.PAGE_SLACK = old
    torch.testing.assert_close(paged, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paged_mixed, plain_mixed, atol=1e-5, rtol=1e-5)


# ----- parameters are views; training --------------------------------------------------------------
def test_inplace_update_is_seen_and_training_works():
    pm, fm = _models()
    layer = _layer(fm)
    x = torch.randn(4, K)
    fm.base_model.set_adapter("r6")
    pm.base_model.set_adapter("r6")
    with torch.no_grad():
        fm(x)  # packs and builds the plan
        for m in (pm, fm):  # an optimizer-style in-place step on the adapter's weights
            dict(m.named_parameters())["base_model.model.q.lora_B.r6.weight"].add_(0.5)
        torch.testing.assert_close(fm(x), pm(x), atol=1e-5, rtol=1e-5)
    assert layer.bank.page_table is not None
    a = layer.bank.a.view(-1, K)
    assert any(layer.lora_A["r6"].weight.data_ptr() == a[i].data_ptr() for i in range(a.shape[0]))
    # a few steps of training on one adapter: gradients flow, the loss falls, the fused
    # inference path then sees the trained weights without a repack
    fm.train()
    for p in layer.lora_A["r6"].parameters():
        p.requires_grad_(True)
    for p in layer.lora_B["r6"].parameters():
        p.requires_grad_(True)
    params = [p for p in fm.parameters() if p.requires_grad]
    assert len(params) == 2
    opt = torch.optim.SGD(params, lr=1e-3)
    target = torch.randn(4, N)
    losses = []
    for _ in range(5):
        loss = (fm(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    fm.eval()
    stacks = layer.bank.a
    with torch.no_grad():
        got = fm(x)
        exp = layer._forward_unfused(x, ["r6"])
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
    assert layer.bank.a is stacks  # no repack: the parameters are the stacks' rows


# ----- what CUDA graphs read ---------------------------------------------------------------------------
def test_page_tensors_are_updated_in_place():
    _, fm = _models()
    layer = _layer(fm)
    x = torch.randn(3, 2, K)
    with torch.no_grad():
        fm(x)
    act = layer.bank.active_pages
    ptr = act.data_ptr()
    for n in ("r10", "r3", "r6"):
        fm.base_model.set_adapter(n)
        assert layer.bank.active_pages is act and act.data_ptr() == ptr
        assert layer.token_slots(6, 3) is act
        pages = act[0][act[0] >= 0].tolist()
        assert len(pages) == -(-RANKS[NAMES.index(n)] // 4)
    with fastpeft.mixed_batch(fm, ["r10", "r1", "__base__"]):
        ts = layer.token_slots(6, 3)
        ts_ptr = ts.data_ptr()
    with fastpeft.mixed_batch(fm, ["r1", "__base__", "r10"]):
        got = layer.token_slots(6, 3)
        assert got is ts and got.data_ptr() == ts_ptr
        table = layer.bank.page_table
        exp = torch.cat([table[layer.slot_of(n)].expand(2, -1) for n in ["r1", "__base__", "r10"]])
        assert torch.equal(got, exp)


# ----- paged <-> unpaged as adapters come and go; other layer kinds ---------------------------------
def test_layer_goes_unpaged_and_back():
    pm, fm = _models()
    layer = _layer(fm)
    x = torch.randn(4, K)
    with torch.no_grad():
        fm(x)
    assert layer.bank.page_table is not None
    for n in NAMES[:-2]:
        pm.delete_adapter(n)
        fm.delete_adapter(n)
    # left: ranks 34 and 7 -> unpaged (little to save)
    for n in NAMES[-2:]:
        pm.base_model.set_adapter(n)
        fm.base_model.set_adapter(n)
        with torch.no_grad():
            torch.testing.assert_close(fm(x), pm(x), atol=1e-5, rtol=1e-5)
        assert layer.bank.page_table is None and layer.bank.active_pages is None
    for i in range(6):  # many small adapters again: paged
        cfg = dict(r=1 + i % 3, lora_alpha=3, target_modules=["q"], init_lora_weights=False)
        pm.add_adapter(f"s{i}", peft.LoraConfig(**cfg))
        fm.add_adapter(f"s{i}", fastpeft.LoraConfig(**cfg))
        fm.load_state_dict(pm.state_dict())
    for n in ("s5", "r11", "s0"):
        pm.base_model.set_adapter(n)
        fm.base_model.set_adapter(n)
        with torch.no_grad():
            torch.testing.assert_close(fm(x), pm(x), atol=1e-5, rtol=1e-5)
        assert layer.bank.page_table is not None


def test_dora_layers_stay_unpaged():
    torch.manual_seed(0)
    base = Block().eval()
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=32, target_modules=["q"]), adapter_name="big")
    for i in range(10):
        fm.add_adapter(f"d{i}", fastpeft.LoraConfig(r=1, use_dora=True, target_modules=["q"]))
    fm.eval()
    with torch.no_grad():
        fm(torch.randn(2, K))
    layer = _layer(fm)
    assert layer.bank.page_table is None and layer.bank.a.shape[:2] == (11, 32)


def test_offloaded_layer_is_unpaged_and_correct():
    from fastpeft.offload import keep_adapters_on_cpu

    pm, fm = _models()
    x = torch.randn(4, K)
    with torch.no_grad():
        fm(x)
    keep_adapters_on_cpu(fm, max_on_device=3)
    layer = _layer(fm)
    for n in ("r10", "r2", "r7", "r10"):
        pm.base_model.set_adapter(n)
        fm.base_model.set_adapter(n)
        with torch.no_grad():
            torch.testing.assert_close(fm(x), pm(x), atol=1e-5, rtol=1e-5)
        assert layer.bank.page_table is None and layer.bank.active_pages is None


def test_paged_layer_on_4bit_base_matches_peft(monkeypatch):
    """The quantized operator takes the same page slots (bitsandbytes NF4 base, through the whole
    model, against PEFT)."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.nn.modules as bnb_modules

    from models import fresh_copy, logits, randomize_adapters, tiny

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)  # see test_quant_adapters
    base, inputs = tiny("llama_q")
    fastpeft.quantize(base, bits=4, quant_type="nf4", compute_dtype=torch.float32)
    pristine = fresh_copy(base)
    cfg = lambda r: peft.LoraConfig(r=r, lora_alpha=r + 2, target_modules=["q_proj", "v_proj"])  # noqa: E731
    pm = peft.get_peft_model(base, cfg(RANKS[0]), adapter_name=NAMES[0])
    for n, r in zip(NAMES[1:], RANKS[1:], strict=True):
        pm.add_adapter(n, cfg(r))
    randomize_adapters(pm)
    pm.eval()
    fm = fastpeft.get_peft_model(fresh_copy(pristine), fastpeft.LoraConfig(**cfg(RANKS[0]).to_dict()), adapter_name=NAMES[0])
    for n, r in zip(NAMES[1:], RANKS[1:], strict=True):
        fm.add_adapter(n, fastpeft.LoraConfig(**cfg(r).to_dict()))
    missing, unexpected = fm.load_state_dict({k: v for k, v in pm.state_dict().items() if "lora_" in k}, strict=False)
    assert not unexpected and not any("lora_" in k for k in missing)
    fm.eval()
    kw = inputs(batch=3, seq=4)
    tol = dict(atol=2e-4, rtol=2e-4)
    for n in ("r10", "r2"):
        pm.set_adapter(n)
        fm.set_adapter(n)
        torch.testing.assert_close(logits(fm, kw), logits(pm, kw), **tol)
    layer = fm.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.kind == "quant" and layer.bank.page_table is not None
    names = ["r10", "__base__", "r6"]
    with torch.no_grad():
        torch.testing.assert_close(fm(**kw, adapter_names=names).logits, pm(**kw, adapter_names=names).logits, **tol)


@pytest.mark.slow
def test_paged_layer_under_torch_compile_no_recompile():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pm, fm = _models()
    model = fm.get_base_model()
    fastpeft.optimize.prepare(model)
    assert _layer(fm).bank.page_table is not None
    x = torch.randn(4, 3, K)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    try:
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), pm(x), atol=1e-5, rtol=1e-5)
            with fastpeft.mixed_batch(fm, ["r0", "r1", "r2", "r3"]):  # the mixed-batch graph
                compiled(x)
            with torch._dynamo.config.patch(error_on_recompile=True):
                for n in ("r10", "r1", "r5"):  # 9, 1 and 2 pages: the page tensor keeps its shape
                    fm.set_adapter(n)
                    pm.set_adapter(n)
                    torch.testing.assert_close(compiled(x), pm(x), atol=1e-5, rtol=1e-5)
                for names in (["r10", "__base__", "r6", "r0"], ["r3", "r10", "r10", "__base__"]):
                    with fastpeft.mixed_batch(fm, names):
                        got = compiled(x)
                    torch.testing.assert_close(got, pm(x, adapter_names=names), atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] == 2  # the plain and the mixed-batch graph
    finally:
        torch._dynamo.reset()


def test_paged_adalora_layer_matches_peft():
    """AdaLoRA's stacks hold the derived A * E; paged like LoRA's (against PEFT's SVDLinear)."""
    import warnings

    torch.manual_seed(1)
    base = Block().eval()
    ranks = [2, 3, 24, 1, 2, 4, 2, 3, 1, 2, 2, 1]
    cfg = lambda r, inf=True: peft.AdaLoraConfig(init_r=r, target_r=r, total_step=10, target_modules=["q"],  # noqa: E731
                                                 inference_mode=inf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), cfg(ranks[0], False), adapter_name="s0")
        for i, r in enumerate(ranks[1:], 1):
            pm.add_adapter(f"s{i}", cfg(r))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    pm.eval()
    fm = fastpeft.PeftModel(copy.deepcopy(base), fastpeft.AdaLoraConfig(init_r=ranks[0], target_r=ranks[0], total_step=10,
                                                                        target_modules=["q"]), adapter_name="s0")
    for i, r in enumerate(ranks[1:], 1):
        fm.add_adapter(f"s{i}", fastpeft.AdaLoraConfig(init_r=r, target_r=r, total_step=10, target_modules=["q"]))
    fm.load_state_dict(pm.state_dict(), strict=False)
    fm.eval()
    x = torch.randn(3, K)
    for n in ("s2", "s5", "s0"):
        pm.set_adapter(n)
        fm.set_adapter(n)
        with torch.no_grad():
            torch.testing.assert_close(fm(x), pm(x), atol=1e-5, rtol=1e-5)
    layer = _layer(fm)
    assert type(layer).__name__ == "AdaLoraLinear" and layer.bank.page_table is not None
    with torch.no_grad():
        for m in (pm, fm):  # an in-place change of E is seen (the copy in the stacks is rebuilt)
            dict(m.named_parameters())["base_model.model.q.lora_E.s0"].mul_(-2.0)
        torch.testing.assert_close(fm(x), pm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu  # CUDA graphs
def test_cuda_graph_of_a_paged_layer_follows_set_adapter_and_mixed_batch():
    """On a GPU the page slots (not the CPU's one-adapter views) reach the kernels, updated in
    place, so a captured graph replays with the new adapter or the new mixed batch."""
    pm, fm = _models()
    pm.cuda()
    fm.cuda()
    layer = _layer(fm)
    x = torch.randn(4, 3, K, device="cuda")
    with torch.no_grad():
        fm(x)
        assert layer.bank.page_table is not None and layer.bank.page_table.is_cuda
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fm(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fm(x)
        for n in ("r10", "r1", "r6"):
            fm.set_adapter(n)
            pm.set_adapter(n)
            graph.replay()
            torch.testing.assert_close(out, pm(x), atol=1e-4, rtol=1e-4)
        with fastpeft.mixed_batch(fm, ["r10", "r1", "__base__", "r6"]):
            fm(x)
            g2 = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g2):
                out2 = fm(x)
        for names in (["r6", "r10", "r3", "__base__"], ["__base__", "r0", "r10", "r10"]):
            with fastpeft.mixed_batch(fm, names):
                g2.replay()
            torch.testing.assert_close(out2, pm(x, adapter_names=names), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compiled_model_after_the_layer_goes_unpaged():
    """Deleting adapters until the layer is unpaged changes what compiled code reads (page
    slots -> plain slots): one recompilation, and the outputs stay PEFT's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pm, fm = _models()
    model = fm.get_base_model()
    fastpeft.optimize.prepare(model)
    x = torch.randn(4, 3, K)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    try:
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), pm(x), atol=1e-5, rtol=1e-5)
            for n in NAMES[:-2]:
                pm.delete_adapter(n)
                fm.delete_adapter(n)
            for m in (pm, fm):
                m.set_adapter("r11")
            fastpeft.optimize.prepare(model)
            assert _layer(fm).bank.page_table is None
            torch.testing.assert_close(compiled(x), pm(x), atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] == 2
    finally:
        torch._dynamo.reset()
