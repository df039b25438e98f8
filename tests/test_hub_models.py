"""Loading adapters by Hub repo id end to end, through an offline Hub cache the test builds."""
import shutil

import peft
import pytest
import torch
from huggingface_hub import constants

import fastpeft

from models import fresh_copy, logits, randomize_adapters, tiny

SHA_A = "a" * 40
SHA_B = "b" * 40


def _put(cache, repo, sha, src_dir, ref, sub=""):
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / sha / sub
    shutil.copytree(src_dir, snap, dirs_exist_ok=True)
    refs = cache / f"models--{repo.replace('/', '--')}" / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / ref).write_text(sha)


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    base, inputs = tiny("llama")
    pristine = fresh_copy(base)
    outs = {}
    for i, (sha, ref, r) in enumerate([(SHA_A, "main", 4), (SHA_B, "v2", 8)]):
        pm = peft.get_peft_model(fresh_copy(pristine), peft.LoraConfig(r=r, target_modules=["q_proj", "o_proj"]))
        randomize_adapters(pm, seed=10 + i)
        pm.eval()
        pm.save_pretrained(str(tmp_path / ref))
        outs[ref] = logits(pm, inputs())
        _put(tmp_path / "cache", "team/llama-lora", sha, tmp_path / ref, ref)
    _put(tmp_path / "cache", "team/llama-lora", SHA_A, tmp_path / "v2", "main", sub="nested")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    return pristine, inputs, outs


def test_repo_id_revision_subfolder(hub):
    pristine, inputs, outs = hub
    kw = inputs()
    m = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), "team/llama-lora")
    torch.testing.assert_close(logits(m, kw), outs["main"], atol=1e-5, rtol=1e-5)
    m2 = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), "team/llama-lora", revision="v2")
    torch.testing.assert_close(logits(m2, kw), outs["v2"], atol=1e-5, rtol=1e-5)
    m3 = fastpeft.with_adapters(fresh_copy(pristine))
    m3.load_adapter("team/llama-lora", adapter_kwargs={"subfolder": "nested"})
    torch.testing.assert_close(logits(m3, kw), outs["v2"], atol=1e-5, rtol=1e-5)
    m3.load_adapter("team/llama-lora", adapter_name="main_rev", revision="main")
    m3.set_adapter("main_rev")
    torch.testing.assert_close(logits(m3, kw), outs["main"], atol=1e-5, rtol=1e-5)


def test_unknown_repo_offline_is_clear(hub):
    pristine, inputs, _ = hub
    with pytest.raises(FileNotFoundError, match="team/missing"):
        fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), "team/missing")
