"""Faults while loading: any exception, ``BaseException`` included, leaves the model as it was
(same modules, parameters bit for bit, requires_grad flags, adapters, outputs) and is re-raised;
a retry then works."""
from __future__ import annotations

import peft
import pytest
import torch

import fastpeft
from fastpeft import tuner

from models import fresh_copy, logits, randomize_adapters, tiny


@pytest.fixture()
def saved(tmp_path):
    base, inputs = tiny("llama")
    pristine = fresh_copy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(pm)
    pm.save_pretrained(str(tmp_path / "a"))
    return pristine, inputs, str(tmp_path / "a")


def _state(model):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    kinds = [(n, type(m).__name__) for n, m in model.named_modules()]
    return sd, flags, kinds


def _assert_same(before, after):
    sd0, flags0, kinds0 = before
    sd1, flags1, kinds1 = after
    assert kinds1 == kinds0 and flags1 == flags0 and sd1.keys() == sd0.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _broken_freeze(model):
    raise RuntimeError("freeze failed")


@pytest.mark.parametrize("where,exc", [("load_weights", KeyboardInterrupt), ("_freeze_base", RuntimeError),
                                       ("_add_to_layer", KeyboardInterrupt)])
def test_peft_model_load_adapter_rolls_back_on_any_exception(saved, monkeypatch, where, exc):
    pristine, inputs, folder = saved
    fm = fastpeft.PeftModel(fresh_copy(pristine), fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    fm.eval()
    kw = inputs()
    before, out = _state(fm), logits(fm, kw)
    with monkeypatch.context() as mp:
        mp.setattr(tuner, where, _interrupt if exc is KeyboardInterrupt else _broken_freeze)
        with pytest.raises(exc):
            fm.load_adapter(folder, adapter_name="other")
    _assert_same(before, _state(fm))
    assert list(fm.peft_config) == ["default"] and torch.equal(logits(fm, kw), out)
    fm.load_adapter(folder, adapter_name="other")  # the retry works: nothing "already exists"
    assert list(fm.peft_config) == ["default", "other"]


def test_mixin_load_adapter_rolls_back_on_keyboard_interrupt(saved, monkeypatch):
    pristine, inputs, folder = saved
    model = fastpeft.with_adapters(fresh_copy(pristine))
    before = _state(model)
    kw = inputs()
    out = logits(model, kw)
    with monkeypatch.context() as mp:
        mp.setattr(tuner, "load_weights", _interrupt)
        with pytest.raises(KeyboardInterrupt):
            model.load_adapter(folder, adapter_name="x")
    _assert_same(before, _state(model))
    assert torch.equal(logits(model, kw), out)
    model.load_adapter(folder, adapter_name="x")
    assert model.active_adapters() == ["x"]


def test_freeze_after_inject_interrupted_is_rolled_back(saved, monkeypatch):
    pristine, inputs, folder = saved
    fm = fastpeft.PeftModel(fresh_copy(pristine), fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    before = _state(fm)
    with monkeypatch.context() as mp:
        mp.setattr(fastpeft.PeftModel, "_freeze_adapters", lambda self, name: _interrupt())
        with pytest.raises(KeyboardInterrupt):
            fm.load_adapter(folder, adapter_name="other")
    _assert_same(before, _state(fm))
    assert list(fm.peft_config) == ["default"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(lora_alpha=float("nan")), "lora_alpha"),
    (dict(lora_alpha=float("inf")), "lora_alpha"),
    (dict(lora_alpha=-float("inf")), "lora_alpha"),
    (dict(alpha_pattern={"q_proj": float("nan")}), "alpha_pattern"),
    (dict(layers_to_transform=[0, -1]), "negative"),
    (dict(layers_to_transform=-1), "negative"),
])
def test_bad_lora_values_are_refused_at_config_time(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastpeft.LoraConfig(r=2, target_modules=["q_proj"], **kwargs)


@pytest.mark.parametrize("beta", [1.0, 1.5, -0.1, float("nan")])
def test_adalora_betas_outside_the_unit_interval_are_refused(beta):
    for name in ("beta1", "beta2"):
        with pytest.raises(ValueError, match=name):
            fastpeft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"], **{name: beta})


def test_a_saved_config_with_nan_alpha_is_refused_before_the_model_changes(saved, tmp_path):
    import json

    pristine, inputs, folder = saved
    cfg = json.loads(open(f"{folder}/adapter_config.json").read())
    cfg["lora_alpha"] = float("nan")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    import shutil

    shutil.copy(f"{folder}/adapter_model.safetensors", bad / "adapter_model.safetensors")
    fm = fastpeft.PeftModel(fresh_copy(pristine), fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    before = _state(fm)
    with pytest.raises(Exception, match="lora_alpha"):
        fm.load_adapter(str(bad), adapter_name="nan")
    _assert_same(before, _state(fm))


def test_from_pretrained_interrupted_leaves_the_base_model(saved, monkeypatch):
    pristine, inputs, folder = saved
    model = fresh_copy(pristine)
    before = _state(model)
    with monkeypatch.context() as mp:
        mp.setattr(fastpeft.PeftModel, "_freeze_adapters", lambda self, name: _interrupt())
        with pytest.raises(KeyboardInterrupt):
            fastpeft.PeftModel.from_pretrained(model, folder)
    _assert_same(before, _state(model))
    fm = fastpeft.PeftModel.from_pretrained(model, folder)
    assert not any(p.requires_grad for n, p in fm.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("init", ["eva", "lora_ga", "mica"])  # orthogonal is implemented (tests/test_init_methods.py)
def test_an_initialization_fastpeft_lacks_is_refused_for_a_new_adapter(saved, init):
    pristine, inputs, folder = saved
    model = fresh_copy(pristine)
    before = _state(model)
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}'"):
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init))
    _assert_same(before, _state(model))


def test_an_adapter_trained_with_orthogonal_init_loads_with_peft_outputs(tmp_path):
    base, inputs = tiny("llama")
    pm = peft.get_peft_model(fresh_copy(base), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                               init_lora_weights="orthogonal"))
    pm.eval()
    pm.save_pretrained(str(tmp_path))
    kw = inputs()
    fm = fastpeft.PeftModel.from_pretrained(fresh_copy(base), str(tmp_path))
    torch.testing.assert_close(logits(fm, kw), logits(pm, kw), atol=1e-5, rtol=1e-5)
