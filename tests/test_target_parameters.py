"""LoRA on raw parameters (``LoraConfig(target_parameters=[...])``) against the real peft library:
tiny MoE models (Mixtral stores experts [E, out, in], gpt-oss [E, in, out] with ``is_transposed``),
same keys, shapes and outputs, adapters saved by either library load in the other, mixed
batches, several active adapters, merging, deleting, training and the merged-weight cache."""
import copy
import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
tf = pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft import tuner  # noqa: E402
from fastpeft.config import CONFIG_NAME, LoraConfig, UnsupportedConfigError  # noqa: E402
from fastpeft.nn.lora_param import LoraParam  # noqa: E402

from models import logits, randomize_adapters  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

ATOL = 1e-5
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_moe(arch: str, seed: int = 0):
    """2 layers, 4 experts (2 per token), hidden 32, expert width 64, random weights."""
    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, num_local_experts=4, num_experts_per_tok=2)
    if arch == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**common))
    else:
        model = tf.GptOssForCausalLM(tf.GptOssConfig(**common, head_dim=8, sliding_window=8,
                                                     layer_types=["sliding_attention", "full_attention"]))
    return model.eval()


def ids(batch=3, seq=6, seed=1):
    return dict(input_ids=torch.randint(3, 90, (batch, seq), generator=torch.Generator().manual_seed(seed)))


def _peft_model(arch, make_cfg, tmp_path=None, seed=3, names=("default",)):
    base = tiny_moe(arch)
    pristine = copy.deepcopy(base)
    pm = peft.get_peft_model(base, make_cfg(), adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, make_cfg())
    randomize_adapters(pm, seed=seed)
    pm.eval()
    if tmp_path is not None:
        pm.save_pretrained(tmp_path)
    return pristine, pm


CASES = {
    "mixtral-experts": ("mixtral", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERTS)),
    "gptoss-experts": ("gpt_oss", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERTS)),
    "gptoss-suffix-rslora-pattern": ("gpt_oss", lambda: peft.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules=[], target_parameters=["experts.down_proj", "gate_up_proj"],
        rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\..*gate_up_proj": 3})),
    "mixtral-router-2d-and-modules": ("mixtral", lambda: peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], target_parameters=["mlp.gate.weight", "experts.down_proj"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_loads_with_equal_outputs_and_keys(case, tmp_path):
    arch, make = CASES[case]
    pristine, pm = _peft_model(arch, make, tmp_path)
    kw = ids()
    expected = logits(pm, kw)
    base_out = logits(pristine, kw)
    assert (expected - base_out).abs().max() > 1e-2, "the adapter changes the outputs"

    fm = fastpeft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path))
    torch.testing.assert_close(logits(fm, kw), expected, atol=ATOL, rtol=1e-5)
    ours, theirs = fm.state_dict(), pm.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    with fm.disable_adapter():
        torch.testing.assert_close(logits(fm, kw), base_out, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(logits(fm, kw), expected, atol=ATOL, rtol=1e-5)

    mm = fastpeft.with_adapters(copy.deepcopy(pristine))  # the Transformers-style mixin
    mm.load_adapter(str(tmp_path))
    torch.testing.assert_close(logits(mm, kw), expected, atol=ATOL, rtol=1e-5)


def test_shapes_and_nesting_are_peft_s():
    fm = fastpeft.get_peft_model(tiny_moe("mixtral"), LoraConfig(r=4, target_modules=[], target_parameters=EXPERTS))
    outer = fm.base_model.model.model.layers[0].mlp.experts
    assert isinstance(outer, LoraParam) and outer.parameter_name == "down_proj"  # wraps the earlier target
    inner = outer.base_layer
    assert isinstance(inner, LoraParam) and inner.parameter_name == "gate_up_proj"
    sd = fm.state_dict()
    p = "base_model.model.model.layers.0.mlp.experts."
    assert tuple(sd[p + "base_layer.base_layer.gate_up_proj"].shape) == (4, 128, 32)  # [E, 2 * inter, hidden]
    assert tuple(sd[p + "base_layer.lora_A.default.weight"].shape) == (16, 32)  # [r * E, in]
    assert tuple(sd[p + "base_layer.lora_B.default.weight"].shape) == (128, 16)  # [out, r * E]
    assert tuple(sd[p + "lora_A.default.weight"].shape) == (16, 64)
    assert tuple(sd[p + "lora_B.default.weight"].shape) == (32, 16)


@pytest.mark.parametrize("case", ["gptoss-experts", "mixtral-router-2d-and-modules"])
def test_fastpeft_saved_adapter_loads_in_peft(case, tmp_path):
    arch, make = CASES[case]
    pristine = tiny_moe(arch)
    fm = fastpeft.get_peft_model(copy.deepcopy(pristine), make())
    randomize_adapters(fm, seed=5)
    fm.eval()
    fm.save_pretrained(str(tmp_path / "ours"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "ours")).eval()
    kw = ids()
    torch.testing.assert_close(logits(pm, kw), logits(fm, kw), atol=ATOL, rtol=1e-5)
    # the same file keys as PEFT writes for this config
    peft.get_peft_model(copy.deepcopy(pristine), make()).save_pretrained(str(tmp_path / "peft"))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ours/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "peft/adapter_model.safetensors"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    saved = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert sorted(saved["target_parameters"]) == sorted(make().target_parameters)


def _two_adapters(arch="mixtral"):
    make = CASES["mixtral-experts"][1]
    pristine, pm = _peft_model(arch, make, names=("a", "b"))
    fm = fastpeft.PeftModel(copy.deepcopy(pristine), LoraConfig.from_dict(make().to_dict()), adapter_name="a")
    fm.add_adapter("b", LoraConfig.from_dict(make().to_dict()))
    fm.load_state_dict(pm.state_dict())
    fm.eval()
    return pristine, pm, fm


def test_mixed_batch_rows_equal_their_single_adapter_runs():
    pristine, pm, fm = _two_adapters()
    kw = ids(batch=4)
    names = ["a", "b", "__base__", "b"]
    per_name = {}
    for n in ("a", "b"):
        pm.set_adapter(n)
        per_name[n] = logits(pm, kw)  # PEFT itself refuses mixed batches on parameter targets
    per_name["__base__"] = logits(pristine, kw)
    with torch.no_grad():
        mixed = fm(**kw, adapter_names=names).logits
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], per_name[n][i], atol=ATOL, rtol=1e-5)
    with fastpeft.tuner.mixed_batch(fm.base_model.model, names):
        torch.testing.assert_close(logits(fm, kw), mixed, atol=ATOL, rtol=1e-5)
    with fastpeft.tuner.mixed_batch(fm.base_model.model, ["b"] * 4):  # one adapter: no split
        torch.testing.assert_close(logits(fm, kw), per_name["b"], atol=ATOL, rtol=1e-5)
    fm.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        fm(**kw, adapter_names=names)


def test_generate_with_mixed_adapters_and_beams_equals_per_adapter_generate():
    _, pm, fm = _two_adapters()
    x = ids(batch=2, seq=5)["input_ids"]
    kw = dict(max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    with torch.no_grad():
        out = fm.generate(input_ids=x, adapter_names=["a", "b"], **kw)  # each name covers its row's 2 beams
        want = []
        for i, n in enumerate(["a", "b"]):
            pm.set_adapter(n)
            want.append(pm.generate(input_ids=x[i:i + 1], **kw))
    assert torch.equal(out, torch.cat(want))


def test_failed_load_of_a_second_adapter_leaves_the_layers_as_they_were(tmp_path):
    _, pm, fm = _two_adapters()
    keys = {k: tuple(v.shape) for k, v in fm.state_dict().items()}
    other = fastpeft.get_peft_model(tiny_moe("mixtral"), LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS))
    other.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["r"] = 4  # the file's tensors are rank 2: the shapes do not fit
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        fm.load_adapter(str(tmp_path), "c")
    assert {k: tuple(v.shape) for k, v in fm.state_dict().items()} == keys
    assert all("c" not in m.adapter_names for m in fm.modules() if isinstance(m, LoraParam))


def test_two_active_adapters_match_peft():
    _, pm, fm = _two_adapters("mixtral")
    pm.base_model.set_adapter(["a", "b"])
    fm.base_model.set_adapter(["a", "b"])
    kw = ids()
    torch.testing.assert_close(logits(fm, kw), logits(pm, kw), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_merge_unmerge_and_merge_and_unload_match_peft(arch):
    make = CASES["mixtral-experts"][1]
    pristine, pm = _peft_model(arch, make)
    fm = fastpeft.get_peft_model(copy.deepcopy(pristine), LoraConfig.from_dict(make().to_dict()))
    fm.load_state_dict(pm.state_dict())
    fm.eval()
    kw = ids()
    expected = logits(pm, kw)
    W0 = fm.base_model.model.model.layers[0].mlp.experts.get_param().clone()
    fm.merge_adapter()
    assert fm.base_model.model.model.layers[0].mlp.experts.merged
    torch.testing.assert_close(logits(fm, kw), expected, atol=ATOL, rtol=1e-5)
    with fm.disable_adapter():  # disabling unmerges first, as PEFT
        torch.testing.assert_close(logits(fm, kw), logits(pristine, kw), atol=ATOL, rtol=1e-5)
    fm.merge_adapter()
    fm.unmerge_adapter()
    torch.testing.assert_close(fm.base_model.model.model.layers[0].mlp.experts.get_param(), W0, atol=1e-6, rtol=0)
    ours, theirs = fm.merge_and_unload(), pm.merge_and_unload()
    assert not any(isinstance(m, LoraParam) for m in ours.modules())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(ours, kw), expected, atol=ATOL, rtol=1e-5)


def test_delete_adapter_matches_peft():
    _, pm, fm = _two_adapters()
    pm.delete_adapter("a")
    fm.delete_adapter("a")
    assert set(fm.state_dict()) == set(pm.state_dict())
    assert not any(".a." in k for k in fm.state_dict())
    pm.set_adapter("b")
    fm.set_adapter("b")
    kw = ids()
    torch.testing.assert_close(logits(fm, kw), logits(pm, kw), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_training_step_grads_match_peft_and_the_cache_follows_the_step(arch):
    make = CASES["mixtral-experts"][1]
    pristine, pm = _peft_model(arch, make)
    fm = fastpeft.get_peft_model(copy.deepcopy(pristine), LoraConfig.from_dict(make().to_dict()))
    fm.load_state_dict(pm.state_dict())
    kw = ids()
    fm.eval()
    with torch.inference_mode():
        before = fm(**kw).logits  # fills the merged-weight cache
    trainable = {n for n, p in fm.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in pm.named_parameters() if p.requires_grad} and trainable
    assert all("lora_" in n for n in trainable)
    for model in (fm, pm):
        model.train()
        out = model(**kw, labels=kw["input_ids"])
        out.loss.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    for n, p in fm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-4)
    for model in (fm, pm):
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
        model.eval()
    after = logits(fm, kw)
    assert (after - before).abs().max() > 1e-3, "the optimizer step shows in the next (cached) forward"
    torch.testing.assert_close(after, logits(pm, kw), atol=ATOL, rtol=1e-5)


def test_merged_weight_cache_is_reused_and_invalidated():
    fm = fastpeft.get_peft_model(tiny_moe("mixtral"), LoraConfig(r=4, target_modules=[], target_parameters=EXPERTS))
    randomize_adapters(fm)
    fm.eval()
    layer = fm.base_model.model.model.layers[0].mlp.experts
    kw = ids()
    with torch.no_grad():
        first = fm(**kw).logits
        w = layer.effective_weight(["default"])
        assert layer.effective_weight(["default"]) is w  # cached
        torch.testing.assert_close(fm(**kw).logits, first, atol=0, rtol=0)
        layer.lora_B["default"].weight.mul_(2)  # an in-place write bumps the version
        assert layer.effective_weight(["default"]) is not w
        second = fm(**kw).logits
    assert (second - first).abs().max() > 1e-3
    layer.max_cached_weights = 0  # no cache: recomputed on every call, same outputs
    with torch.no_grad():
        torch.testing.assert_close(fm(**kw).logits, second, atol=0, rtol=0)
    assert layer.bank.weights == {} or len(layer.bank.weights) <= 1


REFUSED = {
    "lora_dropout": (dict(lora_dropout=0.1), "does not work with lora_dropout"),
    "use_dora": (dict(use_dora=True), "does not work with use_dora=True"),
    "lora_bias": (dict(lora_bias=True), "does not work with lora_bias=True"),
    "fan_in_fan_out": (dict(fan_in_fan_out=True), "does not work with fan_in_fan_out"),
    "pissa": (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    "alora-variant": (dict(alora_invocation_tokens=[5, 6]), "alora_invocation_tokens"),  # (refused by config or layer)
    "mica-variant": (dict(init_lora_weights="mica"), "mica"),
    "no-match": (dict(target_parameters=["nothing"]), "no `target_parameters` found"),
    "also-a-module-target": (dict(target_modules=["q_proj"], target_parameters=["q_proj.weight"]),
                             "not a valid target"),
    "default-target-modules": (dict(target_modules=None), "target_modules=None"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_combinations_leave_the_model_untouched(case):
    fields, match = REFUSED[case]
    model = tiny_moe("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = dict(r=4, target_modules=[], target_parameters=EXPERTS)
    cfg.update(fields)
    if case in ("lora_dropout", "use_dora", "lora_bias", "fan_in_fan_out", "no-match", "also-a-module-target",
                "alora-variant"):
        with pytest.raises(ValueError, match=match.split(" with ")[0] if case == "no-match" else "."):
            peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg))  # PEFT refuses these too
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[")):
        fastpeft.get_peft_model(model, LoraConfig(**cfg))
    assert not any(hasattr(m, "base_layer") for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_other_refusals():
    with pytest.raises(UnsupportedConfigError, match="target_parameters"):
        fastpeft.AdaLoraConfig(target_modules=[], target_parameters=EXPERTS, total_step=10)
    fm = fastpeft.get_peft_model(tiny_moe("mixtral"), LoraConfig(r=4, target_modules=[], target_parameters=EXPERTS))
    keys = set(fm.state_dict())
    with pytest.raises(ValueError, match="all adapters must target the same set of parameters"):
        fm.add_adapter("other", LoraConfig(r=4, target_modules=[], target_parameters=EXPERTS[:1]))
    assert set(fm.state_dict()) == keys and list(fm.peft_config) == ["default"]
    with pytest.raises(ValueError, match="add_weighted_adapter"):  # refused, as in PEFT
        fm.add_weighted_adapter(["default"], [1.0], "mix")


def test_warnings_as_peft():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastpeft.get_peft_model(tiny_moe("mixtral"), LoraConfig(r=4, target_modules=["zzz"], target_parameters=EXPERTS))
        fastpeft.get_peft_model(tiny_moe("mixtral"), LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["x.y"]))
    text = [str(w.message) for w in caught]
    assert any("were set but no module was matched" in t for t in text)
    assert any("were set but no parameter was matched" in t for t in text)


def test_second_adapter_joins_the_existing_layers():
    fm = fastpeft.get_peft_model(tiny_moe("gpt_oss"), LoraConfig(r=4, target_modules=[], target_parameters=EXPERTS))
    fm.add_adapter("two", LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS))
    outer = fm.base_model.model.model.layers[1].mlp.experts
    assert outer.adapter_names == ["default", "two"] and outer.base_layer.adapter_names == ["default", "two"]
    assert not isinstance(outer.base_layer.base_layer, LoraParam)
    assert outer.active_adapters == ["default"] and outer.base_layer.active_adapters == ["default"]
    assert not any(p.requires_grad for p in outer._params_of("two"))
    tuner.set_adapter(fm.base_model.model, "two")
    assert all(p.requires_grad for p in outer._params_of("two")) and len(outer._params_of("two")) == 4
