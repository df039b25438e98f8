"""torch.compile(fullgraph=True) of adapted Transformers models: same outputs as eager, and no
recompilation when switching between loaded adapters or mixed-batch names (the slot tensors and
stacks are graph inputs, not constants). CUDA graphs of decode steps when a GPU is present."""

import copy

import peft
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import fastpeft

from models import logits, randomize_adapters, tiny

pytestmark = pytest.mark.slow  # torch.compile (dynamo, aot_eager, inductor) of whole models

ATOL = 1e-5


def _fastpeft_llama(seed=0):
    base, inputs = tiny("llama", seed=seed)
    fm = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj",
                                                                                            "embed_tokens"]))
    fm.add_adapter("b", fastpeft.LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "o_proj", "gate_proj"]))
    fm.add_adapter("d", fastpeft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["v_proj", "up_proj"]))
    randomize_adapters(fm, seed=7)
    fm.eval()
    return fm, inputs


def _eager(model, kw):
    return logits(model, kw)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_fullgraph_same_outputs_no_recompile_on_switch():
    fm, inputs = _fastpeft_llama()
    model = fm.get_base_model()
    fastpeft.optimize.prepare(model)  # pack the stacks: a compiled forward cannot repack them
    kw = inputs(batch=3, seq=5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**kw).logits, _eager(model, kw), atol=ATOL, rtol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == 1
        with torch._dynamo.config.patch(error_on_recompile=True):
            for name in ("b", "d", "default", "b"):  # one adapter each: same graph
                fm.set_adapter(name)
                torch.testing.assert_close(compiled(**kw).logits, _eager(model, kw), atol=ATOL, rtol=1e-5)
        # a mixed batch is another graph (slots per row), then any names of that length reuse it
        with fastpeft.mixed_batch(fm, ["b", "__base__", "default"]):
            torch.testing.assert_close(compiled(**kw).logits, _eager(model, kw), atol=ATOL, rtol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for names in (["d", "b", "b"], ["default", "d", "__base__"]):
                with fastpeft.mixed_batch(fm, names):
                    got = compiled(**kw).logits
                    exp = _eager(model, kw)
                torch.testing.assert_close(got, exp, atol=ATOL, rtol=1e-5)
                for i, n in enumerate(names):  # and each row is that adapter alone
                    one = {k: v[i:i + 1] for k, v in kw.items()}
                    if n == "__base__":
                        with fm.disable_adapter():
                            ref = _eager(model, one)
                    else:
                        fm.set_adapter(n)
                        ref = _eager(model, one)
                    torch.testing.assert_close(got[i:i + 1], ref, atol=ATOL, rtol=1e-5)
            fm.set_adapter("default")
            torch.testing.assert_close(compiled(**kw).logits, _eager(model, kw), atol=ATOL, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2


def test_fullgraph_after_optimize_of_a_peft_model():
    base, inputs = tiny("llama")
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    pm.add_adapter("other", peft.LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "up_proj"]))
    randomize_adapters(pm, seed=5)
    pm.eval()
    kw = inputs(batch=2, seq=6)
    expected = {}
    for n in ("default", "other"):
        pm.set_adapter(n)
        expected[n] = logits(pm, kw)
    fastpeft.optimize(pm)
    model = pm.get_base_model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for n in ("default", "other", "default"):
            pm.set_adapter(n)
            torch.testing.assert_close(compiled(**kw).logits, expected[n], atol=ATOL, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


def test_inductor_matches_eager():
    """The default backend (Inductor, C++ codegen on the CPU): one graph, mixed batch included."""
    fm, inputs = _fastpeft_llama(seed=1)
    model = fm.get_base_model()
    fastpeft.optimize.prepare(model)
    kw = inputs(batch=2, seq=4)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad(), fastpeft.mixed_batch(fm, ["d", "b"]):
        got = compiled(**kw).logits
        exp = _eager(model, kw)
        torch.testing.assert_close(got, exp, atol=1e-4, rtol=1e-4)
        with torch._dynamo.config.patch(error_on_recompile=True), fastpeft.mixed_batch(fm, ["b", "default"]):
            torch.testing.assert_close(compiled(**kw).logits, _eager(model, kw), atol=1e-4, rtol=1e-4)


def test_compiled_path_with_stale_stacks_still_correct():
    """Compiling before any forward (stacks not packed yet): the unfused path is traced."""
    fm, inputs = _fastpeft_llama(seed=2)
    model = fm.get_base_model()
    kw = inputs(batch=2, seq=3)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**kw).logits, _eager(model, kw), atol=ATOL, rtol=1e-5)


def test_slot_tensors_keep_their_memory_across_switches():
    """What CUDA graphs need (checked on any device): the tensors a captured forward reads, the
    active slots and the per-row slots of a mixed batch (also the per-shape ones derived from
    them), are updated in place by set_adapter / mixed_batch, never replaced."""
    fm, inputs = _fastpeft_llama(seed=4)
    model = fm.get_base_model()
    layer = model.model.layers[0].self_attn.q_proj
    kw = inputs(batch=3, seq=4)
    act = layer.bank.active
    ptr = act.data_ptr()
    for name in ("b", "d", "default"):
        fm.set_adapter(name)
        assert layer.bank.active is act and act.data_ptr() == ptr
        assert act.tolist() == [[layer.slot_of(name)]]
    with fastpeft.mixed_batch(fm, ["b", "d", "__base__"]):
        logits(model, kw)
        ts = layer.token_slots(12, 3)
        ts_ptr = ts.data_ptr()
    for names in (["d", "default", "b"], ["__base__", "b", "d"]):
        with fastpeft.mixed_batch(fm, names):
            got = layer.token_slots(12, 3)
            assert got is ts and got.data_ptr() == ts_ptr
            assert got.flatten().tolist() == [layer.slot_of(n) for n in names for _ in range(4)]
            torch.testing.assert_close(logits(model, kw), _rows_alone(fm, model, kw, names), atol=ATOL, rtol=1e-5)


def _rows_alone(fm, model, kw, names):
    outs = []
    for i, n in enumerate(names):
        one = {k: v[i:i + 1] for k, v in kw.items()}
        if n == "__base__":
            with fm.disable_adapter():
                outs.append(_eager(model, one))
        else:
            with fastpeft.mixed_batch(fm, [n]):
                outs.append(_eager(model, one))
    return torch.cat(outs)


@pytest.mark.gpu  # CUDA graphs
def test_cuda_graph_step_follows_set_adapter_and_mixed_batch():
    """A model step (a short batch of tokens) captured once into a CUDA graph is replayed after
    set_adapter / a new mixed batch of the same size: the slot tensors are updated in place, so
    the captured kernels read the new slots; torch.compile's CUDA graphs (reduce-overhead) too."""
    fm, inputs = _fastpeft_llama(seed=3)
    model = fm.get_base_model().cuda()
    fastpeft.optimize.prepare(model)
    ids = inputs(batch=3, seq=4)["input_ids"].cuda()

    def step():
        return model(input_ids=ids, use_cache=False).logits

    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for name in ("b", "d", "default"):
            fm.set_adapter(name)
            graph.replay()
            torch.testing.assert_close(out, step(), atol=1e-4, rtol=1e-4)
        with fastpeft.mixed_batch(fm, ["b", "d", "__base__"]):
            step()
            g2 = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g2):
                out2 = step()
        for names in (["d", "default", "b"], ["__base__", "b", "d"]):
            with fastpeft.mixed_batch(fm, names):
                g2.replay()
                torch.testing.assert_close(out2, step(), atol=1e-4, rtol=1e-4)
        fm.set_adapter("default")
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for name in ("default", "b", "default", "d"):
            fm.set_adapter(name)
            for _ in range(3):  # warm-up runs, then the recorded graph replays
                got = compiled(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(got, step(), atol=1e-3, rtol=1e-3)


def test_ia3_fullgraph_no_recompile_on_switch_mixed_and_add():
    """IA3 layers under torch.compile read a stack of scales through the slot tensors: the same
    graph serves every single adapter (and several active ones of the same count), mixed
    batches of one size, and adapters added later (after prepare); outputs equal eager and
    PEFT's."""
    base, inputs = tiny("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                                 feedforward_modules=["down_proj"]))
    pm.add_adapter("b", peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    pm.add_adapter("c", peft.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    randomize_adapters(pm, seed=11)
    pm.eval()
    fm = fastpeft.get_peft_model(base, fastpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                         feedforward_modules=["down_proj"]))
    fm.add_adapter("b", fastpeft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    fm.add_adapter("c", fastpeft.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    fm.load_state_dict(pm.state_dict())
    fm.eval()
    model = fm.get_base_model()
    fastpeft.optimize.prepare(model)
    kw = inputs(batch=3, seq=4)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**kw).logits, logits(pm, kw), atol=ATOL, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] == 1
        with torch._dynamo.config.patch(error_on_recompile=True):
            for name in ("b", "c", "default"):
                fm.set_adapter(name)
                pm.set_adapter(name)
                torch.testing.assert_close(compiled(**kw).logits, logits(pm, kw), atol=ATOL, rtol=1e-5)
                torch.testing.assert_close(compiled(**kw).logits, _eager(model, kw), atol=0, rtol=0)
            # an in-place update of a scale (the parameters view the stack) is seen
            for m in (pm, fm):
                m.base_model.model.model.layers[0].mlp.down_proj.ia3_l["default"].mul_(1.5)
            torch.testing.assert_close(compiled(**kw).logits, logits(pm, kw), atol=ATOL, rtol=1e-5)
        def per_row(names):  # PEFT, one row at a time with that row's adapter
            out = []
            for i, n in enumerate(names):
                one = {k: v[i:i + 1] for k, v in kw.items()}
                if n == "__base__":
                    with pm.disable_adapter():
                        out.append(logits(pm, one))
                else:
                    pm.set_adapter(n)
                    out.append(logits(pm, one))
            return torch.cat(out)

        names = ["c", "__base__", "b"]
        with fastpeft.mixed_batch(fm, names):  # another graph (per-row scales) ...
            got = compiled(**kw).logits
        torch.testing.assert_close(got, per_row(names), atol=ATOL, rtol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            names = ["default", "c", "c"]  # ... re-used by other names of that length
            with fastpeft.mixed_batch(fm, names):
                got = compiled(**kw).logits
                torch.testing.assert_close(got, _eager(model, kw), atol=0, rtol=0)
            torch.testing.assert_close(got, per_row(names), atol=ATOL, rtol=1e-5)
            # a new adapter: one more slot (a dynamic size), packed eagerly by prepare
            cfg = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
            pm.add_adapter("new", peft.IA3Config(**cfg))
            fm.add_adapter("new", fastpeft.IA3Config(**cfg))
            randomize_adapters(pm, seed=12)
            fm.load_state_dict(pm.state_dict())
            fastpeft.optimize.prepare(model)
            fm.set_adapter("new")
            pm.set_adapter("new")
            torch.testing.assert_close(compiled(**kw).logits, logits(pm, kw), atol=ATOL, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2
