"""Hot-swapping (fastpeft/hotswap.py) against the real peft: adapter A loaded in fastpeft, adapter
B swapped in, outputs equal to peft's model that loaded B directly (and to peft's own hot-swap);
in place (no repack) when the new rank fits, no recompilation after preparation, errors leave
the model bit-identical."""

import warnings

import peft
import pytest
import torch
import torch._dynamo
from peft.utils.hotswap import hotswap_adapter as peft_hotswap_adapter

import fastpeft
from fastpeft.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict, prepare_model_for_compiled_hotswap
from fastpeft.nn import LoraEmbedding, LoraLinear

from models import fresh_copy, logits, randomize_adapters, tiny

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]
EMB = ["q_proj", "embed_tokens"]
CONFIGS = {  # name -> (peft config, seed of the random weights)
    "A": (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), 1),
    "B": (lambda: peft.LoraConfig(r=2, lora_alpha=5, rank_pattern={"v_proj": 3}, target_modules=TARGETS), 2),
    "B2": (lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=TARGETS), 14),  # no pattern
    "C": (lambda: peft.LoraConfig(r=8, lora_alpha=3, target_modules=TARGETS), 3),
    "extra": (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS + ["o_proj"]), 4),
    "subset": (lambda: peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"]), 5),
    "rslora": (lambda: peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, alpha_pattern={"down_proj": 2},
                                       target_modules=TARGETS), 6),
    "other": (lambda: peft.LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "up_proj"]), 7),
    "dora_a": (lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "gate_proj"]), 8),
    "dora_b": (lambda: peft.LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=["q_proj", "gate_proj"]), 9),
    "dora_q": (lambda: peft.LoraConfig(r=2, lora_alpha=5, use_dora=True, target_modules=["q_proj", "gate_proj"],
                                       layers_to_transform=[0]), 15),  # layer 1 not targeted: zeroed, g = 1
    "r16": (lambda: peft.LoraConfig(r=16, lora_alpha=8, target_modules=TARGETS), 10),
    # embeddings (peft's own hotswap cannot swap them: it takes 'model' for the layer of
    # '...embed_tokens.lora_embedding_A.default'); saved with the embedding's base weights
    "emb4": (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=EMB), 11),
    "emb2": (lambda: peft.LoraConfig(r=2, lora_alpha=3, target_modules=EMB), 12),
    "emb8": (lambda: peft.LoraConfig(r=8, lora_alpha=4, target_modules=EMB), 13),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The pristine tiny llama, the inputs, a folder per adapter saved by peft, and a cache of
    peft's logits for each adapter loaded directly."""
    base, inputs = tiny("llama")
    root = tmp_path_factory.mktemp("hotswap")
    dirs = {}
    for name, (make, seed) in CONFIGS.items():
        pm = peft.get_peft_model(fresh_copy(base), make())
        randomize_adapters(pm, seed=seed)
        dirs[name] = str(root / name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Setting `save_embedding_layers` to `True`"
            pm.save_pretrained(dirs[name])
    cache = {}

    def expected(name, kw_key="kw"):
        if (name, kw_key) not in cache:
            pm = peft.PeftModel.from_pretrained(fresh_copy(base), dirs[name]).eval()
            cache[(name, kw_key)] = logits(pm, KW[kw_key])
        return cache[(name, kw_key)]

    KW = {"kw": inputs(batch=2, seq=6), "mixed": inputs(batch=4, seq=5, seed=2)}
    return dict(base=base, dirs=dirs, kw=KW["kw"], KW=KW, expected=expected)


def _fast(world, name="A"):
    fm = fastpeft.PeftModel.from_pretrained(fresh_copy(world["base"]), world["dirs"][name])
    logits(fm, world["kw"])  # packed (and the eager plans built) before the swap
    return fm


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (LoraLinear, LoraEmbedding))]


def _stacks(model):
    """Every layer's stacks (object and storage): equal before and after a swap done in place."""
    return [(m.bank.a, m.bank.bt, m.bank.scales, m.bank.a.data_ptr(), m.bank.bt.data_ptr()) for m in _layers(model)]


def _snapshot(model):
    """Everything a failed swap must leave as it was (bit for bit)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    banks = [(m.bank.a.clone(), m.bank.bt.clone(), m.bank.scales.clone(), m.bank.stale, dict(m.scaling), dict(m.r))
             for m in _layers(model)]
    cfg = {n: c.to_dict() for n, c in model.peft_config.items()}
    return sd, banks, cfg


def _assert_same(model, snap):
    sd, banks, cfg = snap
    now = model.state_dict()
    assert set(now) == set(sd)
    for k, v in sd.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), k
    for m, (a, bt, sc, stale, scaling, r) in zip(_layers(model), banks, strict=True):
        assert torch.equal(m.bank.a, a) and torch.equal(m.bank.bt, bt) and torch.equal(m.bank.scales, sc)
        assert (m.bank.stale, m.scaling, m.r) == (stale, scaling, r)
    assert {n: c.to_dict() for n, c in model.peft_config.items()} == cfg


def _close(got, exp):
    torch.testing.assert_close(got, exp, atol=ATOL, rtol=1e-5)
    return (got - exp).abs().max().item()


def test_load_adapter_hotswap_smaller_rank_in_place_equals_peft(world, tmp_path):
    fm = _fast(world, "A")
    before = _stacks(fm)
    fm.load_adapter(world["dirs"]["B"], "default", hotswap=True)
    _close(logits(fm, world["kw"]), world["expected"]("B"))
    # (peft's own hotswap differs here: it matches rank_pattern against '...v_proj.lora_A.default.weight',
    # which never matches, so v_proj gets alpha / r instead of alpha / 3; see the test below)
    # in place: same stacks, same storage, nothing stale (also after the forward)
    after = _stacks(fm)
    assert all(x[0] is y[0] and x[1] is y[1] and x[2] is y[2] and x[3:] == y[3:] for x, y in zip(before, after, strict=True))
    assert not any(m.bank.stale for m in _layers(fm))
    q = fm.base_model.model.model.layers[0].self_attn.q_proj
    v = fm.base_model.model.model.layers[0].self_attn.v_proj
    assert q.lora_A["default"].weight.shape == (2, 32) and v.lora_B["default"].weight.shape == (16, 3)
    assert q.scaling["default"] == 2.5 and v.scaling["default"] == 5 / 3 and q.r["default"] == 2
    assert fm.peft_config["default"].r == 2 and fm.peft_config["default"].lora_alpha == 5
    # the model's adapter is now B's: state dict as peft's B, and a save loads back in peft
    pb = peft.PeftModel.from_pretrained(fresh_copy(world["base"]), world["dirs"]["B"])
    ours, theirs = fm.state_dict(), pb.state_dict()
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=0, rtol=0, msg=k)
    fm.save_pretrained(str(tmp_path))
    back = peft.PeftModel.from_pretrained(fresh_copy(world["base"]), str(tmp_path)).eval()
    _close(logits(back, world["kw"]), world["expected"]("B"))


def test_same_as_peft_own_hotswap_without_patterns(world):
    fm = _fast(world, "A")
    fastpeft.hotswap_adapter(fm, world["dirs"]["B2"], "default", torch_device="cpu")  # the top-level name
    pm = peft.PeftModel.from_pretrained(fresh_copy(world["base"]), world["dirs"]["A"]).eval()
    peft_hotswap_adapter(pm, world["dirs"]["B2"], "default", torch_device="cpu")
    _close(logits(fm, world["kw"]), logits(pm, world["kw"]))
    _close(logits(fm, world["kw"]), world["expected"]("B2"))


def test_larger_rank_without_preparation_grows_as_peft(world):
    """PEFT 0.21 grows the tensors (torch.utils.swap_tensors); fastpeft gives the parameters new
    storage and repacks at the next forward."""
    fm = _fast(world, "A")
    hotswap_adapter(fm, world["dirs"]["C"], "default")
    _close(logits(fm, world["kw"]), world["expected"]("C"))
    pm = peft.PeftModel.from_pretrained(fresh_copy(world["base"]), world["dirs"]["A"]).eval()
    peft_hotswap_adapter(pm, world["dirs"]["C"], "default", torch_device="cpu")
    _close(logits(fm, world["kw"]), logits(pm, world["kw"]))
    q = fm.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.shape == (8, 32) and q.bank.a.shape[1] == 8
    # and back to a smaller one: in place in the (now wider) stacks
    before = _stacks(fm)
    hotswap_adapter(fm, world["dirs"]["A"], "default")
    _close(logits(fm, world["kw"]), world["expected"]("A"))
    assert all(x[0] is y[0] and x[3:] == y[3:] for x, y in zip(before, _stacks(fm), strict=True))


def test_mixin_load_adapter_hotswap(world):
    mm = fastpeft.with_adapters(fresh_copy(world["base"]))
    mm.load_adapter(world["dirs"]["A"])
    logits(mm, world["kw"])
    mm.load_adapter(world["dirs"]["B"], hotswap=True)
    _close(logits(mm, world["kw"]), world["expected"]("B"))
    assert mm.peft_config["default"].r == 2


def test_embedding_smaller_then_larger(world):
    """LoRA on embed_tokens; the files hold the embedding's base weights too (equal to the model's)."""
    mm = fastpeft.with_adapters(fresh_copy(world["base"]))
    mm.load_adapter(world["dirs"]["emb4"])
    logits(mm, world["kw"])
    before = _stacks(mm)
    hotswap_adapter(mm, world["dirs"]["emb2"], "default")
    _close(logits(mm, world["kw"]), world["expected"]("emb2"))
    assert all(x[0] is y[0] and x[3:] == y[3:] for x, y in zip(before, _stacks(mm), strict=True))
    hotswap_adapter(mm, world["dirs"]["emb8"], "default")
    _close(logits(mm, world["kw"]), world["expected"]("emb8"))
    assert mm.model.embed_tokens.lora_embedding_A["default"].shape == (8, 96)


def test_scaling_from_new_config_rslora_alpha_pattern_and_subset(world, tmp_path):
    """use_rslora / alpha_pattern differ (peft refuses them; fastpeft swaps the scaling), and a
    new adapter targeting fewer modules: the others add nothing (zeroed, as peft)."""
    fm = _fast(world, "A")
    hotswap_adapter(fm, world["dirs"]["rslora"], "default")
    _close(logits(fm, world["kw"]), world["expected"]("rslora"))
    hotswap_adapter(fm, world["dirs"]["subset"], "default")
    _close(logits(fm, world["kw"]), world["expected"]("subset"))
    v = fm.base_model.model.model.layers[0].self_attn.v_proj
    assert v.lora_A["default"].weight.abs().sum() == 0 and v.r["default"] == 2
    fm.save_pretrained(str(tmp_path))  # the model's layers, the new ranks and scalings: loads back the same
    back = fastpeft.PeftModel.from_pretrained(fresh_copy(world["base"]), str(tmp_path))
    _close(logits(back, world["kw"]), world["expected"]("subset"))


def test_dora_rank_change(world):
    fm = _fast(world, "dora_a")
    g = fm.base_model.model.model.layers[0].self_attn.q_proj.bank.dora[1]
    hotswap_adapter(fm, world["dirs"]["dora_b"], "default")
    q = fm.base_model.model.model.layers[0].self_attn.q_proj
    assert q.bank.dora[1] is g and not q.bank.stale  # DoRA's scale recomputed into the same tensor
    _close(logits(fm, world["kw"]), world["expected"]("dora_b"))
    hotswap_adapter(fm, world["dirs"]["dora_q"], "default")
    _close(logits(fm, world["kw"]), world["expected"]("dora_q"))


def test_mixed_batch_after_swap(world):
    fm = _fast(world, "A")
    fm.load_adapter(world["dirs"]["other"], "other")
    kw = world["KW"]["mixed"]
    names = ["other", "default", "__base__", "default"]
    with torch.no_grad():
        fm(**kw, adapter_names=names)  # mixed-batch plans exist before the swap
        with torch.inference_mode():
            fm.load_adapter(world["dirs"]["B"], "default", hotswap=True)
        got = fm(**kw, adapter_names=names).logits
    pm = peft.PeftModel.from_pretrained(fresh_copy(world["base"]), world["dirs"]["B"])
    pm.load_adapter(world["dirs"]["other"], "other")
    pm.eval()
    with torch.no_grad():
        exp = pm(**kw, adapter_names=names).logits
    _close(got, exp)


def test_from_state_dict_with_peft_keys(world):
    from peft.utils.save_and_load import _insert_adapter_name_into_state_dict, load_peft_weights

    fm = _fast(world, "A")
    sd = _insert_adapter_name_into_state_dict(load_peft_weights(world["dirs"]["B"], device="cpu"), "default", "lora_")
    config = peft.LoraConfig.from_pretrained(world["dirs"]["B"])  # peft's config is accepted too
    hotswap_adapter_from_state_dict(fm, sd, "default", config)
    _close(logits(fm, world["kw"]), world["expected"]("B"))
    with pytest.raises(ValueError, match="parameter_prefix"):
        hotswap_adapter_from_state_dict(fm, sd, "default", config, parameter_prefix="ia3_")


def _error_cases():
    def prepared_too_small(fm, dirs):
        prepare_model_for_compiled_hotswap(fm, target_rank=4)
        return dirs["C"], "default", {}

    return {
        "extra-target": (lambda fm, dirs: (dirs["extra"], "default", {}), RuntimeError, "unexpected keys found"),
        "unknown-name": (lambda fm, dirs: (dirs["B"], "nope", {}), ValueError, "unknown adapter 'nope'"),
        "dora-mismatch": (lambda fm, dirs: (dirs["dora_b"], "default", {}), ValueError, "use_dora"),
        "bad-kwarg": (lambda fm, dirs: (dirs["B"], "default", {"low_cpu_mem_usage": True}), TypeError, "low_cpu_mem_usage"),
        "above-target-rank": (prepared_too_small, ValueError, "target_rank 4"),
        "merged": (lambda fm, dirs: (fm.merge_adapter(), (dirs["B"], "default", {}))[1], ValueError, "merged"),
    }


@pytest.mark.parametrize("case", sorted(_error_cases()))
def test_errors_leave_model_bit_identical(world, case):
    setup, exc, match = _error_cases()[case]
    fm = _fast(world, "A")
    path, name, kwargs = setup(fm, world["dirs"])
    logits(fm, world["kw"])
    snap, out = _snapshot(fm), logits(fm, world["kw"])
    with pytest.raises(exc, match=match):
        hotswap_adapter(fm, path, name, **kwargs)
    _assert_same(fm, snap)
    torch.testing.assert_close(logits(fm, world["kw"]), out, atol=0, rtol=0)


def test_prepare_checks_and_config():
    base, _ = tiny("llama")
    fm = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="check_compiles"):
        prepare_model_for_compiled_hotswap(fm, check_compiled="maybe")
    with pytest.raises(ValueError, match="original rank is larger"):
        prepare_model_for_compiled_hotswap(fm, target_rank=2)
    with pytest.raises(ValueError, match="own peft_config"):
        prepare_model_for_compiled_hotswap(fm, target_rank=8, config=fm.peft_config)
    fm.base_model.model.compile(backend="eager")
    with pytest.raises(ValueError, match="before"):
        prepare_model_for_compiled_hotswap(fm, target_rank=8)
    later = fastpeft.LoraConfig(r=4, rank_pattern={"q_proj": 2}, target_modules=["q_proj"])
    with pytest.warns(UserWarning, match="already compiled"):
        prepare_model_for_compiled_hotswap(fm, target_rank=8, config=later, check_compiled="warn")
    assert later.r == 8 and later.rank_pattern == {"q_proj": 8}
    q = fm.base_model.model.model.layers[0].self_attn.q_proj
    assert q.bank.a.shape[1] == 8 and q.lora_A["default"].weight.shape == (4, 32)
    with pytest.raises(ValueError, match="No adapter layers"):
        prepare_model_for_compiled_hotswap(_no_adapters())


def _no_adapters():
    m = fastpeft.with_adapters(tiny("llama")[0])
    m.peft_config = {"x": fastpeft.LoraConfig(target_modules=["q_proj"])}  # a config but no layer
    return m


def test_peft_hotswap_function_on_fastpeft_model(world):
    """peft's own hotswap_adapter works on a fastpeft PeftModel (it reads active_peft_config)."""
    fm = _fast(world, "A")
    peft_hotswap_adapter(fm, world["dirs"]["B2"], "default", torch_device="cpu")
    _close(logits(fm, world["kw"]), world["expected"]("B2"))
    peft_hotswap_adapter(fm, world["dirs"]["C"], "default", torch_device="cpu")  # larger: repacked
    _close(logits(fm, world["kw"]), world["expected"]("C"))


def test_prepared_compiled_hotswap_no_recompile(world):
    """After prepare_model_for_compiled_hotswap(target_rank=8), swaps of rank 4 and 8 with other
    alphas are written into the same stacks: the compiled model follows them, compiled once."""
    torch._dynamo.reset()
    fm = _fast(world, "B")  # ranks 2 / 3
    prepare_model_for_compiled_hotswap(fm, target_rank=8)
    kw = world["kw"]
    _close(logits(fm, kw), world["expected"]("B"))  # zero padding: same outputs
    stacks = _stacks(fm)
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    model = fm.get_base_model()
    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    try:
        with torch.no_grad():
            _close(compiled(**kw).logits, world["expected"]("B"))
            assert len(compiles) == 1
            with torch._dynamo.config.patch(error_on_recompile=True):
                for name in ("A", "C", "B"):
                    hotswap_adapter(fm, world["dirs"][name], "default")
                    _close(compiled(**kw).logits, world["expected"](name))
        assert len(compiles) == 1  # zero recompilations
        assert all(x[0] is y[0] and x[3:] == y[3:] for x, y in zip(stacks, _stacks(fm), strict=True))
        with pytest.raises(ValueError, match="target_rank 8"):
            hotswap_adapter(fm, world["dirs"]["r16"], "default")
    finally:
        torch._dynamo.reset()


@pytest.mark.gpu  # CUDA graphs
def test_cuda_graph_follows_hotswap(world):
    fm = _fast(world, "B")
    model = fm.get_base_model().cuda()
    prepare_model_for_compiled_hotswap(fm, target_rank=8)
    ids = world["kw"]["input_ids"].cuda()
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                model(input_ids=ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(input_ids=ids, use_cache=False).logits
        for name in ("A", "C"):
            hotswap_adapter(fm, world["dirs"][name], "default")
            graph.replay()
            torch.testing.assert_close(out.cpu(), world["expected"](name), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,kwargs", [("roberta_tok", dict(target_modules=["query", "value"], task_type="TOKEN_CLS")),
                                         ("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True))])
def test_modules_to_save_and_conv1d(arch, kwargs, tmp_path):
    """A task head in modules_to_save is copied in place; Conv1D bases as linear ones."""
    base, inputs = tiny(arch)
    kw, dirs, expected = inputs(), {}, {}
    for name, r, alpha, seed in (("a", 4, 8, 1), ("b", 2, 3, 2)):
        pm = peft.get_peft_model(fresh_copy(base), peft.LoraConfig(r=r, lora_alpha=alpha, **kwargs))
        randomize_adapters(pm, seed=seed)
        pm.eval()
        dirs[name] = str(tmp_path / name)
        pm.save_pretrained(dirs[name])
        expected[name] = logits(pm, kw)
    fm = fastpeft.PeftModel.from_pretrained(fresh_copy(base), dirs["a"])
    _close(logits(fm, kw), expected["a"])
    fm.load_adapter(dirs["b"], "default", hotswap=True)
    _close(logits(fm, kw), expected["b"])
