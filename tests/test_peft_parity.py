"""Parity with the real peft library: adapters made by peft load in fastpeft with the same
outputs, and fastpeft's saves load in peft with the same outputs."""

import peft
import pytest
import torch

import fastpeft

from models import fresh_copy, logits, randomize_adapters, tiny

ATOL = 1e-5

LORA_CASES = {
    "llama-lora-suffix": ("llama", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-rslora-regex": ("llama", lambda: peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True,
                                                         target_modules=r".*\.(k_proj|up_proj)")),
    "llama-all-linear-patterns": ("llama", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3})),
    "llama-layers-to-transform": ("llama", lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"],
                                                                layers_to_transform=[1], layers_pattern="layers",
                                                                exclude_modules=["o_proj"])),
    "llama-dora": ("llama", lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "gate_proj"])),
    "llama-lora-bias": ("llama", lambda: peft.LoraConfig(r=4, lora_bias=True, target_modules=["v_proj"])),
    "llama-embedding": ("llama", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "opt-lora-bias-all": ("opt", lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "fc1"], bias="all")),
    "opt-lora-only-bias": ("opt", lambda: peft.LoraConfig(r=4, target_modules=["k_proj", "fc2"], bias="lora_only")),
    "gpt2-conv1d": ("gpt2", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "gpt2-conv1d-dora": ("gpt2", lambda: peft.LoraConfig(r=4, use_dora=True, target_modules=["c_proj"], fan_in_fan_out=True)),
    "roberta-tok-modules-to-save": ("roberta_tok", lambda: peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                                          task_type="TOKEN_CLS")),
    "t5-lora": ("t5", lambda: peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q", "v", "wi"], task_type="SEQ_2_SEQ_LM")),
    "llama-ia3": ("llama", lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                  feedforward_modules=["down_proj"])),
    "t5-ia3": ("t5", lambda: peft.IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"],
                                            task_type="SEQ_2_SEQ_LM")),
    "gpt2-ia3": ("gpt2", lambda: peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                                fan_in_fan_out=True)),
    "gpt2-adalora-conv1d": ("gpt2", lambda: peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=["c_attn"],
                                                               fan_in_fan_out=True, total_step=10)),
    "llama-adalora": ("llama", lambda: peft.AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          total_step=10)),
}


def _peft_saved(arch, make_cfg, tmp_path, seed=3):
    base, inputs = tiny(arch)
    pristine = fresh_copy(base)
    pm = peft.get_peft_model(base, make_cfg())
    randomize_adapters(pm, seed=seed)
    pm.eval()
    pm.save_pretrained(tmp_path)
    return pristine, pm, inputs


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_peft_adapter_loads_with_same_outputs(case, tmp_path):
    arch, make_cfg = LORA_CASES[case]
    pristine, pm, inputs = _peft_saved(arch, make_cfg, tmp_path)
    kw = inputs()
    expected = logits(pm, kw)
    with pm.disable_adapter():
        expected_base = logits(pm, kw)

    fm = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path))
    torch.testing.assert_close(logits(fm, kw), expected, atol=ATOL, rtol=1e-5)
    with fm.disable_adapter():
        torch.testing.assert_close(logits(fm, kw), expected_base, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(logits(fm, kw), expected, atol=ATOL, rtol=1e-5)

    # the same through the Transformers-style mixin
    mm = fastpeft.with_adapters(fresh_copy(pristine))
    mm.load_adapter(str(tmp_path))
    assert mm.active_adapters() == ["default"]
    torch.testing.assert_close(logits(mm, kw), expected, atol=ATOL, rtol=1e-5)
    mm.disable_adapters()
    torch.testing.assert_close(logits(mm, kw), expected_base, atol=ATOL, rtol=1e-5)
    mm.enable_adapters()
    torch.testing.assert_close(logits(mm, kw), expected, atol=ATOL, rtol=1e-5)

    # state dicts: same keys and values as peft's
    ours = fm.state_dict()
    theirs = pm.state_dict()
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], msg=k)


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_fastpeft_save_loads_in_peft(case, tmp_path):
    arch, make_cfg = LORA_CASES[case]
    base, inputs = tiny(arch)
    pristine = fresh_copy(base)
    cfg = fastpeft.PeftConfig.from_dict(make_cfg().to_dict()) if hasattr(fastpeft.PeftConfig, "from_dict") else None
    fm = fastpeft.get_peft_model(base, cfg)
    randomize_adapters(fm, seed=5)
    fm.eval()
    kw = inputs()
    expected = logits(fm, kw)
    fm.save_pretrained(str(tmp_path))
    pm = peft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path)).eval()
    torch.testing.assert_close(logits(pm, kw), expected, atol=ATOL, rtol=1e-5)


def test_several_active_adapters_and_mixed_batch(tmp_path):
    base, inputs = tiny("llama")
    pristine = fresh_copy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    pm.add_adapter("other", peft.LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "down_proj"]))
    pm.add_adapter("third", peft.LoraConfig(r=2, lora_alpha=2, use_rslora=True, target_modules=["v_proj"]))
    randomize_adapters(pm, seed=11)
    pm.eval()
    pm.save_pretrained(str(tmp_path))
    kw = inputs(batch=4, seq=6)
    names = ["other", "__base__", "default", "third"]
    exp_mixed = logits_with(pm, kw, adapter_names=names)
    pm.base_model.set_adapter(["default", "other"])
    exp_both = logits(pm, kw)

    fm = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path))
    fm.load_adapter(str(tmp_path / "other"), "other")
    fm.load_adapter(str(tmp_path / "third"), "third")
    torch.testing.assert_close(logits_with(fm, kw, adapter_names=names), exp_mixed, atol=ATOL, rtol=1e-5)
    with fastpeft.mixed_batch(fm, names):
        torch.testing.assert_close(logits(fm, kw), exp_mixed, atol=ATOL, rtol=1e-5)
    fm.set_adapter(["default", "other"])
    assert fm.active_adapters == ["default", "other"]
    torch.testing.assert_close(logits(fm, kw), exp_both, atol=ATOL, rtol=1e-5)


def test_mixed_batch_modules_to_save_and_embedding(tmp_path):
    base, inputs = tiny("roberta_tok")
    pristine = fresh_copy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query", "word_embeddings"], task_type="TOKEN_CLS"))
    pm.add_adapter("b", peft.LoraConfig(r=3, target_modules=["value", "word_embeddings"], task_type="TOKEN_CLS"))
    randomize_adapters(pm, seed=2)
    pm.eval()
    pm.save_pretrained(str(tmp_path))
    kw = inputs(batch=3, seq=5)
    names = ["b", "default", "__base__"]
    expected = logits_with(pm, kw, adapter_names=names)
    fm = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path))
    fm.load_adapter(str(tmp_path / "b"), "b")
    torch.testing.assert_close(logits_with(fm, kw, adapter_names=names), expected, atol=ATOL, rtol=1e-5)


def logits_with(model, kw, **extra):
    with torch.no_grad():
        out = model(**kw, **extra)
    return out.logits


def test_bf16_matches_peft(tmp_path):
    base, inputs = tiny("llama")
    base = base.to(torch.bfloat16)
    pristine = fresh_copy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"]))
    randomize_adapters(pm, seed=4)
    pm.eval()
    pm.save_pretrained(str(tmp_path))
    kw = inputs()
    expected = logits(pm, kw)
    fm = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path))
    got = logits(fm, kw)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_merge_unmerge_and_unload(tmp_path):
    base, inputs = tiny("llama")
    pristine = fresh_copy(base)
    config = fastpeft.LoraConfig(r=4, lora_alpha=8, use_dora=False, target_modules=["q_proj", "down_proj"])
    fm = fastpeft.get_peft_model(base, config)
    randomize_adapters(fm)
    fm.eval()
    kw = inputs()
    expected = logits(fm, kw)
    with fm.disable_adapter():
        base_out = logits(fm, kw)
    torch.testing.assert_close(base_out, logits(pristine, kw), atol=0, rtol=0)  # disabled: the base model exactly
    fm.merge_adapter()
    torch.testing.assert_close(logits(fm, kw), expected, atol=1e-5, rtol=1e-5)
    fm.unmerge_adapter()
    torch.testing.assert_close(logits(fm, kw), expected, atol=1e-5, rtol=1e-5)
    merged = fm.merge_and_unload()
    assert not any(isinstance(m, fastpeft.nn.AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, kw), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(merged, kw), base_out)


def test_dora_merge_matches(tmp_path):
    base, inputs = tiny("llama")
    fm = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "up_proj"]))
    randomize_adapters(fm)
    fm.eval()
    kw = inputs()
    expected = logits(fm, kw)
    merged = fm.merge_and_unload()
    torch.testing.assert_close(logits(merged, kw), expected, atol=1e-5, rtol=1e-5)


def test_tuner_level_api_on_base_model_as_in_peft():
    """PEFT users reach the tuner (LoraModel) as ``model.base_model``: several active adapters,
    disabling the adapter layers, merging and deleting there behave as in PEFT."""
    base, inputs = tiny("llama")
    pm = peft.get_peft_model(fresh_copy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("other", peft.LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "down_proj"]))
    randomize_adapters(pm, seed=5)
    fm = fastpeft.get_peft_model(fresh_copy(base), fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    fm.add_adapter("other", fastpeft.LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "down_proj"]))
    fm.load_state_dict(pm.state_dict())
    pm.eval()
    fm.eval()
    kw = inputs(batch=2, seq=5)
    for m in (pm, fm):
        m.base_model.set_adapter(["default", "other"])
    assert fm.base_model.active_adapters == pm.base_model.active_adapters == ["default", "other"]
    assert fm.active_adapters == ["default", "other"]
    torch.testing.assert_close(logits(fm, kw), logits(pm, kw), atol=ATOL, rtol=1e-5)
    for m in (pm, fm):
        m.base_model.disable_adapter_layers()
    torch.testing.assert_close(logits(fm, kw), logits(pm, kw), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(logits(fm, kw), logits(base, kw), atol=ATOL, rtol=1e-5)
    for m in (pm, fm):
        m.base_model.enable_adapter_layers()
        m.base_model.set_adapter("other")
        m.base_model.merge_adapter()
    torch.testing.assert_close(logits(fm, kw), logits(pm, kw), atol=1e-4, rtol=1e-4)
    for m in (pm, fm):
        m.base_model.unmerge_adapter()
    pm.delete_adapter("default")  # PEFT's own PeftModel keeps a stale active name after base_model.delete_adapter
    fm.base_model.delete_adapter("default")
    assert "default" not in fm.peft_config and "default" not in pm.peft_config
    torch.testing.assert_close(logits(fm, kw), logits(pm, kw), atol=ATOL, rtol=1e-5)
    merged_f, merged_p = fm.base_model.merge_and_unload(), pm.base_model.merge_and_unload()
    torch.testing.assert_close(logits(merged_f, kw), logits(merged_p, kw), atol=1e-4, rtol=1e-4)
