"""fastpeft.checkpoint against checkpoints and state dicts made by the real PEFT library."""

import os
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from fastpeft import checkpoint as ck  # noqa: E402
from fastpeft.config import PeftConfig  # noqa: E402
from fastpeft.hub import AdapterFormatError, AdapterNotFoundError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
PREFIX = "base_model.model."


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg)


def opt():  # has biases
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=100, word_embed_proj_dim=32, max_position_embeddings=64)
    return transformers.OPTForCausalLM(cfg)


def _randomize(model):
    """Adapter tensors that differ from their init, so value checks mean something."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("lora_", "ia3_l", "modules_to_save")):
                p.add_(torch.randn_like(p) * 0.1)
    return model


CASES = {
    "lora": (llama, peft.LoraConfig, dict(target_modules=["q_proj", "v_proj"])),
    "lora_bias_all": (opt, peft.LoraConfig, dict(target_modules=["q_proj", "fc1"], bias="all")),
    "lora_bias_lora_only": (opt, peft.LoraConfig, dict(target_modules=["q_proj", "fc1"], bias="lora_only")),
    "lora_bias_param": (opt, peft.LoraConfig, dict(target_modules=["k_proj"], lora_bias=True)),
    "dora": (opt, peft.LoraConfig, dict(target_modules=["q_proj", "fc2"], use_dora=True)),
    "embedding": (llama, peft.LoraConfig, dict(target_modules=["embed_tokens", "q_proj"])),
    "embedding_regex": (llama, peft.LoraConfig, dict(target_modules=r".*(embed_tokens|k_proj)")),
    "modules_to_save": (llama, peft.LoraConfig, dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "modules_to_save_bias_all": (opt, peft.LoraConfig,
                                 dict(target_modules=["q_proj"], modules_to_save=["fc2"], bias="all")),
    "rank_pattern": (llama, peft.LoraConfig, dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})),
    "ia3": (llama, peft.IA3Config, dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "ia3_modules_to_save": (opt, peft.IA3Config, dict(target_modules=["fc2"], feedforward_modules=["fc2"],
                                                       modules_to_save=["lm_head"])),
    "adalora": (llama, peft.AdaLoraConfig, dict(target_modules=["q_proj", "v_proj"], init_r=4, total_step=10)),
}


def _peft_model(case, adapter_names=("default",)):
    make, cls, kwargs = CASES[case]
    model = peft.get_peft_model(make(), cls(**kwargs), adapter_name=adapter_names[0])
    for name in adapter_names[1:]:
        model.add_adapter(name, cls(**{**kwargs, **({"bias": "none"} if "bias" in kwargs else {})}))
    return _randomize(model)


def _ours(case):
    _, cls, kwargs = CASES[case]
    return PeftConfig.from_dict(cls(**kwargs).to_dict())


def _assert_same(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


@pytest.mark.parametrize("case", list(CASES))
def test_get_adapter_state_dict_equals_peft(case):
    model = _peft_model(case)
    expected = peft.get_peft_model_state_dict(model)
    _assert_same(ck.get_adapter_state_dict(model.state_dict(), "default", _ours(case)), expected)


@pytest.mark.parametrize("case", ["lora", "dora", "ia3", "modules_to_save", "embedding", "lora_bias_all"])
def test_get_adapter_state_dict_with_two_adapters(case):
    model = _peft_model(case, adapter_names=("default", "second"))
    for name in ("default", "second"):
        config = _ours(case)
        if name == "second" and config.__dict__.get("bias"):
            config.bias = "none"
        expected = peft.get_peft_model_state_dict(model, adapter_name=name)
        _assert_same(ck.get_adapter_state_dict(model.state_dict(), name, config), expected)


def test_get_adapter_state_dict_without_peft_prefix():
    """A plain model with injected layers (the Transformers integration) has no prefix."""
    model = _randomize(peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["q_proj"], use_dora=True), llama()))
    expected = peft.get_peft_model_state_dict(model)
    ours = ck.get_adapter_state_dict(model.state_dict(), "default", PeftConfig.from_dict(model.peft_config["default"].to_dict()))
    _assert_same(ours, expected)
    assert not any(k.startswith(PREFIX) for k in ours)
    assert set(ck.add_peft_prefix(ours)) == {PREFIX + k for k in ours}


def test_adalora_rank_pattern_slices_and_ranknum_is_not_saved(tmp_path):
    model = _peft_model("adalora")
    pattern = {"model.layers.0.self_attn.q_proj.lora_E.default": [True, False, True, True],
               "model.layers.1.self_attn.v_proj.lora_E.default": [False, False, False, False]}
    model.peft_config["default"].rank_pattern = dict(pattern)
    ours = _ours("adalora")
    ours.rank_pattern = dict(pattern)
    mine = ck.get_adapter_state_dict(model.state_dict(), "default", ours)
    model.save_pretrained(tmp_path)  # PEFT strips the adapter name from the pattern keys when saving
    _assert_same(mine, load_file(str(tmp_path / ck.SAFETENSORS_WEIGHTS_NAME)))
    assert not any("ranknum" in k for k in mine)
    q = PREFIX + "model.layers.0.self_attn.q_proj"
    assert mine[q + ".lora_A"].shape == (3, 32) and mine[q + ".lora_B"].shape == (32, 3)
    assert mine[q + ".lora_E"].shape == (3, 1)
    assert mine[PREFIX + "model.layers.1.self_attn.v_proj.lora_A"].shape == (0, 32)
    assert ours.rank_pattern == pattern, "the config is not modified"


@pytest.mark.parametrize("case", list(CASES))
def test_peft_checkpoint_maps_onto_peft_model_names(tmp_path, case):
    model = _peft_model(case)
    model.save_pretrained(tmp_path)
    file_sd = ck.load_adapter_weights(str(tmp_path))
    assert set(file_sd) == set(peft.get_peft_model_state_dict(model))

    # load under another adapter name into a fresh PEFT model
    fresh = _peft_model(case, adapter_names=("new",))
    model_sd = fresh.state_dict()
    mapped, unexpected = ck.adapter_keys_to_model_keys(file_sd, "new", _ours(case), model_sd.keys())

    reference = peft.PeftModel.from_pretrained(llama() if CASES[case][0] is llama else opt(), str(tmp_path),
                                              adapter_name="new")
    ref_sd = {k.removeprefix(PREFIX): v for k, v in reference.state_dict().items()}
    inner_sd = {k.removeprefix(PREFIX): v for k, v in model_sd.items()}
    expected = set(ck.expected_adapter_keys(model_sd.keys(), "new"))
    assert expected <= set(mapped), "every adapter tensor gets a value"
    assert all(k in inner_sd for k in mapped)
    for key, tensor in mapped.items():
        assert torch.equal(tensor, ref_sd[key]), key  # what PEFT itself loaded there
    # PEFT's own loading reports the same unexpected keys
    result = peft.set_peft_model_state_dict(_peft_model(case, adapter_names=("new",)), file_sd, adapter_name="new")
    assert sorted(result.unexpected_keys) == sorted(unexpected)
    if case == "modules_to_save_bias_all":
        # bias="all" also saves the wrapper's copy as "<W>.modules_to_save.bias", a key PEFT cannot load
        # back either ("<W>.original_module.bias" does load: it is a real model key)
        assert sorted(unexpected) == [PREFIX + "model.decoder.layers.0.fc2.modules_to_save.bias",
                                      PREFIX + "model.decoder.layers.1.fc2.modules_to_save.bias"]
    else:
        assert unexpected == []


def test_mapping_accepts_files_without_prefix_and_models_with_it():
    model = _peft_model("dora")
    file_sd = {k.removeprefix(PREFIX): v for k, v in peft.get_peft_model_state_dict(model).items()}
    mapped, unexpected = ck.adapter_keys_to_model_keys(file_sd, "default", _ours("dora"), model.state_dict().keys())
    assert unexpected == []
    assert sorted(mapped) == sorted(ck.expected_adapter_keys(model.state_dict().keys(), "default"))
    key = "model.decoder.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight"
    assert torch.equal(mapped[key], model.state_dict()[PREFIX + key])


def test_mapping_reports_unexpected_and_handles_parameterdict_dora():
    names = ["m.q.base_layer.weight", "m.q.lora_A.a.weight", "m.q.lora_B.a.weight", "m.q.lora_magnitude_vector.a"]
    file_sd = {PREFIX + "m.q.lora_A.weight": torch.ones(1), "m.q.lora_B.weight": torch.ones(1),
               PREFIX + "m.q.lora_magnitude_vector": torch.ones(1), PREFIX + "m.k.lora_A.weight": torch.ones(1)}
    cfg = PeftConfig.from_dict({"peft_type": "LORA", "use_dora": True})
    mapped, unexpected = ck.adapter_keys_to_model_keys(file_sd, "a", cfg, names)
    assert sorted(mapped) == ["m.q.lora_A.a.weight", "m.q.lora_B.a.weight", "m.q.lora_magnitude_vector.a"]
    assert unexpected == [PREFIX + "m.k.lora_A.weight"]


def test_peft_loads_what_we_save(tmp_path):
    """The other direction: our config + weights files load in PEFT and give the same model."""
    model = _peft_model("dora")
    ours = _ours("dora")
    ours.save_pretrained(tmp_path)
    ck.save_adapter_weights(ck.get_adapter_state_dict(model.state_dict(), "default", ours), str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(opt(), str(tmp_path))
    _assert_same(peft.get_peft_model_state_dict(loaded), peft.get_peft_model_state_dict(model))
    x = torch.tensor([[1, 2, 3]])
    assert torch.allclose(loaded.eval()(x).logits, model.eval()(x).logits)


def test_remove_adapter_name_matches_peft():
    from peft.tuners.tuners_utils import _remove_adapter_name_from_state_dict_key as ref

    for key in ["a.lora_A.default.weight", "a.lora_embedding_A.default", "a.default.lora_A.default.weight",
                "default", "a.b", "a.ia3_l.default", "x.default.default"]:
        assert ck.remove_adapter_name(key, "default") == ref(key, "default"), key


# --------------------------------------------------------------------------- files


def test_save_dealiases_and_is_loadable(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    state = {"tied_a": base, "tied_b": base, "row": base[1], "transposed": base.t(), "own": torch.ones(2)}
    path = ck.save_adapter_weights(state, str(tmp_path))
    assert path == str(tmp_path / ck.SAFETENSORS_WEIGHTS_NAME)
    _assert_same(ck.load_adapter_weights(str(tmp_path)), {k: v.contiguous() for k, v in state.items()})
    assert os.listdir(tmp_path) == [ck.SAFETENSORS_WEIGHTS_NAME]
    assert base.data_ptr() == state["tied_a"].data_ptr(), "inputs are not modified"


def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    ck.save_adapter_weights({"w": torch.ones(3)}, str(tmp_path))
    import safetensors.torch

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ck.save_adapter_weights({"w": torch.zeros(3)}, str(tmp_path))
    assert os.listdir(tmp_path) == [ck.SAFETENSORS_WEIGHTS_NAME]
    assert torch.equal(ck.load_adapter_weights(str(tmp_path))["w"], torch.ones(3))


def test_safetensors_preferred_over_bin(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / ck.SAFETENSORS_WEIGHTS_NAME))
    torch.save({"w": torch.zeros(2)}, str(tmp_path / ck.WEIGHTS_NAME))
    assert torch.equal(ck.load_adapter_weights(str(tmp_path))["w"], torch.ones(2))
    os.remove(tmp_path / ck.SAFETENSORS_WEIGHTS_NAME)
    assert torch.equal(ck.load_adapter_weights(str(tmp_path))["w"], torch.zeros(2))


def test_subfolder(tmp_path):
    ck.save_adapter_weights({"w": torch.ones(2)}, str(tmp_path / "sub"))
    assert set(ck.load_adapter_weights(str(tmp_path), subfolder="sub")) == {"w"}


def test_missing_weights(tmp_path):
    with pytest.raises(AdapterNotFoundError, match="adapter_model.safetensors.*adapter_model.bin"):
        ck.load_adapter_weights(str(tmp_path))


def test_truncated_safetensors(tmp_path):
    ck.save_adapter_weights({"w": torch.ones(1000)}, str(tmp_path))
    path = tmp_path / ck.SAFETENSORS_WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AdapterFormatError, match="adapter_model.safetensors"):
        ck.load_adapter_weights(str(tmp_path))
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(AdapterFormatError, match="adapter_model.safetensors"):
        ck.load_adapter_weights(str(tmp_path))


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (_touch, (self.target,))


def _touch(path):
    with open(path, "w") as fh:
        fh.write("pwned")


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"w": torch.ones(1), "x": _Evil(str(marker))}, str(tmp_path / ck.WEIGHTS_NAME))
    assert not marker.exists()
    with pytest.raises(AdapterFormatError, match="adapter_model.bin"):
        ck.load_adapter_weights(str(tmp_path))
    assert not marker.exists(), "the pickle's code must not run"


def test_bin_with_non_dict_or_garbage(tmp_path):
    torch.save([torch.ones(1)], str(tmp_path / ck.WEIGHTS_NAME))
    with pytest.raises(AdapterFormatError, match="dict of str -> Tensor"):
        ck.load_adapter_weights(str(tmp_path))
    (tmp_path / ck.WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(AdapterFormatError, match="adapter_model.bin"):
        ck.load_adapter_weights(str(tmp_path))


def test_peft_bin_checkpoint_loads(tmp_path):
    model = _peft_model("lora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / ck.WEIGHTS_NAME).exists()
    _assert_same(ck.load_adapter_weights(str(tmp_path)), peft.get_peft_model_state_dict(model))


@pytest.mark.parametrize("case", ["dora", "adalora", "ia3"])
def test_functions_accept_peft_config_objects(case):
    model = _peft_model(case)
    peft_config = model.peft_config["default"]
    _assert_same(ck.get_adapter_state_dict(model.state_dict(), "default", peft_config),
                 peft.get_peft_model_state_dict(model))
    file_sd = peft.get_peft_model_state_dict(model)
    mapped, unexpected = ck.adapter_keys_to_model_keys(file_sd, "default", peft_config, model.state_dict().keys())
    assert unexpected == [] and sorted(mapped) == sorted(ck.expected_adapter_keys(model.state_dict().keys(), "default"))
