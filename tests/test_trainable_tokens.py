"""LoRA's ``trainable_token_indices`` against peft in the same test: outputs, state-dict keys,
saved files both ways, a training step, several adapters, mixed batches, merging, disabling,
and the combinations fastpeft refuses."""
import copy

import pytest
import torch
import transformers as tf

import fastpeft
from fastpeft.nn.trainable_tokens import TrainableTokensWrapper

from models import tiny

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

ATOL = 1e-5
TOKENS = [1, 5, 7]
IDS = torch.tensor([[1, 2, 3, 5, 7, 9], [7, 3, 1, 4, 5, 6], [8, 7, 2, 1, 0, 8]])


def _model(arch):
    """(model, name of the input embedding, whether the LM head is tied to it)."""
    if arch == "llama_tied":
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)
        model = tf.LlamaForCausalLM(cfg).eval()
    else:
        model, _ = tiny(arch)
    emb = "transformer.wte" if arch == "gpt2" else "model.embed_tokens"
    return model, emb, arch != "llama"


def _configs(arch, form, tokens=TOKENS):
    target = ["c_attn"] if arch == "gpt2" else ["q_proj"]
    spec = tokens if form == "list" else {("wte" if arch == "gpt2" else "embed_tokens"): tokens}
    return (peft.LoraConfig(target_modules=target, trainable_token_indices=spec),
            fastpeft.LoraConfig(target_modules=target, trainable_token_indices=spec))


def _randomize(pm, seed=0):
    """Random LoRA weights and token rows in the peft model (the tied LM head shares its rows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "trainable_tokens_delta" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _pair(arch, form="list", seed=0):
    base, emb, tied = _model(arch)
    pristine = copy.deepcopy(base)
    pcfg, fcfg = _configs(arch, form)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fcfg)
    _randomize(pm, seed)
    fm.load_state_dict(pm.state_dict())
    return pm.eval(), fm.eval(), pristine, emb, tied


def _logits(m, ids=IDS, **kw):
    with torch.no_grad():
        return m(input_ids=ids, **kw).logits


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


# --------------------------------------------------------------------------- outputs and keys

@pytest.mark.parametrize("form", ["list", "dict"])
@pytest.mark.parametrize("arch", ["llama", "llama_tied", "gpt2"])
def test_outputs_and_state_dict_match_peft(arch, form):
    pm, fm, pristine, emb, tied = _pair(arch, form)
    assert _shapes(fm.state_dict()) == _shapes(pm.state_dict())
    layer = fm.get_submodule(f"base_model.model.{emb}")
    assert isinstance(layer, TrainableTokensWrapper) and layer.token_indices == {"default": TOKENS}
    head = fm.base_model.model.lm_head
    assert isinstance(head, TrainableTokensWrapper) == tied
    if tied:
        assert head.tied_source is layer and head.trainable_tokens_delta is layer.trainable_tokens_delta
    out = _logits(fm)
    torch.testing.assert_close(out, _logits(pm), atol=ATOL, rtol=0)
    assert not torch.allclose(out, _logits(pristine), atol=1e-3)
    # trainable: the LoRA weights and the rows (once), nothing of the base
    ours = {n for n, p in fm.named_parameters() if p.requires_grad}
    assert ours == {n for n, p in pm.named_parameters() if p.requires_grad}
    # disabled: the base model, in both
    with fm.disable_adapter(), pm.disable_adapter():
        torch.testing.assert_close(_logits(fm), _logits(pristine), atol=ATOL, rtol=0)
        torch.testing.assert_close(_logits(pm), _logits(pristine), atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(fm), out)


# --------------------------------------------------------------------------- saving

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_and_load_both_ways(arch, tmp_path):
    pm, fm, pristine, emb, tied = _pair(arch)
    pm.save_pretrained(tmp_path / "peft")
    fm.save_pretrained(str(tmp_path / "ours"))
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert _shapes(mine) == _shapes(theirs)
    key = f"base_model.model.{emb}.token_adapter.trainable_tokens_delta"
    assert mine[key].shape == (len(TOKENS), 32) and torch.equal(mine[key], theirs[key])
    assert not any("lm_head" in k for k in mine), "a tied head's rows are the embedding's: saved once"
    ref = _logits(pm)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "peft")).eval()
    assert not [w for w in caught if "not in the file" in str(w.message)]
    torch.testing.assert_close(_logits(loaded), ref, atol=ATOL, rtol=0)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_logits(back), ref, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- training

@pytest.mark.parametrize("arch", ["llama", "llama_tied", "gpt2"])
def test_training_step_matches_peft(arch):
    pm, fm, pristine, emb, tied = _pair(arch)
    pm.train()
    fm.train()
    labels = IDS.clone()
    losses = []
    for m in (pm, fm):
        torch.manual_seed(0)  # gpt2's dropout draws the same masks in both
        out = m(input_ids=IDS, labels=labels)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    theirs = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    ours = {n: p.grad for n, p in fm.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs)
    for n in theirs:
        torch.testing.assert_close(ours[n], theirs[n], atol=1e-5, rtol=1e-4, msg=n)
    delta = f"base_model.model.{emb}.token_adapter.trainable_tokens_delta.default"
    assert ours[delta].abs().sum() > 0
    before = fm.get_submodule(f"base_model.model.{emb}").weight.detach().clone()  # rows written in
    base_before = {n: p.detach().clone() for n, p in fm.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in fm.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    assert all(torch.equal(p, base_before[n]) for n, p in fm.named_parameters() if not p.requires_grad)
    after = fm.get_submodule(f"base_model.model.{emb}").weight.detach()
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == TOKENS


# --------------------------------------------------------------------------- several adapters

def _two_adapters(arch):
    pm, fm, pristine, emb, tied = _pair(arch)
    pcfg, fcfg = _configs(arch, "list", tokens=[2, 3, 9])
    pm.add_adapter("b", pcfg)
    fm.add_adapter("b", fcfg)
    _randomize(pm, seed=1)
    fm.load_state_dict(pm.state_dict())
    return pm.eval(), fm.eval(), pristine, emb, tied


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
def test_two_adapters_and_mixed_batch(arch):
    pm, fm, pristine, emb, tied = _two_adapters(arch)
    layer = fm.get_submodule(f"base_model.model.{emb}")
    assert layer.token_indices == {"default": TOKENS, "b": [2, 3, 9]}
    per = {}
    for name in ("default", "b"):
        pm.set_adapter(name)
        fm.set_adapter(name)
        per[name] = _logits(fm)
        torch.testing.assert_close(per[name], _logits(pm), atol=ATOL, rtol=0)
    with fm.disable_adapter():
        per["__base__"] = _logits(fm)
    fm.set_adapter("default")
    pm.set_adapter("default")
    names = ["b", "__base__", "default"]
    mixed = _logits(fm, adapter_names=names)
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], per[n][i], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed, _logits(pm, adapter_names=names), atol=ATOL, rtol=0)
    # fastpeft's own block (a name per row) gives the same
    with fastpeft.mixed_batch(fm.base_model.model, names):
        torch.testing.assert_close(_logits(fm), mixed)


def test_adapter_without_tokens_in_a_mixed_batch_gets_the_base_rows():
    pm, fm, pristine, emb, tied = _pair("llama_tied")
    fm.add_adapter("plain", fastpeft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    per = {}
    for name in ("default", "plain"):
        fm.set_adapter(name)
        per[name] = _logits(fm)
    fm.set_adapter("default")
    mixed = _logits(fm, adapter_names=["plain", "default", "plain"])
    for i, n in enumerate(["plain", "default", "plain"]):
        torch.testing.assert_close(mixed[i], per[n][i], atol=ATOL, rtol=0)


def test_several_active_adapters_apply_their_disjoint_rows():
    pm, fm, pristine, emb, tied = _two_adapters("llama")
    fm.set_adapter(["default", "b"])
    layer = fm.get_submodule(f"base_model.model.{emb}")
    w = layer.weight
    base = layer.base_layer.weight
    for name in ("default", "b"):
        idx = layer.token_indices[name]
        assert torch.equal(w[idx], layer.trainable_tokens_delta[name])
    untouched = [i for i in range(base.shape[0]) if i not in TOKENS + [2, 3, 9]]
    assert torch.equal(w[untouched], base[untouched])
    _logits(fm)
    fm.add_adapter("c", fastpeft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[5, 11]))
    fm.set_adapter(["default", "c"])
    with pytest.raises(ValueError, match="Only disjunct token indices"):
        _logits(fm)


# --------------------------------------------------------------------------- merging

@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
def test_merge_unmerge_and_unload_match_peft(arch):
    pm, fm, pristine, emb, tied = _pair(arch)
    ref = _logits(pm)
    w0 = fm.get_submodule(f"base_model.model.{emb}").base_layer.weight.detach().clone()
    fm.merge_adapter()
    torch.testing.assert_close(_logits(fm), ref, atol=ATOL, rtol=0)
    fm.unmerge_adapter()
    assert torch.equal(fm.get_submodule(f"base_model.model.{emb}").base_layer.weight, w0)
    torch.testing.assert_close(_logits(fm), ref, atol=ATOL, rtol=0)
    theirs = pm.merge_and_unload()
    ours = fm.merge_and_unload()
    assert not any(isinstance(m, TrainableTokensWrapper) for m in ours.modules())
    e_ours, e_theirs = ours.get_input_embeddings(), theirs.get_input_embeddings()
    assert type(e_ours) is type(e_theirs)
    assert torch.equal(e_ours.weight, e_theirs.weight)
    changed = (e_ours.weight != w0).any(dim=1).nonzero().flatten().tolist()
    assert changed == TOKENS
    assert (ours.lm_head.weight is e_ours.weight) == tied
    torch.testing.assert_close(_logits(ours), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(theirs), ref, atol=ATOL, rtol=0)


def test_dict_form_ties_equal_ids_like_peft_and_delete_adapter():
    base, emb, _ = _model("llama_tied")
    spec = {"embed_tokens": TOKENS, "lm_head": TOKENS}
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=spec))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(target_modules=["q_proj"],
                                                                          trainable_token_indices=spec))
    _randomize(pm)
    fm.load_state_dict(pm.state_dict())
    assert _shapes(fm.state_dict()) == _shapes(pm.state_dict())
    assert fm.base_model.model.lm_head.tied_source is fm.base_model.model.model.embed_tokens
    torch.testing.assert_close(_logits(fm.eval()), _logits(pm.eval()), atol=ATOL, rtol=0)
    fm.add_adapter("b", fastpeft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3]))
    assert fm.base_model.model.lm_head.adapter_names == ["default", "b"]
    fm.delete_adapter("b")
    assert "b" not in fm.base_model.model.model.embed_tokens.trainable_tokens_delta
    assert fm.base_model.model.lm_head.adapter_names == ["default"]
    # different ids: nothing tied, each layer its own rows (as peft)
    spec = {"embed_tokens": TOKENS, "lm_head": [2, 4]}
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=spec))
    fm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(target_modules=["q_proj"],
                                                                          trainable_token_indices=spec))
    _randomize(pm)
    fm.load_state_dict(pm.state_dict())
    assert fm.base_model.model.lm_head.tied_source is None
    assert _shapes(fm.state_dict()) == _shapes(pm.state_dict())
    torch.testing.assert_close(_logits(fm.eval()), _logits(pm.eval()), atol=ATOL, rtol=0)
    # a later adapter cannot tie the head that now has rows of its own (peft mixes them up)
    with pytest.raises(ValueError, match="cannot be tied"):
        fm.add_adapter("b", fastpeft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3]))
    assert list(fm.peft_config) == ["default"]
    assert fm.base_model.model.model.embed_tokens.adapter_names == ["default"]
    torch.testing.assert_close(_logits(fm), _logits(pm), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- refused

def _unchanged(model, before):
    assert not any(hasattr(m, "base_layer") for m in model.modules())
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(target_modules=["q_proj", "embed_tokens"], trainable_token_indices=[1, 2]), TypeError,
     "cannot be applied to modules of type LoraEmbedding"),
    (dict(target_modules=["q_proj", "lm_head"], trainable_token_indices=[1, 2]), TypeError, "tied output layer"),
    (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"], trainable_token_indices=[1, 2]), ValueError,
     "already marked to be trained fully"),
    (dict(target_modules=["q_proj"], trainable_token_indices=[1, 1, 2]), ValueError, "repeats token id"),
    (dict(target_modules=["q_proj"], trainable_token_indices=[-1]), ValueError, "non-negative"),
    (dict(target_modules=["q_proj"], trainable_token_indices=[1, 200]), ValueError, "out of range"),
    (dict(target_modules=["q_proj"], trainable_token_indices={"nope": [1]}), ValueError, "not found"),
])
def test_refused_combinations_leave_the_model_unchanged(kwargs, error, match):
    model, _, _ = _model("llama_tied")
    before = model.state_dict()
    with pytest.raises(error, match=match):
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(**kwargs))
    _unchanged(model, before)


def test_lora_on_a_trainable_tokens_layer_of_another_adapter_is_refused():
    pm, fm, pristine, emb, tied = _pair("llama")
    with pytest.raises(ValueError, match="LoRA on it is not supported"):
        fm.add_adapter("b", fastpeft.LoraConfig(target_modules=["embed_tokens"]))
    assert list(fm.peft_config) == ["default"]
    torch.testing.assert_close(_logits(fm), _logits(pm), atol=ATOL, rtol=0)
