"""Parity with peft 0.21 for three layer kinds / options: LoRA on nn.MultiheadAttention
(fastpeft/nn/lora_mha.py), DoRA on nn.Embedding (fastpeft/nn/dora_embedding.py) and
layer_replication (fastpeft/replication.py): outputs, state-dict keys and shapes, files both
ways, merging, a training step's gradients, mixed batches."""
import copy
import json

import peft
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.nn.lora_mha import LoraMultiheadAttention, MhaOutProjLora

from models import logits, randomize_adapters, tiny

pytestmark = pytest.mark.filterwarnings("ignore")
ATOL = 1e-6


def _close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def _same_state(fm, pm):
    ours, theirs = fm.state_dict(), pm.state_dict()
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, k


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _assert_same_grads(fm, pm):
    fg, pg = _grads(fm), _grads(pm)
    assert set(fg) == set(pg) and fg
    for k in pg:
        _close(fg[k], pg[k], atol=1e-5)


# =========================================================================== nn.MultiheadAttention


class AttnNet(nn.Module):
    """x [B, L, 8] (batch_first) or [L, B, 8] -> [.., 5] through one nn.MultiheadAttention."""

    def __init__(self, batch_first=True, embed=24, heads=4):
        super().__init__()
        self.inp = nn.Linear(8, embed)
        self.mha = nn.MultiheadAttention(embed, heads, batch_first=batch_first)
        self.head = nn.Linear(embed, 5)

    def forward(self, x, key_padding_mask=None):
        h = self.inp(x)
        a, _ = self.mha(h, h, h, key_padding_mask=key_padding_mask)
        return self.head(a)


def _attn(batch_first, seed=0):
    torch.manual_seed(seed)
    return AttnNet(batch_first).eval()


def _x(batch_first, batch=3, seq=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, 8, generator=g)
    return x if batch_first else x.transpose(0, 1).contiguous()


def _mha_pair(batch_first, **cfg):
    base = _attn(batch_first)
    cfg = dict(r=4, lora_alpha=8, target_modules=["mha"], **cfg)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    randomize_adapters(pm, seed=4, scale=0.3)
    fm.load_state_dict(pm.state_dict())
    return base, pm.eval(), fm.eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_outputs_keys_merge_and_grads(batch_first):
    base, pm, fm = _mha_pair(batch_first, lora_dropout=0.3)  # peft's MHA never applies lora_dropout
    _same_state(fm, pm)
    layer = fm.base_model.model.mha
    assert isinstance(layer, LoraMultiheadAttention) and isinstance(layer.base_layer.out_proj, MhaOutProjLora)
    assert layer.lora_B["default"].weight.shape == (72, 4) and layer.batch_first == batch_first
    x = _x(batch_first)
    with torch.no_grad():
        expected, base_out = pm(x), base(x)
        _close(fm(x), expected)  # eval + no_grad: PyTorch's fast path where it applies, as in peft
        assert (expected - base_out).abs().max() > 1e-2
        with fm.disable_adapter():
            _close(fm(x), base_out, atol=0)
    # a training step: same loss, same gradients (peft's out_proj delta counts twice, its gradient once)
    pm.train(), fm.train()
    pm(x).square().mean().backward()
    fm(x).square().mean().backward()
    _assert_same_grads(fm, pm)
    pm.eval(), fm.eval()
    with torch.no_grad():
        fm.merge_adapter()
        _close(fm(x), expected)
        fm.unmerge_adapter()
        _close(fm(x), expected)
        _close(fm.state_dict()["base_model.model.mha.base_layer.in_proj_weight"],
               base.state_dict()["mha.in_proj_weight"], atol=1e-6)
        merged_p, merged_f = pm.merge_and_unload(), fm.merge_and_unload()
        assert type(merged_f.mha) is nn.MultiheadAttention and type(merged_f.mha.out_proj) is type(base.mha.out_proj)
        assert set(merged_f.state_dict()) == set(base.state_dict())
        _close(merged_f(x), merged_p(x))
        _close(merged_f(x), expected, atol=1e-5)


def test_mha_files_both_ways(tmp_path):
    base, pm, fm = _mha_pair(True)
    x = _x(True)
    with torch.no_grad():
        expected = pm(x)
    pm.save_pretrained(tmp_path / "p")
    loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p")).eval()
    with torch.no_grad():
        _close(loaded(x), expected)
    loaded.save_pretrained(str(tmp_path / "f"))
    from safetensors.torch import load_file

    theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("p", "f"))
    assert set(ours) == set(theirs) == {f"base_model.model.mha.{p}lora_{ab}.weight" for p in ("", "base_layer.out_proj.")
                                         for ab in "AB"}
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "f")).eval()
    with torch.no_grad():
        _close(back(x), expected)


def test_mha_several_adapters_and_mixed_batch():
    base = _attn(True)
    cfg_a, cfg_b = dict(r=4, lora_alpha=8, target_modules=["mha"]), dict(r=2, lora_alpha=3, use_rslora=True,
                                                                        target_modules=["mha", "head"])
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg_a))
    pm.add_adapter("b", peft.LoraConfig(**cfg_b))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg_a))
    fm.add_adapter("b", fastpeft.LoraConfig(**cfg_b))
    randomize_adapters(pm, seed=7, scale=0.3)
    _same_state(fm, pm)
    fm.load_state_dict(pm.state_dict())
    pm.eval(), fm.eval()
    x = _x(True, batch=4)
    per = {}
    with torch.no_grad():
        for name in ("default", "b"):
            pm.set_adapter(name), fm.set_adapter(name)
            per[name] = pm(x)
            _close(fm(x), per[name])
        with pm.disable_adapter():
            per["__base__"] = pm(x)
        pm.base_model.set_adapter(["default", "b"])
        fm.set_adapter(["default", "b"])
        _close(fm(x), pm(x))  # both active: their deltas summed (each merge of peft's forward)
        names = ["b", "__base__", "default", "b"]
        expected = torch.stack([per[n][i] for i, n in enumerate(names)])
        _close(fm(x, adapter_names=names), expected)  # peft refuses mixed batches on MHA; per-row adapters here
        with fastpeft.mixed_batch(fm, names):
            _close(fm(x), expected)
    # training in a mixed batch: each row's gradient as that adapter alone would give it
    fm.train()
    layer = fm.base_model.model.mha
    h = fm.base_model.model.inp(x).detach()
    kpm = torch.zeros(4, 5, dtype=torch.bool)
    kpm[1, -2:] = True
    out, w = layer(h, h, h, key_padding_mask=kpm, adapter_names=["default", "b", "__base__", "default"])
    assert w.shape == (4, 5, 5)
    for i, n in enumerate(["default", "b", "__base__", "default"]):
        fm.set_adapter(n if n != "__base__" else "default")
        with torch.no_grad(), (fm.disable_adapter() if n == "__base__" else torch.enable_grad()):
            ref, ref_w = layer(h[i:i + 1], h[i:i + 1], h[i:i + 1], key_padding_mask=kpm[i:i + 1])
        _close(out[i:i + 1], ref, atol=1e-5)
        _close(w[i:i + 1], ref_w, atol=1e-5)


def test_mha_seq_first_mixed_batch_with_3d_mask():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=False)
    fm_model = nn.Sequential()
    fm_model.add_module("mha", mha)
    fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(r=4, target_modules=["mha"], init_lora_weights=False), fm_model, "a")
    fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(r=2, target_modules=["mha"], init_lora_weights=False), fm_model, "b")
    layer = fm_model.mha
    q, k = torch.randn(6, 3, 16), torch.randn(4, 3, 16)
    mask = torch.rand(3 * 2, 6, 4) > 0.7
    mask[..., 0] = False
    names = ["b", "a", "b"]
    with torch.no_grad():
        out, w = layer(q, k, k, attn_mask=mask, adapter_names=names)
        for i, n in enumerate(names):
            layer.set_adapter(n)
            ref, ref_w = layer(q[:, i:i + 1], k[:, i:i + 1], k[:, i:i + 1], attn_mask=mask[2 * i:2 * i + 2])
            _close(out[:, i:i + 1], ref, atol=1e-5)
            _close(w[i:i + 1], ref_w, atol=1e-5)
        with pytest.raises(ValueError, match="unbatched"):
            layer(q[:, 0], k[:, 0], k[:, 0], adapter_names=["a"])


def test_mha_refusals_leave_the_model_untouched(tmp_path):
    base = _attn(True)
    with pytest.raises(ValueError, match="DoRA"):
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["mha"], use_dora=True))
    for cfg, match in ((fastpeft.LoraConfig(target_modules=["mha"], use_dora=True), "DoRA"),
                       (fastpeft.LoraConfig(target_modules=["mha"], lora_bias=True), "lora_bias"),
                       (fastpeft.LoraConfig(target_modules=["mha"], init_lora_weights="olora"), "init_lora_weights"),
                       (fastpeft.IA3Config(target_modules=["mha"], feedforward_modules=[]), "MultiheadAttention")):
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match=match):
            fastpeft.get_peft_model(model, cfg)
        assert type(model.mha.out_proj) is type(base.mha.out_proj) and not getattr(model, "peft_config", None)
    odd = nn.Sequential()
    odd.add_module("mha", nn.MultiheadAttention(16, 2, kdim=8, vdim=8))
    with pytest.raises(ValueError, match="_qkv_same_embed_dim"):
        fastpeft.get_peft_model(odd, fastpeft.LoraConfig(target_modules=["mha"]))
    # weights that do not fit: the injection is rolled back, out_proj is the plain linear again
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["mha"]))
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="shape"):
        fastpeft.PeftModel.from_pretrained(model, str(tmp_path))
    assert type(model.mha) is nn.MultiheadAttention and type(model.mha.out_proj) is type(base.mha.out_proj)
    assert set(model.state_dict()) == set(base.state_dict())


# =========================================================================== DoRA on nn.Embedding

DORA_EMB = dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens", "q_proj"])


def _llama_pair(cfg, seed=0):
    base, inputs = tiny("llama")
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    torch.manual_seed(seed)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    return base, inputs, pm, fm


def test_dora_embedding_parity_files_merge_and_grads(tmp_path):
    base, inputs, pm, fm = _llama_pair(DORA_EMB)
    _same_state(fm, pm)
    for k, v in pm.state_dict().items():  # the same fresh adapter for the same seed, magnitude included
        _close(fm.state_dict()[k], v, atol=1e-6)
    emb = fm.base_model.model.model.embed_tokens
    assert emb.lora_magnitude_vector["default"].weight.shape == (32,)
    randomize_adapters(pm, seed=5, scale=0.3)
    fm.load_state_dict(pm.state_dict())
    pm.eval(), fm.eval()
    kw = inputs()
    expected = logits(pm, kw)
    _close(logits(fm, kw), expected, atol=1e-5)  # fused lookup times g
    with torch.enable_grad():  # the unfused route (gradients needed)
        _close(fm(**kw).logits.detach(), expected, atol=1e-5)
    # files both ways
    pm.save_pretrained(tmp_path / "p")
    loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p"))
    _close(logits(loaded, kw), expected, atol=1e-5)
    loaded.save_pretrained(str(tmp_path / "f"))
    from safetensors.torch import load_file

    theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("p", "f"))
    assert set(ours) == set(theirs) and "base_model.model.model.embed_tokens.lora_magnitude_vector" in ours
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "f")).eval()
    _close(logits(back, kw), expected, atol=1e-5)
    # a training step: same gradients (magnitude too; the norm is detached in both)
    pm.train(), fm.train()
    pm(**kw).logits.square().mean().backward()
    fm(**kw).logits.square().mean().backward()
    _assert_same_grads(fm, pm)
    assert emb.lora_magnitude_vector["default"].weight.grad.abs().max() > 0
    pm.eval(), fm.eval()
    fm.merge_adapter()
    _close(logits(fm, kw), expected, atol=1e-5)
    fm.unmerge_adapter()
    _close(emb.base_layer.weight, base.model.embed_tokens.weight, atol=1e-6)
    merged_p, merged_f = pm.merge_and_unload(), fm.merge_and_unload()
    _close(merged_f.model.embed_tokens.weight, merged_p.model.embed_tokens.weight, atol=1e-6)
    _close(logits(merged_f, kw), expected, atol=1e-5)


def test_dora_embedding_several_adapters_mixed_batch_and_merge():
    cfg_b = dict(r=3, lora_alpha=2, use_dora=False, target_modules=["embed_tokens"])
    cfg_c = dict(r=2, lora_alpha=4, use_dora=True, use_rslora=True, target_modules=["embed_tokens", "v_proj"])
    base, inputs, pm, fm = _llama_pair(DORA_EMB)
    for name, cfg in (("b", cfg_b), ("c", cfg_c)):
        pm.add_adapter(name, peft.LoraConfig(**cfg))
        fm.add_adapter(name, fastpeft.LoraConfig(**cfg))
    randomize_adapters(pm, seed=9, scale=0.3)
    _same_state(fm, pm)
    fm.load_state_dict(pm.state_dict())
    pm.eval(), fm.eval()
    kw = inputs(batch=4, seq=6)
    per = {}
    for name in ("default", "b", "c"):
        pm.set_adapter(name), fm.set_adapter(name)
        per[name] = logits(pm, kw)
        _close(logits(fm, kw), per[name], atol=1e-5)
    with pm.disable_adapter():
        per["__base__"] = logits(pm, kw)
    for both in (["default", "b"], ["b", "c"], ["c", "default"]):  # DoRA scales the running output (peft's order)
        pm.base_model.set_adapter(both)
        fm.set_adapter(both)
        _close(logits(fm, kw), logits(pm, kw), atol=1e-5)
    # peft refuses mixed batches with DoRA; per row, fastpeft gives what that adapter alone gives
    names = ["c", "__base__", "default", "b"]
    expected = torch.stack([per[n][i] for i, n in enumerate(names)])
    fm.set_adapter("default")
    _close(fm(**kw, adapter_names=names).logits.detach(), expected, atol=1e-5)  # unfused (gradients on)
    with torch.no_grad():
        _close(fm(**kw, adapter_names=names).logits, expected, atol=1e-5)  # fused, per-row g
    # merging two DoRA adapters one after the other: the norm of the unmerged weight, as peft
    pm.base_model.set_adapter(["default", "c"])
    fm.set_adapter(["default", "c"])
    both = logits(pm, kw)
    pm.merge_adapter(["default", "c"])
    fm.merge_adapter(["default", "c"])
    _close(fm.base_model.model.model.embed_tokens.base_layer.weight,
           pm.base_model.model.model.embed_tokens.base_layer.weight, atol=1e-6)
    _close(logits(fm, kw), both, atol=1e-5)
    fm.unmerge_adapter()
    pm.unmerge_adapter()
    restored = fm.base_model.model.model.embed_tokens.base_layer.weight
    # W / g - delta: fp32 round-off grows where a (randomized) magnitude is small; peft's is as large
    _close(restored, pm.base_model.model.model.embed_tokens.base_layer.weight, atol=1e-4)
    _close(restored, base.model.embed_tokens.weight, atol=1e-4)


class ScaledEmbedding(nn.Embedding):
    """An embedding scaling its output (Gemma's ``*ScaledWordEmbedding``); peft scales the adapters' output too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(3.0), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


class TokNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = ScaledEmbedding(40, 12)
        self.head = nn.Linear(12, 7)

    def forward(self, ids):
        return self.head(self.embed_tokens(ids))


@pytest.mark.parametrize("use_dora", [False, True])
def test_scaled_embedding_lora_and_dora(use_dora):
    torch.manual_seed(0)
    base = TokNet()
    cfg = dict(r=4, lora_alpha=8, use_dora=use_dora, target_modules=["embed_tokens"])
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    randomize_adapters(pm, seed=2, scale=0.3)
    fm.load_state_dict(pm.state_dict())
    pm.eval(), fm.eval()
    ids = torch.randint(0, 40, (3, 5))
    with torch.no_grad():
        _close(fm(ids), pm(ids), atol=1e-5)
        names = ["default", "__base__", "default"]
        if not use_dora:  # peft's mixed batch (refused by peft with DoRA)
            _close(fm(ids, adapter_names=names), pm(ids, adapter_names=names), atol=1e-5)


# =========================================================================== layer_replication

REPL = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], layer_replication=[[0, 2], [1, 2]])


def test_layer_replication_parity_files_and_grads(tmp_path):
    base, inputs = tiny("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**REPL))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**REPL))
    _same_state(fm, pm)
    layers = fm.base_model.model.model.layers
    assert len(layers) == 3 and fm.base_model.model.config.num_hidden_layers == 3
    assert [m.self_attn.layer_idx for m in layers] == [0, 1, 2]
    assert layers[1].mlp.up_proj.weight is layers[2].mlp.up_proj.weight  # shared base weights
    assert layers[1].self_attn.q_proj.lora_A["default"].weight is not layers[2].self_attn.q_proj.lora_A["default"].weight
    randomize_adapters(pm, seed=3)
    fm.load_state_dict(pm.state_dict())
    pm.eval(), fm.eval()
    kw = inputs()
    expected = logits(pm, kw)
    _close(logits(fm, kw), expected, atol=1e-5)
    pm.save_pretrained(tmp_path / "p")
    loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p"))
    _close(logits(loaded, kw), expected, atol=1e-5)
    assert loaded.peft_config["default"].layer_replication == [[0, 2], [1, 2]]
    mixin = fastpeft.with_adapters(copy.deepcopy(base))
    mixin.load_adapter(str(tmp_path / "p"))
    _close(logits(mixin, kw), expected, atol=1e-5)
    loaded.save_pretrained(str(tmp_path / "f"))
    from safetensors.torch import load_file

    theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("p", "f"))
    assert set(ours) == set(theirs) and any(".layers.2." in k for k in ours)
    assert json.loads((tmp_path / "f" / "adapter_config.json").read_text())["layer_replication"] == [[0, 2], [1, 2]]
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "f")).eval()
    _close(logits(back, kw), expected, atol=1e-5)
    assert loaded.generate(**kw, max_new_tokens=3, do_sample=False).shape == (2, 10)  # KV cache over 3 layers
    # a training step
    pm.train(), fm.train()
    pm(**kw).logits.square().mean().backward()
    fm(**kw).logits.square().mean().backward()
    _assert_same_grads(fm, pm)
    # a second adapter without layer_replication targets the replicated stack, as in peft
    pm.add_adapter("b", peft.LoraConfig(r=2, target_modules=["k_proj"]))
    fm.add_adapter("b", fastpeft.LoraConfig(r=2, target_modules=["k_proj"]))
    _same_state(fm, pm)


def test_layer_replication_refusals_and_rollback():
    base, inputs = tiny("llama")
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**REPL))
    randomize_adapters(fm)
    kw = inputs()
    expected = logits(fm, kw)
    for merge in (fm.merge_adapter, fm.merge_and_unload):  # copies share base weights (peft merges them wrongly)
        with pytest.raises(ValueError, match="replicated"):
            merge()
    _close(logits(fm, kw), expected, atol=0)
    with pytest.raises(ValueError, match="already has adapters"):
        fm.add_adapter("b", fastpeft.LoraConfig(r=2, target_modules=["q_proj"], layer_replication=[[0, 3]]))
    assert len(fm.base_model.model.model.layers) == 3 and list(fm.peft_config) == ["default"]
    unloaded = fm.unload()
    assert len(unloaded.model.layers) == 3  # the replicated stack stays, as in peft
    # nothing targeted after replicating: the original stack and config again
    model = copy.deepcopy(base)
    with pytest.raises(ValueError):
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(target_modules=["nothing"], layer_replication=[[0, 2], [0, 2]]))
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert model.model.layers[0].self_attn.layer_idx == 0
    # a layout peft cannot replicate either
    gpt2, _ = tiny("gpt2")
    with pytest.raises(ValueError, match="Could not locate"):
        peft.get_peft_model(copy.deepcopy(gpt2), peft.LoraConfig(target_modules=["c_attn"], layer_replication=[[0, 2]]))
    with pytest.raises(ValueError, match="layer_replication: could not locate"):
        fastpeft.get_peft_model(gpt2, fastpeft.LoraConfig(target_modules=["c_attn"], layer_replication=[[0, 2]]))
    assert not getattr(gpt2, "peft_config", None)
    with pytest.raises(ValueError, match="outside the model's 2 layers"):
        fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(target_modules=["q_proj"],
                                                                         layer_replication=[[0, 3]]))


def test_layer_replication_adalora():
    base, inputs = tiny("llama")
    cfg = dict(init_r=4, target_r=2, lora_alpha=8, target_modules=["q_proj"], total_step=10,
               layer_replication=[[0, 2], [0, 1]])
    pm = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**cfg))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.AdaLoraConfig(**cfg))
    _same_state(fm, pm)
    randomize_adapters(pm, seed=6)
    fm.load_state_dict(pm.state_dict())
    pm.eval(), fm.eval()
    kw = inputs()
    _close(logits(fm, kw), logits(pm, kw), atol=1e-5)
