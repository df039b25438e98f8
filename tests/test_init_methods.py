"""LoRA initializations fastpeft computes as PEFT does (``fastpeft.nn.lora_init``): "pissa",
"pissa_niter_<n>", "olora" (the base weights become the residual) and "orthogonal", checked
against PEFT itself in the same test: same torch seed -> the same lora_A / lora_B, the same base
weights after injection and after loading a saved adapter, the same outputs, merges and files."""
import copy
import json
import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fastpeft
from fastpeft.config import UnsupportedConfigError
from fastpeft.init_methods import convert_to_plain_lora
from fastpeft.nn import lora_init

from models import logits, randomize_adapters, tiny

INITS = ["pissa", "pissa_niter_4", "olora", "orthogonal"]


class Odd(nn.Module):
    """Linear layers of odd, non-square shapes (K != N, neither a multiple of anything)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(13, 7)
        self.b = nn.Linear(7, 19, bias=False)
        self.c = nn.Linear(19, 5)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _odd(seed=0):
    torch.manual_seed(seed)
    model = Odd().eval()

    def inputs(seed=1):
        return dict(x=torch.randn(3, 4, 13, generator=torch.Generator().manual_seed(seed)))

    return model, inputs


# arch -> (make (model, inputs), target_modules, r, alpha)
MODELS = {
    "llama": (lambda: tiny("llama"), ["q_proj", "v_proj", "down_proj", "embed_tokens"], 4, 8),
    "gpt2": (lambda: tiny("gpt2"), ["c_attn", "c_fc"], 4, 8),
    "odd": (_odd, ["a", "b", "c"], 4, 3),
}


def _out(model, kw):
    with torch.no_grad():
        out = model(**kw)
    return (out.logits if hasattr(out, "logits") else out).float()


def _base_weights(model):
    """Non-adapter weights by name as PEFT names them (``...base_layer.weight`` inside adapters)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def _pair(arch, init, dtype, seed=7, **cfg_kw):
    """(peft model, fastpeft model, inputs, pristine base) built with the same seed."""
    make, targets, r, alpha = MODELS[arch]
    base, inputs = make()
    base = base.to(dtype)
    if arch == "odd":
        inputs = (lambda f: lambda: {k: v.to(dtype) for k, v in f().items()})(inputs)
    pristine = copy.deepcopy(base)
    other = copy.deepcopy(base)
    kw = dict(r=r, lora_alpha=alpha, init_lora_weights=init, target_modules=targets)
    kw.update(cfg_kw)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(base, peft.LoraConfig(**kw))
    after_peft = torch.randn(4)
    torch.manual_seed(seed)
    fm = fastpeft.get_peft_model(other, fastpeft.LoraConfig(**kw))
    assert torch.equal(torch.randn(4), after_peft)  # the same draws, so the generator ends in the same state
    return pm.eval(), fm.eval(), inputs, pristine


def _assert_same_state(pm, fm):
    ps, fs = pm.state_dict(), fm.state_dict()
    assert set(ps) == set(fs)
    for k in ps:
        assert ps[k].dtype == fs[k].dtype, k
        torch.testing.assert_close(fs[k], ps[k], atol=0, rtol=0, msg=k)  # the same torch calls: bit for bit


def _assert_same_outputs(a, b, kw, dtype):
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(_out(a, kw), _out(b, kw), **tol)


# every init in float32; bf16 bases: every init on Llama, the SVD ones on the odd shapes, PiSSA on
# Conv1D (olora on Conv1D is refused: test_layer_level_refusals_leave_the_model_unchanged)
_BF16 = {"llama": INITS, "odd": ["pissa", "pissa_niter_4"], "gpt2": ["pissa"]}
CASES = [(arch, init, torch.float32) for arch in MODELS for init in INITS if not (arch == "gpt2" and init == "olora")]
CASES += [(arch, init, torch.bfloat16) for arch, inits in _BF16.items() for init in inits]


@pytest.mark.parametrize("arch,init,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_new_adapter_matches_peft(arch, init, dtype, tmp_path):
    pm, fm, inputs, pristine = _pair(arch, init, dtype)
    kw = inputs()
    # lora_A / lora_B, the residual base weights (the whole state dict, embeddings included)
    _assert_same_state(pm, fm)
    changed = lora_init.changes_base(init)
    before = _base_weights(pristine)
    after = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in _base_weights(fm).items()}
    moved = [k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))]
    assert bool(moved) == changed, moved
    _assert_same_outputs(fm, pm, kw, dtype)
    # residual + s B A = W (orthogonal: B A = 0 on the unchanged base): the untrained adapter
    # gives the base model's outputs (up to the residual's rounding to bf16)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(_out(fm, kw), _out(pristine, kw), **tol)
    with fm.disable_adapter(), pm.disable_adapter():  # the residual alone, as PEFT
        _assert_same_outputs(fm, pm, kw, dtype)

    # "trained" adapters (the same values in both), saved by fastpeft -> PEFT, and the other way
    randomize_adapters(pm, seed=3)
    randomize_adapters(fm, seed=3)
    _assert_same_outputs(fm, pm, kw, dtype)
    fm.save_pretrained(str(tmp_path / "ours"))
    pm.save_pretrained(str(tmp_path / "peft"))
    for folder in ("ours", "peft"):
        assert json.load(open(tmp_path / folder / "adapter_config.json"))["init_lora_weights"] == init
    # PEFT runs the init again when it loads (for pissa/olora: the residual of the fresh base),
    # then the file's weights replace A and B; fastpeft does the same
    torch.manual_seed(11)
    p_ours = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "ours")).eval()
    torch.manual_seed(11)
    f_peft = fastpeft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "peft")).eval()
    _assert_same_state(p_ours, f_peft)
    _assert_same_outputs(f_peft, p_ours, kw, dtype)
    if init != "pissa_niter_4":  # deterministic init: the loaded models are the trained ones
        _assert_same_outputs(f_peft, fm, kw, dtype)
        _assert_same_outputs(p_ours, pm, kw, dtype)

    # merge_and_unload: the same plain model
    merged_f = fm.merge_and_unload().state_dict()
    merged_p = pm.merge_and_unload().state_dict()
    assert set(merged_f) == set(merged_p)
    for k in merged_p:
        tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(merged_f[k], merged_p[k], **tol, msg=k)


def test_dora_with_pissa_matches_peft():
    for arch in ("llama", "gpt2"):
        targets = MODELS[arch][1][:2]  # (no DoRA on embeddings in fastpeft)
        pm, fm, inputs, pristine = _pair(arch, "pissa", torch.float32, use_dora=True, target_modules=targets)
        kw = inputs()
        ps, fs = pm.state_dict(), fm.state_dict()
        assert set(ps) == set(fs)
        for k in ps:  # magnitudes: ||W_res + s B A|| (= ||W||) in another order of operations
            torch.testing.assert_close(fs[k], ps[k], atol=1e-5, rtol=1e-5, msg=k)
        _assert_same_outputs(fm, pm, kw, torch.float32)
        torch.testing.assert_close(_out(fm, kw), _out(pristine, kw), atol=1e-4, rtol=1e-4)


def test_second_adapter_and_rank_pattern_match_peft():
    """A second base-rewriting adapter works on the residual of the first (with PEFT's warning),
    and rank_pattern / rslora take effect in the factors and the residual."""
    pm, fm, inputs, _ = _pair("llama", "pissa", torch.float32, rank_pattern={"v_proj": 2}, use_rslora=True)
    cfg = dict(r=2, lora_alpha=4, init_lora_weights="olora", target_modules=["q_proj", "o_proj"])
    torch.manual_seed(3)
    pm.add_adapter("second", peft.LoraConfig(**cfg))
    torch.manual_seed(3)
    fm.add_adapter("second", fastpeft.LoraConfig(**cfg))
    _assert_same_state(pm, fm)
    pm.set_adapter("second")
    fm.set_adapter("second")
    _assert_same_outputs(fm, pm, inputs(), torch.float32)


def test_loading_next_to_another_adapter_warns_as_peft(tmp_path):
    pm, fm, inputs, pristine = _pair("llama", "olora", torch.float32)
    pm.save_pretrained(str(tmp_path))
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="OLoRA"):
        pm.load_adapter(str(tmp_path), "again")
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="OLoRA"):
        fm.load_adapter(str(tmp_path), "again")
    _assert_same_state(pm, fm)  # the second OLoRA ran on the first one's residual, in both


def test_new_adapter_through_the_mixin_and_inject_matches_peft():
    base, inputs = tiny("llama")
    other = copy.deepcopy(base)
    cfg = dict(r=4, lora_alpha=8, init_lora_weights="pissa_niter_2", target_modules=["k_proj", "up_proj"])
    torch.manual_seed(5)
    pmod = peft.inject_adapter_in_model(peft.LoraConfig(**cfg), base)
    torch.manual_seed(5)
    fmod = fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(**cfg), other)
    ps, fs = pmod.state_dict(), fmod.state_dict()
    assert set(ps) == set(fs)
    for k in ps:
        torch.testing.assert_close(fs[k], ps[k], atol=0, rtol=0, msg=k)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("value", ["bogus", "PISSA", "Orthogonal", "pissa_foo", "pissa_niter_x", "pissa_niter_-1"])
def test_unknown_init_strings_raise_at_config_time(value):
    with pytest.raises(ValueError, match="init_lora_weights"):
        fastpeft.LoraConfig(target_modules=["q_proj"], init_lora_weights=value)
    if value == "pissa_niter_-1":
        return  # PEFT runs svd_lowrank with niter=-1 (as 0); fastpeft wants a non-negative integer
    # PEFT takes the config and raises when it builds the layers
    base, _ = tiny("llama")
    cfg = peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=value)
    with pytest.raises(ValueError):
        peft.get_peft_model(base, cfg)


@pytest.mark.parametrize("value", ["eva", "lora_ga", "mica"])
def test_inits_needing_data_are_refused_for_new_adapters(value):
    base, inputs = tiny("llama")
    kw = inputs()
    expected = logits(base, kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "no eva_config" warning
        cfg = fastpeft.LoraConfig(target_modules=["q_proj"], init_lora_weights=value)
    with pytest.raises(ValueError, match=rf"init_lora_weights='{value}'.*{value}"):
        fastpeft.get_peft_model(base, cfg)
    torch.testing.assert_close(logits(base, kw), expected, atol=0, rtol=0)
    assert not any("lora" in n for n, _ in base.named_modules())


@pytest.mark.parametrize("value", ["corda", "loftq"])
def test_inits_rewriting_the_base_from_data_are_refused(value):
    extra = {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}} if value == "loftq" else {}
    with pytest.raises(UnsupportedConfigError, match=rf"init_lora_weights`='{value}'.*(CorDA|LoftQ)"):
        fastpeft.LoraConfig(target_modules=["q_proj"], init_lora_weights=value, **extra)


def test_layer_level_refusals_leave_the_model_unchanged():
    # olora on Conv1D: PEFT factors the [in, out] weight untransposed (wrong shapes) -> refused
    base, inputs = tiny("gpt2")
    kw = inputs()
    expected, state = logits(base, kw), _base_weights(base)
    with pytest.raises(ValueError, match="Conv1D"):
        fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, init_lora_weights="olora", target_modules=["c_fc"]))
    # odd rank for orthogonal (PEFT's message), r above min(N, K) for PiSSA
    with pytest.raises(ValueError, match="rank to be even"):
        fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=3, init_lora_weights="orthogonal", target_modules=["c_fc"]))
    with pytest.raises(ValueError, match="larger than min"):
        fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=40, init_lora_weights="pissa", target_modules=["c_proj"]))
    torch.testing.assert_close(logits(base, kw), expected, atol=0, rtol=0)
    assert all(torch.equal(v, state[k]) for k, v in _base_weights(base).items())
    # a float64 base: PEFT's TypeError for PiSSA
    model, _ = _odd()
    with pytest.raises(TypeError, match="PiSSA under float32"):
        fastpeft.get_peft_model(model.double(), fastpeft.LoraConfig(r=2, init_lora_weights="pissa", target_modules=["a"]))


def test_failed_injection_restores_the_base_weights(tmp_path):
    """PiSSA rewrote some layers before the injection failed: the rollback puts them back."""
    base, inputs = tiny("llama")
    kw = inputs()
    pristine = copy.deepcopy(base)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=4, init_lora_weights="pissa",
                                                                           target_modules=["q_proj", "v_proj"]))
    fm.save_pretrained(str(tmp_path))
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 2  # the file's tensors have rank 4: loading fails after every layer ran PiSSA
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        fastpeft.PeftModel.from_pretrained(base, str(tmp_path))
    assert all(torch.equal(v, pristine.state_dict()[k]) for k, v in base.state_dict().items())
    torch.testing.assert_close(logits(base, kw), logits(pristine, kw), atol=0, rtol=0)
    # a successful injection keeps no copies
    assert not any(m.__dict__.get("_init_base_copies") for m in fm.modules())


# --------------------------------------------------------------------------- conversion to plain LoRA


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_convert_to_plain_lora_gives_the_trained_outputs_on_the_original_base(init, tmp_path):
    base, inputs = tiny("llama")
    kw = inputs()
    pristine = copy.deepcopy(base)
    fm = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                           target_modules=["q_proj", "gate_proj", "embed_tokens"]))
    fm.save_pretrained(str(tmp_path / "initial"))
    randomize_adapters(fm, seed=4)
    fm.save_pretrained(str(tmp_path / "trained"))
    initial, trained = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("initial", "trained"))
    sd, cfg = convert_to_plain_lora(trained, initial, fm.peft_config["default"])
    assert cfg.init_lora_weights is True and cfg.r == 8 and cfg.lora_alpha == 16
    assert fm.peft_config["default"].init_lora_weights == init  # not changed
    os.makedirs(tmp_path / "plain")
    cfg.save_pretrained(str(tmp_path / "plain"))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "plain" / "adapter_model.safetensors"))
    expected = _out(fm, kw)
    pl = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "plain")).eval()
    torch.testing.assert_close(_out(pl, kw), expected, atol=1e-4, rtol=1e-4)
    fl = fastpeft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "plain"))
    torch.testing.assert_close(_out(fl, kw), expected, atol=1e-4, rtol=1e-4)
