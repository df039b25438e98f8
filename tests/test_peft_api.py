"""The rest of PEFT's model API, compared with peft in the same test: status reports,
``set_requires_grad``, ``modules_to_save``, parameter counts, the tuner-level calls reached
through ``PeftModel``, PEFT names fastpeft does not implement (a clear error, never the base
model's), and the Transformers mixin's active-adapter rules."""
import dataclasses
import os

import peft
import pytest
import torch
from peft.tuners import adalora, ia3, lora

import fastpeft
from fastpeft import _peft_api
from fastpeft.peft_model import AdapterModel

from models import logits, randomize_adapters, tiny

TARGETS = ["q_proj", "v_proj"]


def _pair(config_kw=None, arch="roberta_tok"):
    """The same tiny model with the same random LoRA weights, in peft and fastpeft."""
    kw = dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]) if config_kw is None else config_kw
    out = []
    for lib in (peft, fastpeft):
        model, inputs = tiny(arch)
        m = lib.get_peft_model(model, lib.LoraConfig(**kw))
        randomize_adapters(m, seed=2)
        out.append(m)
    return out[0], out[1], inputs


def _without_module_type(status):
    d = dataclasses.asdict(status)
    d.pop("module_type")
    return d


def test_layer_and_model_status_match_peft():
    ref, fast, _ = _pair()
    for m, cfg in ((ref, peft.LoraConfig), (fast, fastpeft.LoraConfig)):
        m.add_adapter("b", cfg(r=2, target_modules=["query"]))
        m.base_model.set_adapter(["default", "b"])
        m.set_requires_grad("b", False)
    ref_layers, layers = ref.get_layer_status(), fast.get_layer_status()
    assert [s.name for s in layers] == [s.name for s in ref_layers]
    assert [_without_module_type(s) for s in layers] == [_without_module_type(s) for s in ref_layers]
    lora_types = {s.module_type for s in layers if "classifier" not in s.name}
    assert lora_types == {s.module_type for s in ref_layers if "classifier" not in s.name} == {"lora.Linear"}
    ref_model, model = dataclasses.asdict(ref.get_model_status()), dataclasses.asdict(fast.get_model_status())
    assert model == ref_model
    # a partly merged model is "irregular" in both
    for m in (ref, fast):
        m.merge_adapter(["default"])
    assert fast.get_model_status().merged_adapters == ref.get_model_status().merged_adapters
    # the module-level functions take a PeftModel or a model with adapters
    assert dataclasses.asdict(fastpeft.status.get_model_status(fast)) == dataclasses.asdict(
        peft.get_model_status(ref))


def test_status_of_a_mixin_model_and_errors():
    ref, _ = tiny("llama")
    ref.add_adapter(peft.LoraConfig(r=4, target_modules=TARGETS))
    mine = fastpeft.with_adapters(tiny("llama")[0])
    mine.add_adapter(fastpeft.LoraConfig(r=4, target_modules=TARGETS))
    a, b = dataclasses.asdict(fastpeft.status.get_model_status(mine)), dataclasses.asdict(peft.get_model_status(ref))
    assert a == b
    with pytest.raises(ValueError, match="No adapter layers"):
        fastpeft.status.get_layer_status(tiny("llama")[0])


def test_parameter_counts_and_modules_to_save_match_peft():
    ref, fast, _ = _pair()
    assert fast.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert fast.modules_to_save == ref.modules_to_save == {"classifier"}
    ref2, fast2, _ = _pair(dict(r=4, target_modules=["query"]))
    assert fast2.modules_to_save is None and ref2.modules_to_save is None


def test_set_requires_grad_and_layer_toggles_match_peft():
    ref, fast, inputs = _pair()
    for m in (ref, fast):
        m.set_requires_grad("default", False)
    grads = lambda m: {k.replace("base_model.model.", ""): p.requires_grad for k, p in m.named_parameters()}  # noqa: E731
    assert grads(fast) == grads(ref)
    for m in (ref, fast):
        m.set_requires_grad(["default"], True)
    assert grads(fast) == grads(ref)
    with pytest.raises(ValueError, match="nope"):
        fast.set_requires_grad("nope")
    kw = inputs()
    for m in (ref, fast):  # PEFT reaches these through the tuner
        m.disable_adapter_layers()
    torch.testing.assert_close(logits(fast, kw), logits(ref, kw), rtol=0, atol=1e-5)
    for m in (ref, fast):
        m.enable_adapter_layers()
    torch.testing.assert_close(logits(fast, kw), logits(ref, kw), rtol=0, atol=1e-5)
    with fast.disable_adapter(), ref.disable_adapter():
        assert fast.has_active_enabled_adapter == ref.has_active_enabled_adapter is False
    assert fast.has_active_enabled_adapter == ref.has_active_enabled_adapter is True
    assert fast.active_peft_config is fast.peft_config["default"]
    assert fast.base_model.prefix == ref.base_model.prefix == "lora_"
    assert fast.base_model.get_model_config(fast.get_base_model()) == ref.base_model.get_model_config(
        ref.get_base_model())
    assert fast.base_model_torch_dtype == ref.base_model_torch_dtype


def _public(cls) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_") and n not in dir(torch.nn.Module)}


PEFT_CLASSES = [peft.PeftModel, peft.PeftModelForCausalLM, peft.PeftModelForSeq2SeqLM,
                peft.PeftModelForSequenceClassification, peft.PeftModelForTokenClassification,
                peft.PeftModelForQuestionAnswering, peft.PeftModelForFeatureExtraction,
                lora.LoraModel, ia3.IA3Model, adalora.AdaLoraModel]


def test_every_public_peft_name_is_implemented_or_refused():
    """Fails when peft gains a public PeftModel/tuner name that nobody classified."""
    ours = set(dir(fastpeft.PeftModel)) | set(dir(AdapterModel))
    names = set().union(*(_public(c) for c in PEFT_CLASSES))
    unclassified = sorted(names - ours - set(_peft_api.UNSUPPORTED))
    assert not unclassified, f"classify in fastpeft/_peft_api.py or implement: {unclassified}"
    assert not set(_peft_api.UNSUPPORTED) & ours  # a refusal for something implemented would hide it


@pytest.mark.parametrize("name", sorted(_peft_api.UNSUPPORTED))
def test_an_unsupported_peft_name_says_so(name):
    _, fast, _ = _pair(dict(r=4, target_modules=["query"]))
    with pytest.raises(AttributeError) as info:
        getattr(fast, name)
    msg = str(info.value)
    assert name in msg and "fastpeft does not support" in msg and "fastpeft.optimize" in msg
    assert "Roberta" not in msg  # never an error about the base model's class
    with pytest.raises(AttributeError, match=name):
        getattr(fast.base_model, name)


def test_base_model_attributes_still_fall_through():
    _, fast, _ = _pair(dict(r=4, target_modules=["query"]))
    assert fast.config is fast.get_base_model().config
    assert fast.device == torch.device("cpu")
    with pytest.raises(AttributeError):
        fast.definitely_not_an_attribute  # noqa: B018


# ----- the Transformers mixin's rules -----------------------------------------------------------
@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    for i, (name, targets) in enumerate((("a", TARGETS), ("b", ["q_proj"]))):
        model, _ = tiny("llama")
        m = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets))
        randomize_adapters(m, seed=i + 1)
        m.save_pretrained(folder / name)
    return folder


def test_mixin_active_adapter_after_loads_and_deletes_matches_transformers(two_adapters):
    ref, inputs = tiny("llama")
    mine = fastpeft.with_adapters(tiny("llama")[0])
    kw = inputs()
    for m in (ref, mine):
        m.load_adapter(str(two_adapters / "a"), adapter_name="a")
        m.load_adapter(str(two_adapters / "b"), adapter_name="b")
    assert mine.active_adapters() == ref.active_adapters() == ["b"]  # the last one loaded
    torch.testing.assert_close(logits(mine, kw), logits(ref, kw), rtol=0, atol=1e-5)
    for m in (ref, mine):
        m.delete_adapter("b")  # the active one
    assert mine.active_adapters() == ref.active_adapters() == ["a"]
    torch.testing.assert_close(logits(mine, kw), logits(ref, kw), rtol=0, atol=1e-5)


def test_mixin_load_adapter_refuses_unknown_and_unimplemented_options(two_adapters):
    mine = fastpeft.with_adapters(tiny("llama")[0])
    with pytest.raises(TypeError, match="nonsense"):
        mine.load_adapter(str(two_adapters / "a"), adapter_name="a", nonsense=1)
    with pytest.raises(NotImplementedError, match="device_map"):
        mine.load_adapter(str(two_adapters / "a"), adapter_name="a", device_map="auto")
    with pytest.raises(TypeError, match="adapter_kwargs"):
        mine.load_adapter(str(two_adapters / "a"), adapter_name="a", adapter_kwargs={"bogus": 1})
    assert not getattr(mine, "peft_config", {})
    mine.load_adapter(os.fspath(two_adapters / "a"), adapter_name="a", adapter_kwargs={"local_files_only": True})
    assert mine.active_adapters() == ["a"]


def test_mixin_hotswap_auto_is_no_hotswap_as_transformers(two_adapters):
    mine = fastpeft.with_adapters(tiny("llama")[0])
    mine.load_adapter(str(two_adapters / "a"), adapter_name="a", hotswap="auto")  # a fresh model: a plain load
    with pytest.raises(ValueError, match="already exists"):  # "auto" never swaps silently
        mine.load_adapter(str(two_adapters / "b"), adapter_name="a", hotswap="auto")
    with pytest.raises(ValueError, match="hotswap"):
        mine.load_adapter(str(two_adapters / "b"), adapter_name="a", hotswap="yes")


def test_get_peft_model_takes_peft_s_arguments_and_nothing_else():
    model = fastpeft.get_peft_model(tiny("llama")[0], fastpeft.LoraConfig(r=4, target_modules=TARGETS),
                                    revision="abc123")
    ref = peft.get_peft_model(tiny("llama")[0], peft.LoraConfig(r=4, target_modules=TARGETS), revision="abc123")
    assert model.peft_config["default"].revision == ref.peft_config["default"].revision == "abc123"
    with pytest.raises(NotImplementedError, match="mixed=True"):
        fastpeft.get_peft_model(tiny("llama")[0], fastpeft.LoraConfig(r=4, target_modules=TARGETS), mixed=True)
    with pytest.raises(TypeError, match="bogus"):
        fastpeft.get_peft_model(tiny("llama")[0], fastpeft.LoraConfig(r=4, target_modules=TARGETS), bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(r=4, target_modules=TARGETS), tiny("llama")[0], bogus=1)


class _WithOddBias(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 8)
        self.gate_bias = torch.nn.Parameter(torch.zeros(8))  # named like gpt-oss's gate_up_proj_bias

    def forward(self, x):
        return self.q_proj(x) + self.gate_bias


def test_bias_all_trains_the_parameters_peft_trains():
    got = {}
    for lib in (peft, fastpeft):
        m = lib.get_peft_model(_WithOddBias(), lib.LoraConfig(r=2, target_modules=["q_proj"], bias="all"))
        got[lib.__name__] = {n.replace("base_model.model.", ""): p.requires_grad for n, p in m.named_parameters()
                             if "lora_" not in n}
    assert got["fastpeft"] == got["peft"]
    assert got["fastpeft"]["gate_bias"] is False and got["fastpeft"]["q_proj.base_layer.bias"] is True
