"""The PEFT workflow around the adapters, compared with peft in the same test: training with
``transformers.Trainer`` (default arguments, checkpoints, resuming), ``save_pretrained``'s files,
``push_to_hub`` (against a loopback Hub), ``AutoPeftModelFor*`` and peft's config objects."""
import json
import os
import stat

import peft
import pytest
import torch
import transformers as tf
from torch import nn

import fastpeft

from models import logits, randomize_adapters, tiny

TARGETS = ["q_proj", "v_proj"]


def _rows(n=16, seq=8):
    ids = torch.randint(3, 90, (n, seq), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": r, "labels": r.clone(), "attention_mask": torch.ones_like(r)} for r in ids]


def _build(lib: str, route: str, task_type="CAUSAL_LM"):
    """A tiny Llama with a fresh LoRA (gaussian init: B is not zero, so the steps move) from
    ``lib`` (peft / fastpeft) through ``route`` (peft_model / mixin)."""
    torch.manual_seed(0)
    model, _ = tiny("llama")
    model.train()
    cfg_cls = peft.LoraConfig if lib == "peft" else fastpeft.LoraConfig
    kw = dict(r=4, target_modules=TARGETS, init_lora_weights="gaussian")
    if route == "peft_model":
        make = peft.get_peft_model if lib == "peft" else fastpeft.get_peft_model
        return make(model, cfg_cls(task_type=task_type, **kw))
    if lib == "fastpeft":
        model = fastpeft.with_adapters(model)
    model.add_adapter(cfg_cls(**kw))  # Transformers' own PEFT mixin for lib == "peft"
    return model


def _train(model, out, steps=4, resume=None, save_steps=2):
    args = tf.TrainingArguments(out, max_steps=steps, per_device_train_batch_size=4, save_steps=save_steps,
                                report_to=[], logging_steps=1, seed=0, use_cpu=True, disable_tqdm=True)
    trainer = tf.Trainer(model=model, args=args, train_dataset=_rows())
    trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    weights = {k.replace(".default", ""): v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
    return trainer, losses, weights


def _files(folder):
    return sorted(f for f in os.listdir(folder) if not os.path.isdir(os.path.join(folder, f)))


@pytest.mark.parametrize("route", ["peft_model", "mixin"])
def test_trainer_with_default_arguments_trains_and_checkpoints_as_peft(tmp_path, route):
    ref_trainer, ref_losses, ref_w = _train(_build("peft", route), str(tmp_path / "peft"))
    trainer, losses, w = _train(_build("fastpeft", route), str(tmp_path / "fast"))
    assert losses == ref_losses  # same seed, same data, same maths: bit-equal losses
    assert len(losses) == 4
    assert w.keys() == ref_w.keys()
    for k in w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=0, atol=1e-6)
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        assert _files(tmp_path / "fast" / ckpt) == _files(tmp_path / "peft" / ckpt)
        assert "model.safetensors" not in _files(tmp_path / "fast" / ckpt)  # the adapter, not the model
    trainer.save_model(str(tmp_path / "fast_final"))
    ref_trainer.save_model(str(tmp_path / "peft_final"))
    assert _files(tmp_path / "fast_final") == _files(tmp_path / "peft_final")


@pytest.mark.parametrize("route", ["peft_model", "mixin"])
def test_trainer_resumes_adapter_and_optimizer_from_a_checkpoint(tmp_path, route):
    _, full_losses, full = _train(_build("fastpeft", route), str(tmp_path / "full"))
    out = str(tmp_path / "run")
    _train(_build("fastpeft", route), out, steps=2)
    # a fresh model (other initial adapter weights: seed 1) resumed from step 2 must end where the
    # uninterrupted run ended: the checkpoint's adapter weights and Adam state are what it continues from
    torch.manual_seed(1)
    fresh = _build("fastpeft", route)
    randomize_adapters(fresh, seed=11)
    _, losses, resumed = _train(fresh, out, resume=os.path.join(out, "checkpoint-2"))
    assert losses[-2:] == pytest.approx(full_losses[-2:], abs=1e-4)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=2e-4)
    if route == "peft_model":  # peft resumes the same way, to the same numbers
        ref_out = str(tmp_path / "ref")
        _train(_build("peft", route), ref_out, steps=2)
        _, _, ref = _train(_build("peft", route), ref_out, resume=os.path.join(ref_out, "checkpoint-2"))
        for k in ref:
            torch.testing.assert_close(resumed[k], ref[k], rtol=0, atol=1e-6)


# ----- save_pretrained ------------------------------------------------------------------------
def _pair(task_type=None, name_or_path="org/tiny-llama"):
    """The same tiny Llama with the same random LoRA weights, in peft and in fastpeft."""
    made = []
    for lib in ("peft", "fastpeft"):
        model, inputs = tiny("llama")
        model.name_or_path = name_or_path
        cfg = (peft.LoraConfig if lib == "peft" else fastpeft.LoraConfig)(r=4, target_modules=TARGETS,
                                                                          task_type=task_type)
        m = (peft.get_peft_model if lib == "peft" else fastpeft.get_peft_model)(model, cfg)
        randomize_adapters(m, seed=5)
        made.append(m)
    return made[0], made[1], inputs()


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_saved_files_and_config_are_peft_s(tmp_path, task_type):
    ref, fast, _ = _pair(task_type)
    ref.save_pretrained(tmp_path / "peft")
    fast.save_pretrained(tmp_path / "fast")
    assert _files(tmp_path / "fast") == _files(tmp_path / "peft") == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    ref_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cfg = json.loads((tmp_path / "fast" / "adapter_config.json").read_text())
    assert cfg.keys() == ref_cfg.keys()
    assert sorted(cfg.pop("target_modules")) == sorted(ref_cfg.pop("target_modules"))  # peft: list(set)
    assert cfg == ref_cfg
    assert cfg["base_model_name_or_path"] == "org/tiny-llama"
    assert (cfg["auto_mapping"] is None) == (task_type is not None)
    umask = os.umask(0)
    os.umask(umask)
    for f in _files(tmp_path / "fast"):  # what open() gives: 0644 with the usual umask
        assert stat.S_IMODE(os.stat(tmp_path / "fast" / f).st_mode) == 0o666 & ~umask, f
    # peft's config has them too (its safetensors file gets 0600 from the safetensors library)
    assert stat.S_IMODE(os.stat(tmp_path / "peft" / "adapter_config.json").st_mode) == 0o666 & ~umask
    assert fast.peft_config["default"].inference_mode is False  # the live config is left as it was
    card = (tmp_path / "fast" / "README.md").read_text()
    assert "library_name: peft" in card and "base_model:adapter:org/tiny-llama" in card
    if task_type == "CAUSAL_LM":
        assert "pipeline_tag: text-generation" in card


def test_bin_files_both_ways(tmp_path):
    ref, fast, kw = _pair()
    fast.save_pretrained(tmp_path / "fast", safe_serialization=False)
    ref.save_pretrained(tmp_path / "peft", safe_serialization=False)
    assert _files(tmp_path / "fast") == _files(tmp_path / "peft")
    assert "adapter_model.bin" in _files(tmp_path / "fast")
    expected = logits(ref, kw)
    loaded_in_peft = peft.PeftModel.from_pretrained(tiny("llama")[0], tmp_path / "fast")
    loaded_here = fastpeft.PeftModel.from_pretrained(tiny("llama")[0], str(tmp_path / "peft"))
    torch.testing.assert_close(logits(loaded_in_peft, kw), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(loaded_here, kw), expected, rtol=0, atol=1e-5)
    # saving safetensors over it replaces the .bin (a loader would otherwise pick one of two adapters)
    fast.save_pretrained(tmp_path / "fast")
    assert "adapter_model.bin" not in _files(tmp_path / "fast")


def test_selected_adapters_and_subfolders_match_peft(tmp_path):
    ref, fast, kw = _pair()
    for m, cfg_cls in ((ref, peft.LoraConfig), (fast, fastpeft.LoraConfig)):
        m.add_adapter("other", cfg_cls(r=2, target_modules=["q_proj"]))
        randomize_adapters(m, seed=9)
    ref.save_pretrained(tmp_path / "peft", selected_adapters=["other"])
    fast.save_pretrained(tmp_path / "fast", selected_adapters=["other"])
    assert _files(tmp_path / "fast") == _files(tmp_path / "peft") == ["README.md"]
    assert _files(tmp_path / "fast" / "other") == _files(tmp_path / "peft" / "other")
    with pytest.raises(ValueError, match="unknown adapter"):
        fast.save_pretrained(tmp_path / "x", selected_adapters=["nope"])


@pytest.mark.parametrize("name", ["/", "a/b", "a\\b"])
def test_adapter_names_that_are_not_one_folder_are_refused(tmp_path, name):
    _, fast, _ = _pair()
    fast.add_adapter(name, fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="single path component"):
        fast.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def _snapshot(folder):
    return {f: (folder / f).read_bytes() for f in _files(folder)}


@pytest.mark.parametrize("fail", ["weights", "config"])
def test_an_interrupted_save_leaves_the_old_adapter(tmp_path, monkeypatch, fail):
    _, fast, _ = _pair()
    fast.save_pretrained(tmp_path / "out")
    before = _snapshot(tmp_path / "out")
    randomize_adapters(fast, seed=77)
    fast.peft_config["default"].lora_alpha = 32  # the new save would change both files
    if fail == "weights":
        import safetensors.torch

        def boom(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(safetensors.torch, "save_file", boom)
    else:
        def boom(self, *a, **k):
            raise OSError("disk full")

        monkeypatch.setattr(fastpeft.PeftConfig, "save_pretrained_to", boom)
    with pytest.raises((KeyboardInterrupt, OSError)):
        fast.save_pretrained(tmp_path / "out")
    after = _snapshot(tmp_path / "out")
    assert {k: v for k, v in after.items() if k != "README.md"} == {
        k: v for k, v in before.items() if k != "README.md"}
    assert not [f for f in os.listdir(tmp_path / "out") if f.startswith(".tmp-")]


def test_save_pretrained_takes_trainer_s_state_dict_and_refuses_unknown_arguments(tmp_path):
    ref, fast, _ = _pair()
    sd = {k: v.clone() for k, v in fast.state_dict().items()}
    randomize_adapters(fast, seed=42)  # the live weights change; the given state dict is what is saved
    fast.save_pretrained(tmp_path / "given", state_dict=sd)
    ref.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "given" / "adapter_model.safetensors"), load_file(
        tmp_path / "peft" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fast.save_pretrained(tmp_path / "none", is_main_process=False)
    assert not (tmp_path / "none").exists()
    with pytest.raises(TypeError, match="push_to_hub"):
        fast.save_pretrained(tmp_path / "bad", push_to_hub=True)


# ----- the Hub ------------------------------------------------------------------------------------
def test_push_to_hub_uploads_the_adapter_files_as_peft(fake_hub):
    ref, fast, _ = _pair()
    ref.push_to_hub("me/peft-adapter", token="hf_test", private=True)
    url = fast.push_to_hub("me/fast-adapter", token="hf_test", private=True, commit_message="Add my adapter")
    assert fake_hub.repos["me/fast-adapter"].get("visibility") == fake_hub.repos["me/peft-adapter"].get("visibility") == "private"
    ref_commit, commit = fake_hub.commits
    assert sorted(commit["files"]) == sorted(ref_commit["files"]) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert commit["summary"] == "Add my adapter" and commit["revision"] == "main"
    assert url.endswith("/commit/" + "a" * 40)
    cfg = json.loads(commit["files"]["adapter_config.json"])
    ref_cfg = json.loads(ref_commit["files"]["adapter_config.json"])
    for c in (cfg, ref_cfg):  # peft writes list(set): its order follows the hash seed
        c["target_modules"] = sorted(c["target_modules"])
    assert cfg == ref_cfg
    from safetensors.torch import load as load_bytes

    a, b = load_bytes(commit["files"]["adapter_model.safetensors"]), load_bytes(
        ref_commit["files"]["adapter_model.safetensors"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_push_to_hub_to_a_branch_and_as_a_pull_request(fake_hub):
    _, fast, _ = _pair()
    fast.push_to_hub("me/a", revision="dev")
    fast.push_to_hub("me/a", create_pr=True, commit_description="why")
    assert ("me/a", "dev") in fake_hub.branches
    assert fake_hub.commits[0]["revision"] == "dev"
    assert fake_hub.commits[1]["revision"] == "refs/pr/1" and fake_hub.pulls[0]["description"] == "why"


def test_mixin_push_to_hub_sends_what_transformers_with_peft_sends(fake_hub):
    model, _ = tiny("llama")
    model.add_adapter(peft.LoraConfig(r=4, target_modules=TARGETS))
    model.push_to_hub("me/ref")
    mine = fastpeft.with_adapters(tiny("llama")[0])
    mine.add_adapter(fastpeft.LoraConfig(r=4, target_modules=TARGETS))
    mine.push_to_hub("me/mine")
    ref_commit, commit = fake_hub.commits
    assert sorted(commit["files"]) == sorted(ref_commit["files"])
    assert "adapter_model.safetensors" in commit["files"] and "model.safetensors" not in commit["files"]


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(12, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        return self.out(self.q_proj(x))


def test_mixin_on_a_plain_module_saves_peft_files(tmp_path):
    torch.manual_seed(0)
    m = fastpeft.with_adapters(_Plain())
    m.add_adapter(fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(m, seed=4)
    m.save_pretrained(str(tmp_path / "a"))
    assert _files(tmp_path / "a") == ["adapter_config.json", "adapter_model.safetensors"]
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(_Plain(), tmp_path / "a")
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=1e-6)


def test_mixin_save_pretrained_on_a_transformers_model(tmp_path):
    """Transformers' save_pretrained passes state_dict= to get_adapter_state_dict (was a TypeError)."""
    ref, _ = tiny("llama")
    ref.add_adapter(peft.LoraConfig(r=4, target_modules=TARGETS))
    randomize_adapters(ref, seed=6)
    mine = fastpeft.with_adapters(tiny("llama")[0])
    mine.add_adapter(fastpeft.LoraConfig(r=4, target_modules=TARGETS))
    mine.load_state_dict(ref.state_dict(), strict=False)
    ref.save_pretrained(tmp_path / "ref")
    mine.save_pretrained(tmp_path / "mine")
    assert _files(tmp_path / "mine") == _files(tmp_path / "ref")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "mine" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----- loading back ---------------------------------------------------------------------------------
@pytest.mark.parametrize("auto_lib", ["fastpeft", "peft"])
def test_auto_peft_model_loads_what_fastpeft_saved(tmp_path, auto_lib):
    base, inputs = tiny("llama")
    base.save_pretrained(tmp_path / "base")
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    fast = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"))
    randomize_adapters(fast, seed=8)
    fast.save_pretrained(str(tmp_path / "adapter"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base")
    auto = (fastpeft if auto_lib == "fastpeft" else peft).AutoPeftModelForCausalLM
    loaded = auto.from_pretrained(str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(loaded, inputs()), logits(fast, inputs()), rtol=0, atol=1e-5)


def test_peft_config_objects_are_accepted_everywhere(tmp_path):
    kw = dict(r=4, target_modules=TARGETS, lora_alpha=16)
    model, inputs = tiny("llama")
    with_peft_cfg = fastpeft.get_peft_model(model, peft.LoraConfig(**kw))
    assert isinstance(with_peft_cfg.peft_config["default"], fastpeft.LoraConfig)
    randomize_adapters(with_peft_cfg, seed=3)
    model2, _ = tiny("llama")
    with_own_cfg = fastpeft.get_peft_model(model2, fastpeft.LoraConfig(**kw))
    with_own_cfg.load_state_dict(with_peft_cfg.state_dict())
    torch.testing.assert_close(logits(with_own_cfg, inputs()), logits(with_peft_cfg, inputs()), rtol=0, atol=0)
    with_peft_cfg.add_adapter("b", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert with_peft_cfg.peft_config["b"].r == 2
    injected = fastpeft.inject_adapter_in_model(peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                               feedforward_modules=["down_proj"]), tiny("llama")[0])
    assert isinstance(fastpeft.tuner._configs(injected)["default"], fastpeft.IA3Config)
    mixin = fastpeft.with_adapters(tiny("llama")[0])
    mixin.add_adapter(peft.AdaLoraConfig(target_modules=["q_proj"], total_step=10))
    assert isinstance(mixin.peft_config["default"], fastpeft.AdaLoraConfig)
    with pytest.raises(TypeError, match="unsupported config type"):
        fastpeft.get_peft_model(tiny("llama")[0], {"r": 4})


def test_unknown_keyword_arguments_raise(tmp_path):
    ref, fast, _ = _pair()
    fast.save_pretrained(str(tmp_path / "a"))
    with pytest.raises(TypeError, match="nonsense_kwarg"):
        fastpeft.PeftModel.from_pretrained(tiny("llama")[0], str(tmp_path / "a"), nonsense_kwarg=1)
    with pytest.raises(NotImplementedError, match="key_mapping"):
        fastpeft.PeftModel.from_pretrained(tiny("llama")[0], str(tmp_path / "a"), key_mapping={"a": "b"})
    with pytest.raises(TypeError, match="nonsense_kwarg"):
        fast.load_adapter(str(tmp_path / "a"), "b", nonsense_kwarg=1)
    assert list(fast.peft_config) == ["default"]


def test_load_adapter_under_an_existing_name_loads_its_weights_as_peft(tmp_path):
    ref, fast, kw = _pair()
    ref.save_pretrained(tmp_path / "a")
    model, _ = tiny("llama")
    other = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, target_modules=TARGETS))
    other.load_adapter(str(tmp_path / "a"), "default")  # what Trainer's resume does
    torch.testing.assert_close(logits(other, kw), logits(ref, kw), rtol=0, atol=1e-5)


def test_save_pretrained_converts_pissa_to_plain_lora_as_peft(tmp_path):
    """path_initial_model_for_weight_conversion: the trained PiSSA adapter is saved as the plain
    LoRA adapter on the original base weights; both libraries write the same files."""
    from safetensors.torch import load_file

    made = {}
    for lib in ("peft", "fastpeft"):
        torch.manual_seed(0)
        model, inputs = tiny("llama")
        cfg = (peft.LoraConfig if lib == "peft" else fastpeft.LoraConfig)(r=4, target_modules=TARGETS,
                                                                          init_lora_weights="pissa")
        m = (peft.get_peft_model if lib == "peft" else fastpeft.get_peft_model)(model, cfg)
        m.save_pretrained(tmp_path / lib / "init")
        with torch.no_grad():  # "training": every adapter weight moves by the same amount in both
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.add_(0.01 * torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape).cos())
        m.save_pretrained(tmp_path / lib / "plain", path_initial_model_for_weight_conversion=tmp_path / lib / "init")
        made[lib] = m
    kw = inputs()
    for sub in ("plain", "init"):
        a = load_file(tmp_path / "fastpeft" / sub / "adapter_model.safetensors")
        b = load_file(tmp_path / "peft" / sub / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
        ca = json.loads((tmp_path / "fastpeft" / sub / "adapter_config.json").read_text())
        cb = json.loads((tmp_path / "peft" / sub / "adapter_config.json").read_text())
        assert sorted(ca.pop("target_modules")) == sorted(cb.pop("target_modules"))  # peft: list(set)
        assert ca == cb, sub
    # the plain adapter on the original (untouched) base gives the trained PiSSA model's outputs
    plain = peft.PeftModel.from_pretrained(tiny("llama")[0], tmp_path / "fastpeft" / "plain")
    torch.testing.assert_close(logits(plain, kw), logits(made["fastpeft"], kw), rtol=0, atol=1e-4)
