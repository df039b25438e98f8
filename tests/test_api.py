"""API behaviour: bad input gives clear errors and leaves the model as it was; training;
adapter management (add/switch/delete/disable) and the mixin."""
import json
import os
import time

import peft
import pytest
import torch
from safetensors.torch import save_file

import fastpeft

from models import fresh_copy, logits, randomize_adapters, tiny


@pytest.fixture()
def saved(tmp_path):
    """A PEFT-saved LoRA for the tiny Llama, plus the pristine base."""
    base, inputs = tiny("llama")
    pristine = fresh_copy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(pm)
    pm.save_pretrained(str(tmp_path / "good"))
    return pristine, inputs, tmp_path


def _snapshot(model, kw):
    return logits(model, kw), sorted(model.state_dict().keys())


def _assert_unchanged(model, kw, snap):
    out, keys = snap
    torch.testing.assert_close(logits(model, kw), out, atol=0, rtol=0)
    assert sorted(model.state_dict().keys()) == keys


def _bad_adapters(tmp_path, good):
    """folder name -> (how to make it, expected message regex)."""
    cfg = json.loads(open(good / "adapter_config.json").read())
    w = dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(good / "adapter_model.safetensors")))

    def write(name, config=None, weights=None, raw_config=None, raw_weights=None):
        d = tmp_path / name
        d.mkdir()
        if raw_config is not None:
            (d / "adapter_config.json").write_text(raw_config)
        elif config is not None:
            (d / "adapter_config.json").write_text(json.dumps(config))
        if raw_weights is not None:
            (d / "adapter_model.safetensors").write_bytes(raw_weights)
        elif weights is not None:
            save_file(weights, str(d / "adapter_model.safetensors"))
        return str(d)

    good_bytes = (good / "adapter_model.safetensors").read_bytes()
    rank8 = {k: (torch.randn(8, v.shape[1]) if "lora_A" in k else torch.randn(v.shape[0], 8)) for k, v in w.items()}
    wide = {k: torch.randn(*[s * 2 if s == 32 else s for s in v.shape]) for k, v in w.items()}
    foreign = {k.replace("self_attn", "cross_attn"): v for k, v in w.items()}
    return {
        "no_config": (write("no_config", weights=w), r"adapter_config\.json"),
        "not_json": (write("not_json", raw_config="{not json", weights=w), r"(?i)json"),
        "unknown_type": (write("unknown_type", config={**cfg, "peft_type": "PROMPT_MAGIC"}, weights=w), r"PROMPT_MAGIC"),
        "no_weights": (write("no_weights", config=cfg), r"adapter_model"),
        "truncated": (write("truncated", config=cfg, raw_weights=good_bytes[: len(good_bytes) // 2]),
                      r"(?i)truncat|corrupt|invalid|safetensors"),
        "wrong_rank": (write("wrong_rank", config=cfg, weights=rank8), r"shape"),
        "wrong_hidden": (write("wrong_hidden", config=cfg, weights=wide), r"shape"),
        "foreign_keys": (write("foreign_keys", config=cfg, weights=foreign), r"match no module"),
        "missing_path": (str(tmp_path / "does_not_exist"), r"does_not_exist"),
    }


@pytest.mark.parametrize("entry", ["peft_model", "mixin"])
def test_bad_adapters_raise_and_leave_model_working(saved, entry, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pristine, inputs, tmp_path = saved
    kw = inputs()
    if entry == "peft_model":
        model = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path / "good"))
        load = lambda path, name: model.load_adapter(path, name)  # noqa: E731
    else:
        model = fastpeft.with_adapters(fresh_copy(pristine))
        model.load_adapter(str(tmp_path / "good"))
        load = lambda path, name: model.load_adapter(path, adapter_name=name)  # noqa: E731
    snap = _snapshot(model, kw)
    for _name, (path, msg) in _bad_adapters(tmp_path, tmp_path / "good").items():
        with pytest.raises(Exception, match=msg):
            load(path, "second")
        _assert_unchanged(model, kw, snap)
    # a Hub id that does not exist, offline: quick, clear, model untouched
    t0 = time.time()
    with pytest.raises(Exception, match="nobody/no-such-adapter"):
        load("nobody/no-such-adapter", "second")
    assert time.time() - t0 < 10
    _assert_unchanged(model, kw, snap)
    # an existing name: the mixin refuses it (as Transformers); PeftModel loads the file's weights
    # into it, as peft does (Trainer's resume relies on it): the same file leaves the outputs as they were
    if entry == "mixin":
        with pytest.raises(ValueError, match="already exists"):
            load(str(tmp_path / "good"), "default")
    else:
        load(str(tmp_path / "good"), "default")
    _assert_unchanged(model, kw, snap)


def test_bad_names_and_mixed_batches(saved):
    pristine, inputs, tmp_path = saved
    kw = inputs(batch=2)
    model = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path / "good"))
    snap = _snapshot(model, kw)
    with pytest.raises(ValueError, match="nope"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="nope"):
        model.delete_adapter("nope")
    with pytest.raises(ValueError, match="nope"):
        model(**kw, adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="3 adapter names for a batch of 2"):
        model(**kw, adapter_names=["default", "default", "__base__"])
    with pytest.raises(TypeError):
        model(**kw, adapter_names="default")
    _assert_unchanged(model, kw, snap)
    assert model.active_adapters == ["default"]
    # the failed mixed batch left nothing behind: a correct one still works
    out = model(**kw, adapter_names=["__base__", "default"]).logits
    with model.disable_adapter():
        base_out = logits(model, kw)
    torch.testing.assert_close(out[0], base_out[0])
    torch.testing.assert_close(out[1], snap[0][1])


def test_config_validation():
    with pytest.raises(ValueError, match="r"):
        fastpeft.LoraConfig(r=0)
    with pytest.raises(ValueError, match="dropout"):
        fastpeft.LoraConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match="bias"):
        fastpeft.LoraConfig(bias="some")


def test_adapter_targeting_nothing_is_an_error():
    base, _ = tiny("llama")
    keys = sorted(base.state_dict())
    with pytest.raises(ValueError, match="no_such_module"):
        fastpeft.get_peft_model(base, fastpeft.LoraConfig(target_modules=["no_such_module"]))
    assert sorted(base.state_dict()) == keys


def test_training_lowers_loss_and_only_adapters_train():
    torch.manual_seed(0)
    base, inputs = tiny("llama")
    config = fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"])
    model = fastpeft.get_peft_model(base, config)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    t, total = model.get_nb_trainable_parameters()
    assert 0 < t < total
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    kw = inputs(batch=4, seq=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        out = model(**kw, labels=kw["input_ids"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    # the trained adapter is what the fused inference path uses
    model.eval()
    kw2 = inputs(batch=2, seq=5, seed=7)
    with torch.no_grad():
        fused = model(**kw2).logits
    with torch.enable_grad():
        composite = model(**kw2).logits.detach()
    torch.testing.assert_close(fused, composite, atol=1e-5, rtol=1e-5)


def test_training_gradients_match_peft():
    base, inputs = tiny("llama")
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False, use_dora=True)
    pm = peft.get_peft_model(fresh_copy(base), peft.LoraConfig(**cfg))
    fm = fastpeft.get_peft_model(fresh_copy(base), fastpeft.LoraConfig(**cfg))
    fm.load_state_dict(pm.state_dict())
    kw = inputs()
    for m in (pm, fm):
        m.train()
        m(**kw, labels=kw["input_ids"]).loss.backward()
    pg = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    fg = {n: p.grad for n, p in fm.named_parameters() if p.requires_grad}
    assert pg.keys() == fg.keys()
    for n in pg:
        torch.testing.assert_close(fg[n], pg[n], atol=1e-6, rtol=1e-4, msg=n)


@pytest.mark.parametrize("kind", ["lora", "lora-embedding", "ia3"])
def test_training_after_inference_mode_forward(kind):
    """A forward under torch.inference_mode() packs the stacks that the parameters then view;
    a later training step must still get PEFT's gradients (stacks made as inference tensors
    would silently give none)."""
    base, inputs = tiny("llama")
    if kind == "ia3":
        cfgs = (peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
                fastpeft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    else:
        targets = ["q_proj", "embed_tokens"] if kind == "lora-embedding" else ["q_proj", "down_proj"]
        cfgs = (peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False),
                fastpeft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    pm = peft.get_peft_model(fresh_copy(base), cfgs[0])
    fm = fastpeft.get_peft_model(fresh_copy(base), cfgs[1])
    randomize_adapters(pm, seed=3)
    fm.load_state_dict(pm.state_dict())
    kw = inputs()
    fm.eval()
    with torch.inference_mode():
        fm(**kw)
    assert not any(p.is_inference() for p in fm.parameters())
    for m in (pm, fm):
        m.train()
        m(**kw, labels=kw["input_ids"]).loss.backward()
    pg = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    fg = {n: p.grad for n, p in fm.named_parameters() if p.requires_grad}
    assert pg.keys() == fg.keys() and pg
    for n in pg:
        assert fg[n] is not None, n
        torch.testing.assert_close(fg[n], pg[n], atol=1e-6, rtol=1e-4, msg=n)


def test_add_switch_delete_and_state_dict(tmp_path):
    base, inputs = tiny("llama")
    model = fastpeft.with_adapters(base)
    model.add_adapter(fastpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), adapter_name="a")
    model.add_adapter(fastpeft.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False), adapter_name="b")
    assert model.active_adapters() == ["b"]  # transformers: add_adapter activates the new one
    kw = inputs()
    model.eval()
    out_b = logits(model, kw)
    model.set_adapter("a")
    out_a = logits(model, kw)
    assert not torch.allclose(out_a, out_b)
    sd = model.get_adapter_state_dict("a")
    assert sd and all("lora_" in k and ".a." not in k for k in sd)
    model.set_adapter(["a", "b"])
    assert model.active_adapters() == ["a", "b"]
    model.delete_adapter("a")
    assert model.active_adapters() == ["b"]
    assert not any(".a." in k for k in model.state_dict())
    torch.testing.assert_close(logits(model, kw), out_b)
    model.delete_adapter("b")
    with pytest.raises(ValueError, match="No adapter loaded"):
        model.active_adapters()


def test_inject_adapter_in_model_plain_module():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(13, 21), torch.nn.ReLU(), torch.nn.Linear(21, 5))
    ref = peft.inject_adapter_in_model(peft.LoraConfig(r=3, target_modules=["0", "2"], init_lora_weights=False), fresh_copy(net))
    ours = fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(r=3, target_modules=["0", "2"]), net)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 13)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


def test_save_is_atomic(tmp_path, monkeypatch):
    base, inputs = tiny("llama")
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path))
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize_adapters(model)
    import safetensors.torch as st

    def boom(*a, **k):
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert not [f for f in os.listdir(tmp_path)
                if f not in ("adapter_model.safetensors", "adapter_config.json", "README.md")]


def test_import_pulls_in_no_optional_library():
    """``import fastpeft`` stays cheap (issue: 0.6 s of transformers, 0.17 s of triton): the heavy
    optional libraries are imported where they are first needed, not at import time."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # no Triton device here then
    code = ("import sys, fastpeft; "
            "print(','.join(m for m in ('transformers', 'triton', 'peft', 'bitsandbytes', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    if not torch.cuda.is_available():  # with a GPU the Triton backend imports triton to register its kernels
        assert out.stdout.strip() == "", f"import fastpeft imported {out.stdout.strip()}"
    else:
        assert "transformers" not in out.stdout


def test_demo_hides_only_the_bitsandbytes_import_notice():
    """The demo's report is fastpeft's own: bitsandbytes' "Failed to load CPU gemm_4bit_forward
    from kernels-community" (printed at its import on CPUs with AVX512-BF16) is hidden inside
    the demo's scope only; a user's own warnings still show."""
    import subprocess
    import sys

    code = ("import warnings, fastpeft.demo as d\n"
            "with d._library_notices_hidden():\n"
            "    import bitsandbytes\n"
            "warnings.warn('the user warning')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "kernels-community" not in out.stderr
    assert "the user warning" in out.stderr
    plain = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, check=True)
    if "kernels-community" not in plain.stderr:
        pytest.skip("this CPU's bitsandbytes prints no kernels-community notice (no AVX512-BF16): nothing to hide")
