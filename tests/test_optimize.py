"""fastpeft.optimize on models adapted by the peft library itself (and by Transformers'
load_adapter): same weights (object identity), same adapters and state, same outputs, and PEFT's
and Transformers' API keeps working on the optimized model."""
import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.nn import AdapterLayer

from models import fresh_copy, logits, randomize_adapters, tiny
from peers import needs_transformers_peft

ATOL = 1e-5

# name -> (arch, [(adapter name, config factory)], mixed names or None (PEFT cannot mix it))
CASES = {
    "llama-lora-dora-rslora": ("llama", [
        ("default", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
        ("dora", lambda: peft.LoraConfig(r=6, lora_alpha=3, use_dora=True, target_modules=["q_proj", "up_proj"])),
        ("rs", lambda: peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules="all-linear",
                                       rank_pattern={"k_proj": 3})),
    ], None),
    "llama-lora-mixed": ("llama", [
        ("default", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
        ("b", lambda: peft.LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "o_proj", "gate_proj"])),
        ("bias", lambda: peft.LoraConfig(r=2, lora_bias=True, target_modules=["v_proj"])),
        ("emb", lambda: peft.LoraConfig(r=3, target_modules=["embed_tokens", "k_proj"])),
    ], ["b", "__base__", "default", "emb", "bias"]),
    "gpt2-conv1d-lora-dora": ("gpt2", [
        ("default", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
        ("d", lambda: peft.LoraConfig(r=4, use_dora=True, target_modules=["c_proj"], fan_in_fan_out=True)),
    ], None),
    "gpt2-conv1d-mixed": ("gpt2", [
        ("default", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
        ("x", lambda: peft.LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True)),
    ], ["x", "default", "__base__"]),
    "roberta-tok-modules-to-save": ("roberta_tok", [
        ("default", lambda: peft.LoraConfig(r=4, target_modules=["query", "word_embeddings"], task_type="TOKEN_CLS")),
        ("b", lambda: peft.LoraConfig(r=3, target_modules=["value", "word_embeddings"], task_type="TOKEN_CLS")),
    ], ["b", "default", "__base__"]),
    "t5-lora": ("t5", [
        ("default", lambda: peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q", "v", "wi"], task_type="SEQ_2_SEQ_LM")),
        ("o", lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k", "wo"], task_type="SEQ_2_SEQ_LM")),
    ], ["o", "default"]),
    "llama-ia3": ("llama", [
        ("default", lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
        ("i2", lambda: peft.IA3Config(target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"])),
    ], None),
    "gpt2-ia3": ("gpt2", [
        ("default", lambda: peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                           fan_in_fan_out=True)),
    ], None),
    "llama-adalora": ("llama", [
        ("default", lambda: peft.AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               total_step=10)),
    ], None),
}


def _peft_model(case, seed=3):
    arch, adapters, mixed = CASES[case]
    base, inputs = tiny(arch)
    pristine = fresh_copy(base)
    (first, make), rest = adapters[0], adapters[1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, make(), adapter_name=first)
        for name, make in rest:
            pm.add_adapter(name, make())
    randomize_adapters(pm, seed=seed)
    pm.eval()
    return pm, pristine, inputs, [a for a, _ in adapters], mixed


def _outputs(pm, kw, names, mixed):
    """Everything we compare: each adapter alone, all together, disabled, mixed batch."""
    out = {}
    for n in names:
        pm.set_adapter(n)
        out[n] = logits(pm, kw)
    if len(names) > 1 and not pm.peft_config[names[0]].modules_to_save:
        pm.base_model.set_adapter(names)
        out["all"] = logits(pm, kw)
    with pm.disable_adapter():
        out["disabled"] = logits(pm, kw)
    pm.set_adapter(names[0])
    if mixed is not None:
        with torch.no_grad():
            out["mixed"] = pm(**kw, adapter_names=mixed).logits
    return out


def _peft_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [type(m).__name__ for m in model.modules()
            if isinstance(m, BaseTunerLayer) and not isinstance(m, AdapterLayer)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_optimize_keeps_weights_state_and_outputs(case):
    pm, _, inputs, names, mixed = _peft_model(case)
    batch = len(mixed) if mixed else 3
    kw = inputs(batch=batch, seq=6)
    expected = _outputs(pm, kw, names, mixed)
    base_ptrs = {n: p.data_ptr() for n, p in pm.named_parameters() if "lora_" not in n and "ia3_" not in n}
    params = dict(pm.named_parameters())
    grads = {n: p.requires_grad for n, p in params.items()}
    sd = {k: v.clone() for k, v in pm.state_dict().items()}
    adapter_layers_before = len(_peft_layers(pm))

    assert fastpeft.optimize(pm) is pm

    # every supported PEFT layer replaced, PEFT's ModulesToSaveWrapper kept
    assert _peft_layers(pm) == []
    layers = [m for m in pm.modules() if isinstance(m, AdapterLayer)]
    assert len(layers) == adapter_layers_before
    # the same parameter objects under the same names, base storage untouched, same flags
    after = dict(pm.named_parameters())
    assert set(after) == set(params)
    for n, p in after.items():
        assert p is params[n], n
        assert p.requires_grad == grads[n], n
        if n in base_ptrs:
            assert p.data_ptr() == base_ptrs[n], n
    sd2 = pm.state_dict()
    assert set(sd2) == set(sd)
    for k in sd:
        torch.testing.assert_close(sd2[k], sd[k], atol=0, rtol=0, msg=k)
    # same outputs for every adapter, all together, disabled and mixed
    got = _outputs(pm, kw, names, mixed)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=ATOL, rtol=1e-5, msg=k)
    assert pm.active_adapters == [names[0]]


def test_lora_params_alias_the_stacks_no_double_memory():
    pm, _, inputs, names, _ = _peft_model("llama-lora-mixed")
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    A = q.lora_A["default"].weight
    fastpeft.optimize(pm)
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight is A
    s = q.slot_of("default")
    assert A.data_ptr() == q.bank.a[s].data_ptr()  # PEFT's parameter now views the stack
    # an in-place update (optimizer step) is seen by the fused path without repacking
    kw = inputs()
    with torch.no_grad():
        A.mul_(2.0)
    got = logits(pm, kw)
    fresh = copy.deepcopy(pm)
    for m in fresh.modules():
        if isinstance(m, AdapterLayer):
            m.bank.mark_stale()
    torch.testing.assert_close(got, logits(fresh, kw), atol=ATOL, rtol=1e-5)


def test_optimized_save_loads_in_peft(tmp_path):
    pm, pristine, inputs, names, mixed = _peft_model("llama-lora-mixed")
    kw = inputs(batch=5, seq=4)
    fastpeft.optimize(pm)
    pm.set_adapter("b")
    expected = logits(pm, kw)
    pm.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path / "b"), adapter_name="b").eval()
    torch.testing.assert_close(logits(loaded, kw), expected, atol=ATOL, rtol=1e-5)
    # and in fastpeft
    fm = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path / "b"), adapter_name="b")
    torch.testing.assert_close(logits(fm, kw), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("how", ["add_adapter", "load_adapter"])
def test_adapters_added_by_peft_after_optimize(how, tmp_path):
    """PEFT's injection finds the fastpeft layer (a virtual LoraLayer) and calls update_layer."""
    pm, pristine, inputs, names, _ = _peft_model("llama-lora-mixed")
    ref = copy.deepcopy(pm)  # stays PEFT
    kw = inputs(batch=3, seq=5)
    fastpeft.optimize(pm)
    new_cfg = peft.LoraConfig(r=5, lora_alpha=10, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"])
    if how == "add_adapter":
        for model in (ref, pm):
            model.add_adapter("new", copy.deepcopy(new_cfg))
        src = dict(ref.named_parameters())
        with torch.no_grad():  # same random values in both
            g = torch.Generator().manual_seed(0)
            for n, p in src.items():
                if ".new" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1 if "magnitude" in n else 0))
            for n, p in pm.named_parameters():
                if ".new" in n:
                    p.copy_(src[n])
    else:
        other, _, _, _, _ = _peft_model("llama-lora-mixed", seed=9)
        other.add_adapter("new", copy.deepcopy(new_cfg))
        randomize_adapters(other, seed=4)
        other.save_pretrained(str(tmp_path), selected_adapters=["new"])
        for model in (ref, pm):
            model.load_adapter(str(tmp_path / "new"), adapter_name="new")
    assert _peft_layers(pm) == []  # no PEFT layer came back
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert "new" in q._adapters and isinstance(q, AdapterLayer)
    for model in (ref, pm):
        model.eval()
        model.set_adapter("new")
    torch.testing.assert_close(logits(pm, kw), logits(ref, kw), atol=ATOL, rtol=1e-5)
    names = ["new", "default", "__base__"]
    with torch.no_grad():
        got = pm(**kw, adapter_names=names).logits
    # PEFT refuses DoRA in mixed batches; compare with each row alone
    for i, n in enumerate(names):
        row = {k: v[i:i + 1] for k, v in kw.items()}
        if n == "__base__":
            with ref.disable_adapter():
                exp = logits(ref, row)
        else:
            ref.set_adapter(n)
            exp = logits(ref, row)
        torch.testing.assert_close(got[i:i + 1], exp, atol=ATOL, rtol=1e-5)


def test_delete_merge_unmerge_and_unload_follow_peft():
    pm, _, inputs, names, _ = _peft_model("llama-lora-mixed")
    ref = copy.deepcopy(pm)
    fastpeft.optimize(pm)
    kw = inputs()
    for model in (ref, pm):
        model.base_model.set_adapter(["b", "default"])
        model.delete_adapter("b")  # active: PEFT keeps the remaining active one
    assert pm.active_adapters == ref.active_adapters == ["default"]
    torch.testing.assert_close(logits(pm, kw), logits(ref, kw), atol=ATOL, rtol=1e-5)
    for model in (ref, pm):
        model.delete_adapter("default")  # PEFT picks the first adapter left, sorted
    assert pm.active_adapters == ref.active_adapters
    torch.testing.assert_close(logits(pm, kw), logits(ref, kw), atol=ATOL, rtol=1e-5)
    for model in (ref, pm):
        model.set_adapter("emb")
        model.merge_adapter()
    torch.testing.assert_close(logits(pm, kw), logits(ref, kw), atol=ATOL, rtol=1e-5)
    # (PEFT's own adapter_names= path leaks its forward hooks when a layer raises: use ours)
    with pytest.raises(ValueError, match="merged"):
        with fastpeft.mixed_batch(pm, ["emb", "__base__"]):
            logits(pm, kw)
    for model in (ref, pm):
        model.unmerge_adapter()
    torch.testing.assert_close(logits(pm, kw), logits(ref, kw), atol=ATOL, rtol=1e-5)
    merged_ref, merged = ref.merge_and_unload(), pm.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, kw), logits(merged_ref, kw), atol=ATOL, rtol=1e-5)


def test_merged_layers_are_refused_and_model_untouched():
    pm, _, inputs, _, _ = _peft_model("llama-lora-mixed")
    pm.merge_adapter()
    kw = inputs()
    before = logits(pm, kw)
    with pytest.raises(ValueError, match="unmerge_adapter"):
        fastpeft.optimize(pm)
    assert _peft_layers(pm)  # nothing replaced
    torch.testing.assert_close(logits(pm, kw), before, atol=0, rtol=0)
    pm.unmerge_adapter()
    fastpeft.optimize(pm)
    assert _peft_layers(pm) == []


def test_unsupported_layers_left_with_warning_or_strict_error():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.lin = nn.Linear(4, 5)

        def forward(self, x):
            return self.lin(self.conv(x).mean((2, 3)))

    torch.manual_seed(0)
    pm = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["conv", "lin"]))
    randomize_adapters(pm)
    pm.eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = pm(x)
    with pytest.raises(ValueError, match="strict"):
        fastpeft.optimize(pm, strict=True)
    assert _peft_layers(pm) == ["Conv2d", "Linear"]
    with pytest.warns(UserWarning, match="conv"):
        fastpeft.optimize(pm)
    assert _peft_layers(pm) == ["Conv2d"]
    with torch.no_grad():
        torch.testing.assert_close(pm(x), expected, atol=ATOL, rtol=1e-5)
        with pm.disable_adapter():
            base = pm(x)
    assert not torch.allclose(base, expected)


@needs_transformers_peft  # Transformers' own load_adapter checks peft's version
def test_transformers_load_adapter_then_optimize(tmp_path):
    pm, pristine, inputs, names, mixed = _peft_model("llama-lora-mixed")
    pm.save_pretrained(str(tmp_path))
    kw = inputs(batch=len(mixed), seq=5)
    ref = fresh_copy(pristine)
    ref.load_adapter(str(tmp_path), adapter_name="default")
    ref.load_adapter(str(tmp_path / "b"), adapter_name="b")
    ref.load_adapter(str(tmp_path / "emb"), adapter_name="emb")
    model = copy.deepcopy(ref)
    w = model.model.layers[0].self_attn.q_proj.base_layer.weight
    fastpeft.optimize(model)
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight is w
    assert _peft_layers(model) == []
    for m in (ref, model):
        m.set_adapter("b")
    assert model.active_adapters() == ref.active_adapters() == ["b"]
    torch.testing.assert_close(logits(model, kw), logits(ref, kw), atol=ATOL, rtol=1e-5)
    for m in (ref, model):
        m.disable_adapters()
    torch.testing.assert_close(logits(model, kw), logits(ref, kw), atol=ATOL, rtol=1e-5)
    for m in (ref, model):
        m.enable_adapters()
        m.set_adapter(["default", "emb"])
    assert model.active_adapters() == ["default", "emb"]
    torch.testing.assert_close(logits(model, kw), logits(ref, kw), atol=ATOL, rtol=1e-5)
    # a mixed batch through fastpeft on the Transformers model: each row as its adapter alone
    rows = ["b", "__base__", "default", "emb", "b"]
    with fastpeft.mixed_batch(model, rows):
        got = logits(model, kw)
    for i, n in enumerate(rows):
        one = {k: v[i:i + 1] for k, v in kw.items()}
        if n == "__base__":
            ref.disable_adapters()
            exp = logits(ref, one)
            ref.enable_adapters()
        else:
            ref.set_adapter(n)
            exp = logits(ref, one)
        torch.testing.assert_close(got[i:i + 1], exp, atol=ATOL, rtol=1e-5)
    # and a later transformers load_adapter lands in the fastpeft layers
    model.load_adapter(str(tmp_path / "b"), adapter_name="b2")
    assert _peft_layers(model) == []
    model.set_adapter("b2")
    ref.set_adapter("b")
    torch.testing.assert_close(logits(model, kw), logits(ref, kw), atol=ATOL, rtol=1e-5)


def test_fastpeft_mixed_batch_on_optimized_peft_model_with_modules_to_save():
    pm, _, inputs, names, mixed = _peft_model("roberta-tok-modules-to-save")
    kw = inputs(batch=3, seq=5)
    with torch.no_grad():
        expected = pm(**kw, adapter_names=mixed).logits
    fastpeft.optimize(pm)
    with fastpeft.mixed_batch(pm, mixed):
        got = logits(pm, kw)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
    # the classifier (PEFT's ModulesToSaveWrapper, kept) really differs per row
    with torch.no_grad():
        assert not torch.allclose(pm(**kw, adapter_names=["b"] * 3).logits, got)


def test_training_after_optimize_matches_peft():
    pm, _, inputs, names, _ = _peft_model("gpt2-conv1d-lora-dora")
    ref = copy.deepcopy(pm)
    fastpeft.optimize(pm)
    kw = inputs(batch=2, seq=5)
    for model in (ref, pm):
        model.train()
        model.set_adapter("d")  # PEFT makes it trainable
        torch.manual_seed(0)  # GPT-2's own dropout: the same masks in both runs
        out = model(**kw, labels=kw["input_ids"])
        out.loss.backward()
    gref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert set(got) == set(gref) and gref
    for n in gref:
        torch.testing.assert_close(got[n], gref[n], atol=1e-5, rtol=1e-4, msg=n)


def test_optimize_is_idempotent_and_noop_without_peft_layers():
    pm, _, inputs, _, _ = _peft_model("llama-ia3")
    fastpeft.optimize(pm)
    layers = [id(m) for m in pm.modules()]
    fastpeft.optimize(pm)
    assert [id(m) for m in pm.modules()] == layers
    base, _ = tiny("llama")
    assert fastpeft.optimize(base) is base


# ----- generate(adapter_names=...) with mixed batches: greedy and beam search ----------------------
GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)


def _gen_rows_alone(model, kw, names, set_adapter, disable, **gen):
    """Each row generated alone with its adapter (the meaning of a mixed batch)."""
    outs = []
    for i, n in enumerate(names):
        row = {k: v[i:i + 1] for k, v in kw.items()}
        if n == "__base__":
            with disable():
                outs.append(model.generate(**row, **GEN, **gen))
        else:
            set_adapter(n)
            outs.append(model.generate(**row, **GEN, **gen))
    return torch.cat(outs)


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_mixed_batch_matches_peft_and_rows_alone(arch, num_beams, tmp_path):
    case = "llama-lora-mixed" if arch == "llama" else "t5-lora"
    pm, pristine, inputs, names, _ = _peft_model(case)
    names = ["b", "__base__", "default"] if arch == "llama" else ["o", "__base__", "default"]
    kw = inputs(batch=3, seq=5)
    kw.pop("decoder_input_ids", None)
    gen = dict(num_beams=num_beams)
    with torch.no_grad():
        expected = pm.generate(**kw, adapter_names=names, **GEN, **gen)  # PEFT's own (names x num_beams)
        alone = _gen_rows_alone(pm, kw, names, pm.set_adapter, pm.disable_adapter, **gen)
    torch.testing.assert_close(expected, alone, atol=0, rtol=0)
    pm.set_adapter(pm.active_adapters[0])
    pm.save_pretrained(str(tmp_path))

    fastpeft.optimize(pm)
    with torch.no_grad():
        torch.testing.assert_close(pm.generate(**kw, adapter_names=names, **GEN, **gen), expected, atol=0, rtol=0)
        with fastpeft.mixed_batch(pm, names):  # the same through fastpeft's context manager
            torch.testing.assert_close(pm.generate(**kw, **GEN, **gen), expected, atol=0, rtol=0)

    # fastpeft's own PeftModel (adapters loaded from PEFT's files)
    other = [n for n in names if n not in ("__base__", "default")][0]
    fm = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path))
    fm.load_adapter(str(tmp_path / other), other)
    with torch.no_grad():
        torch.testing.assert_close(fm.generate(**kw, adapter_names=names, **GEN, **gen), expected, atol=0, rtol=0)


@needs_transformers_peft  # Transformers' own load_adapter checks peft's version
def test_transformers_generate_with_fastpeft_mixed_batch_and_num_return_sequences(tmp_path):
    pm, pristine, inputs, names, _ = _peft_model("llama-lora-mixed")
    pm.save_pretrained(str(tmp_path))
    model = fresh_copy(pristine)
    model.load_adapter(str(tmp_path), adapter_name="default")
    model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    ref = copy.deepcopy(model)
    fastpeft.optimize(model)
    kw = inputs(batch=2, seq=4)
    names = ["b", "default"]
    gen = dict(num_beams=2, num_return_sequences=2)
    with torch.no_grad(), fastpeft.mixed_batch(model, names):
        got = model.generate(**kw, **GEN, **gen)  # rows repeated 2x by Transformers
    assert got.shape[0] == 4
    with torch.no_grad():
        alone = _gen_rows_alone(ref, kw, names, ref.set_adapter, _disabled(ref), **gen)
    torch.testing.assert_close(got, alone, atol=0, rtol=0)


def _disabled(model):
    import contextlib

    @contextlib.contextmanager
    def ctx():
        model.disable_adapters()
        try:
            yield
        finally:
            model.enable_adapters()

    return ctx


def test_fast_path_never_drops_gradients_of_trainable_base_params():
    """bias="all" trains the base biases: after an inference call built the eager fast path, a
    call with gradients must still reach them (and the adapters) exactly as in PEFT."""
    base, inputs = tiny("opt")
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "fc1"], bias="all"))
    randomize_adapters(pm, seed=2)
    pm.eval()
    for n, p in pm.named_parameters():  # only the base biases train: the adapters are frozen
        if "lora_" in n:
            p.requires_grad_(False)
    ref = copy.deepcopy(pm)
    fastpeft.optimize(pm)
    kw = inputs(batch=2, seq=5)
    with torch.no_grad():
        pm(**kw)  # builds the fast-path plans
    for model in (ref, pm):
        model(**kw).logits.square().mean().backward()
    gref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert any("q_proj.base_layer.bias" in n for n in gref)
    assert set(got) == set(gref)
    for n in gref:
        assert got[n] is not None, n
        torch.testing.assert_close(got[n], gref[n], atol=1e-5, rtol=1e-4, msg=n)


def test_disabled_state_scaling_and_several_active_are_carried_over():
    pm, _, inputs, names, _ = _peft_model("llama-lora-mixed")
    kw = inputs(batch=2, seq=5)
    pm.base_model.set_adapter(["default", "b"])
    for m in pm.modules():  # PEFT's set_scale (e.g. by a user or a hook) on some layers
        if hasattr(m, "set_scale") and "b" in getattr(m, "scaling", {}):
            m.set_scale("b", 0.5)
    expected = logits(pm, kw)
    pm.base_model.disable_adapter_layers()
    expected_off = logits(pm, kw)
    fastpeft.optimize(pm)
    torch.testing.assert_close(logits(pm, kw), expected_off, atol=ATOL, rtol=1e-5)  # still disabled
    pm.base_model.enable_adapter_layers()
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.active_adapters == ["default", "b"]
    torch.testing.assert_close(logits(pm, kw), expected, atol=ATOL, rtol=1e-5)


def test_optimized_model_pickles_and_keeps_reoptimizing(tmp_path):
    """torch.save / pickle of a whole model after optimize(): same outputs after loading, and
    adapters added to the loaded model still become fastpeft layers."""
    import pickle

    pm, _, inputs, names, _ = _peft_model("llama-lora-mixed")
    kw = inputs(batch=2, seq=4)
    fastpeft.optimize(pm)
    expected = logits(pm, kw)
    path = tmp_path / "model.pt"
    torch.save(pm, path)
    for loaded in (torch.load(path, weights_only=False), pickle.loads(pickle.dumps(pm)), copy.deepcopy(pm)):
        assert isinstance(loaded, type(pm).__mro__[1]) and getattr(type(loaded), "_fastpeft_reoptimizes", False)
        torch.testing.assert_close(logits(loaded, kw), expected, atol=0, rtol=0)
        loaded.add_adapter("late", peft.LoraConfig(r=2, target_modules=["k_proj"]))
        layer = loaded.base_model.model.model.layers[0].self_attn.k_proj
        assert isinstance(layer, AdapterLayer) and "late" in layer.lora_A
