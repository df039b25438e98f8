"""PEFT 0.21's LoRA variants (fastpeft/nn/lora_variants) against peft: aLoRA, Arrow, BD-LoRA, KaSA
(outputs, keys and shapes, files both ways, mixed batches, merging, a training step), and the
variants fastpeft refuses (VeLoRA, MonteCLoRA) give a clear error for a peft-saved adapter."""
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

import fastpeft  # noqa: E402
from fastpeft import tuner  # noqa: E402
from fastpeft.config import UnsupportedConfigError  # noqa: E402
from fastpeft.nn.lora_variants import alora  # noqa: E402
from fastpeft.nn.lora_variants.arrow import create_arrow_model  # noqa: E402
from fastpeft.nn.lora_variants.kasa import kasa_loss  # noqa: E402

from models import fresh_copy, randomize_adapters, tiny  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
TIGHT = dict(atol=2e-6, rtol=1e-5)
TOKENS = [5, 6]


def _ids():
    """4 rows of 9 tokens: the invocation tokens once (row 0), never (row 1), twice (row 2: the
    last one counts), at the very end (row 3)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(7, 90, (4, 9), generator=g)
    ids[0, 3:5] = torch.tensor(TOKENS)
    ids[2, 1:3] = torch.tensor(TOKENS)
    ids[2, 5:7] = torch.tensor(TOKENS)
    ids[3, 7:9] = torch.tensor(TOKENS)
    return ids


def _pair(tmp_path, cfg, seed=3, trainable=False):
    """(peft model, fastpeft model loaded from peft's files, pristine base): same weights."""
    base, _ = tiny("llama")
    pristine = fresh_copy(base)
    pm = peft.get_peft_model(base, cfg)
    randomize_adapters(pm, seed=seed)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    fm = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path / "peft"), is_trainable=trainable)
    return pm, fm.eval(), pristine


def _logits(model, ids, ctx=None, **kw):
    inner = model.base_model.model if isinstance(model, fastpeft.PeftModel) else model
    with torch.no_grad(), (ctx or _nullctx)(inner, ids, kw.get("adapter_names")):
        if isinstance(model, fastpeft.PeftModel) and "adapter_names" in kw:
            with tuner.mixed_batch(inner, kw["adapter_names"], repeat=False):
                return inner(input_ids=ids).logits
        return (inner if isinstance(model, fastpeft.PeftModel) else model)(input_ids=ids, **kw).logits


class _nullctx:
    def __init__(self, *a):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _same_state(pm, fm):
    sp = {k: tuple(v.shape) for k, v in pm.state_dict().items()}
    sf = {k: tuple(v.shape) for k, v in fm.state_dict().items()}
    assert sp == sf


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _train_step_matches(pm, fm, ids, ctx=None):
    """One SGD step from equal weights gives equal gradients and equal weights after."""
    pm.train()
    fm.train()
    loss_p = pm(input_ids=ids, labels=ids).loss
    inner = fm.base_model.model
    with (ctx or _nullctx)(inner, ids, None):
        loss_f = inner(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_f, loss_p, **TIGHT)
    loss_p.backward()
    loss_f.backward()
    grads_p = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    grads_f = {n: p.grad for n, p in fm.named_parameters() if p.requires_grad}
    assert grads_p.keys() == grads_f.keys() and grads_p
    for n in grads_p:
        torch.testing.assert_close(grads_f[n], grads_p[n], atol=1e-5, rtol=1e-4, msg=n)
    with torch.no_grad():
        for model in (pm, fm):
            for p in model.parameters():
                if p.requires_grad:
                    p -= 0.5 * p.grad
    pm.eval()
    fm.eval()
    return _max_diff(_logits(fm, ids, ctx), _logits(pm, ids))


# --------------------------------------------------------------------------- KaSA


def test_kasa_matches_peft(tmp_path):
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], kasa_config=peft.KasaConfig(beta=0.1))
    pm, fm, pristine = _pair(tmp_path, cfg)
    ids = _ids()
    _same_state(pm, fm)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    assert fm.state_dict()[f"{key}.lora_diag.default"].shape == (4,)
    # the base weight truncated as PEFT truncates it (a file load truncates too)
    torch.testing.assert_close(fm.state_dict()[f"{key}.base_layer.weight"], pm.state_dict()[f"{key}.base_layer.weight"])
    assert _max_diff(_logits(fm, ids), _logits(pm, ids)) < 1e-5  # fused route
    mixed = ["default", "__base__", "default", "__base__"]
    assert _max_diff(_logits(fm, ids, adapter_names=mixed), _logits(pm, ids, adapter_names=mixed)) < 1e-5
    torch.testing.assert_close(kasa_loss(fm), pm.base_model._get_kasa_loss(), **TIGHT)
    # fastpeft's own adapter, saved, loads in peft with the same outputs
    fm2 = fastpeft.get_peft_model(fresh_copy(pristine), fastpeft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], kasa_config={"gamma": 0.01}))
    randomize_adapters(fm2, seed=5)
    fm2.save_pretrained(str(tmp_path / "ours"))
    pm2 = peft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path / "ours")).eval()
    assert _max_diff(_logits(fm2.eval(), ids), _logits(pm2, ids)) < 1e-5
    # merging as peft
    merged_p = pm.merge_and_unload()
    merged_f = fm.merge_and_unload()
    assert _max_diff(_logits(merged_f, ids), _logits(merged_p, ids)) < 1e-5


def test_kasa_training_step_matches_peft(tmp_path):
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj", "up_proj"], kasa_config={})
    pm, fm, _ = _pair(tmp_path, cfg, trainable=True)
    for n, p in pm.named_parameters():
        p.requires_grad_("lora_" in n)
    assert _train_step_matches(pm, fm, _ids()) < 1e-5


def test_kasa_refusals_and_rollback(tmp_path):
    base, _ = tiny("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"KaSA requires `r` \(32\)"):  # k_proj is 32 -> 16
        fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=32, target_modules=["q_proj", "k_proj"], kasa_config={}))
    # q_proj was truncated before k_proj failed: the failed injection restored it
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    fm = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=2, target_modules=["q_proj"], kasa_config={}))
    with pytest.raises(ValueError, match="KaSA cannot be combined"):
        fm.add_adapter("plain", fastpeft.LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="variant combination"):
        fastpeft.get_peft_model(tiny("llama")[0], fastpeft.LoraConfig(target_modules=["q_proj"], use_dora=True,
                                                                      kasa_config={}))
    with pytest.raises(UnsupportedConfigError, match="beta"):
        fastpeft.LoraConfig(target_modules=["q_proj"], kasa_config={"beta": -1})
    with pytest.raises(UnsupportedConfigError, match="unknown key"):
        fastpeft.LoraConfig(target_modules=["q_proj"], kasa_config={"betta": 1})


# --------------------------------------------------------------------------- BD-LoRA


def test_bdlora_matches_peft(tmp_path):
    bd = peft.BdLoraConfig(target_modules_bd_a=["o_proj", "down_proj"], target_modules_bd_b=["q_proj", "up_proj"],
                           nblocks=2)
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"], use_bdlora=bd)
    pm, fm, pristine = _pair(tmp_path, cfg)
    ids = _ids()
    _same_state(pm, fm)
    sd = fm.state_dict()
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"].shape == (32, 2)  # [N, r/n]
    assert sd["base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight"].shape == (4, 32)  # [r, K/n]
    assert _max_diff(_logits(fm, ids), _logits(pm, ids)) < 1e-5
    mixed = ["__base__", "default", "default", "__base__"]
    assert _max_diff(_logits(fm, ids, adapter_names=mixed), _logits(pm, ids, adapter_names=mixed)) < 1e-5
    fm2 = fastpeft.get_peft_model(fresh_copy(pristine), fastpeft.LoraConfig(
        r=4, target_modules=["q_proj", "o_proj"], use_bdlora={"target_modules_bd_a": ["o_proj"],
                                                              "target_modules_bd_b": ["q_proj"], "nblocks": 4}))
    randomize_adapters(fm2, seed=5)
    fm2.save_pretrained(str(tmp_path / "ours"))
    pm2 = peft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path / "ours")).eval()
    _same_state(pm2, fm2)
    assert _max_diff(_logits(fm2.eval(), ids), _logits(pm2, ids)) < 1e-5
    merged_p, merged_f = pm.merge_and_unload(), fm.merge_and_unload()
    assert _max_diff(_logits(merged_f, ids), _logits(merged_p, ids)) < 1e-5


def test_bdlora_training_step_and_checks(tmp_path):
    bd = {"target_modules_bd_a": ["v_proj"], "target_modules_bd_b": ["q_proj"], "nblocks": 2}
    pm, fm, _ = _pair(tmp_path, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_bdlora=bd),
                      trainable=True)
    for n, p in pm.named_parameters():
        p.requires_grad_("lora_" in n)
    assert _train_step_matches(pm, fm, _ids()) < 1e-5
    base, _ = tiny("llama")
    with pytest.raises(ValueError, match="matches neither A nor B"):
        fastpeft.get_peft_model(base, fastpeft.LoraConfig(target_modules=["q_proj", "k_proj"], use_bdlora=bd))
    assert not hasattr(base.model.layers[0].self_attn.q_proj, "base_layer")
    loose = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=["q_proj", "k_proj"],
                                                              use_bdlora={**bd, "match_strict": False}))
    assert tuple(loose.base_model.model.model.layers[0].self_attn.k_proj.lora_A["default"].weight.shape) == (4, 32)
    with pytest.raises(UnsupportedConfigError, match="overlapping"):
        fastpeft.LoraConfig(target_modules=["q_proj"], use_bdlora={"target_modules_bd_a": ["q"],
                                                                   "target_modules_bd_b": ["q"]})
    with pytest.raises(ValueError, match="use_bdlora.*not supported by fastpeft on this kind of layer"):
        fastpeft.get_peft_model(tiny("llama")[0], fastpeft.LoraConfig(
            target_modules=["embed_tokens"], use_bdlora={"target_modules_bd_a": ["embed"]}))


# --------------------------------------------------------------------------- aLoRA


def _alora_cfg(**kw):
    return peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], alora_invocation_tokens=TOKENS,
                           task_type="CAUSAL_LM", **kw)


def test_alora_offsets_as_peft():
    from peft.tuners.lora.variants import calculate_alora_offsets

    ids = _ids()
    theirs = calculate_alora_offsets({"a": _alora_cfg()}, "a", ids)
    assert alora.find_offsets(ids, TOKENS) == theirs == [6, None, 4, 2]
    assert alora.find_offsets(ids[1], TOKENS) == [None] and alora.find_offsets(ids[:, :1], TOKENS) == [None] * 4


def test_alora_matches_peft(tmp_path):
    pm, fm, pristine = _pair(tmp_path, _alora_cfg())
    ids = _ids()
    ctx = alora.offsets_context
    _same_state(pm, fm)
    out_p, out_f = _logits(pm, ids), _logits(fm, ids, ctx)
    assert _max_diff(out_f, out_p) < 1e-6
    base_out = _logits(pristine, ids)
    assert torch.equal(out_p[1], base_out[1]) and torch.equal(out_f[1], base_out[1])  # no tokens: the base model
    assert torch.equal(out_f[0, :3], base_out[0, :3])  # before the invocation: the base model
    assert not torch.allclose(out_f[0, 3:], base_out[0, 3:])
    assert torch.equal(_logits(fm, ids), base_out)  # no offsets (no context): PEFT's "base model only"
    # generation: offsets from the prompt; prefill and decoding as peft
    gen_p = pm.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    inner = fm.base_model.model
    with alora.offsets_context(inner, ids):
        gen_f = inner.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen_f, gen_p)
    with alora.offsets_context(inner, ids):  # several sequences per prompt: each row's offset repeated
        many = inner.generate(input_ids=ids, max_new_tokens=3, do_sample=True, num_return_sequences=2)
    assert many.shape[0] == 8
    # merging is refused, as peft refuses it
    with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
        pm.merge_adapter()
    with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
        fm.merge_adapter()
    assert not any(getattr(m, "merged_adapters", None) for m in fm.modules())
    # fastpeft saves what peft loads
    fm.save_pretrained(str(tmp_path / "ours"))
    pm2 = peft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path / "ours")).eval()
    assert _max_diff(_logits(pm2, ids), out_f) < 1e-6


def test_alora_on_conv1d_matches_peft(tmp_path):
    base, _ = tiny("gpt2")
    pristine = fresh_copy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM",
                                                   alora_invocation_tokens=TOKENS))
    randomize_adapters(pm, seed=4)
    pm.eval().save_pretrained(tmp_path)
    fm = fastpeft.PeftModel.from_pretrained(pristine, str(tmp_path)).eval()
    ids = _ids()
    assert _max_diff(_logits(fm, ids, alora.offsets_context), _logits(pm, ids)) < 1e-6


def test_alora_mixed_batch_matches_peft(tmp_path):
    base, _ = tiny("llama")
    pristine = fresh_copy(base)
    pm = peft.get_peft_model(base, _alora_cfg())
    pm.add_adapter("plain", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"], alora_invocation_tokens=[6],
                                            task_type="CAUSAL_LM"))
    randomize_adapters(pm, seed=7)
    pm.eval().save_pretrained(tmp_path)
    fm = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path))
    for name in ("plain", "other"):
        fm.load_adapter(str(tmp_path / name), adapter_name=name)
    names = ["default", "plain", "other", "__base__"]
    out_p = _logits(pm, _ids(), adapter_names=names)
    out_f = _logits(fm.eval(), _ids(), alora.offsets_context, adapter_names=names)
    assert _max_diff(out_f, out_p) < 1e-6
    # a row's own adapter decides its offset: 'other' is invoked by token 6 alone
    assert alora.find_offsets(_ids(), [6]) == [5, None, 3, 1]


def test_alora_training_step_matches_peft(tmp_path):
    pm, fm, _ = _pair(tmp_path, _alora_cfg(), trainable=True)
    for n, p in pm.named_parameters():
        p.requires_grad_("lora_" in n)
    assert _train_step_matches(pm, fm, _ids(), alora.offsets_context) < 1e-5


def test_alora_through_peft_model(tmp_path):
    pm, fm, _ = _pair(tmp_path, _alora_cfg())
    ids = _ids()
    with torch.no_grad():
        assert _max_diff(fm(input_ids=ids).logits, pm(input_ids=ids).logits) < 1e-6
        assert _max_diff(fm(ids).logits, pm(ids).logits) < 1e-6
        given = [3, None, 1, 9]
        assert _max_diff(fm(input_ids=ids, alora_offsets=given).logits,
                         pm(input_ids=ids, alora_offsets=given).logits) < 1e-6
        names = ["default", "__base__", "default", "__base__"]
        assert _max_diff(fm(input_ids=ids, adapter_names=names).logits,
                         pm(input_ids=ids, adapter_names=names).logits) < 1e-6
    assert torch.equal(fm.generate(input_ids=ids, max_new_tokens=4, do_sample=False),
                       pm.generate(input_ids=ids, max_new_tokens=4, do_sample=False))
    assert torch.equal(fm.generate(ids, max_new_tokens=3, do_sample=False, adapter_names=names),
                       pm.generate(ids, max_new_tokens=3, do_sample=False, adapter_names=names))


# --------------------------------------------------------------------------- Arrow


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """5 peft-saved plain LoRA adapters on q_proj and v_proj (3 task experts, 2 general ones)."""
    root = tmp_path_factory.mktemp("experts")
    base, _ = tiny("llama")
    paths = []
    for i in range(5):
        pm = peft.get_peft_model(fresh_copy(base), peft.LoraConfig(r=4, lora_alpha=8 + 2 * i,
                                                                   target_modules=["q_proj", "v_proj"]))
        randomize_adapters(pm, seed=10 + i)
        pm.save_pretrained(root / f"e{i}")
        paths.append(str(root / f"e{i}"))
    return base, paths


@pytest.mark.parametrize("gks", [False, True])
def test_arrow_matches_peft(experts, gks, tmp_path):
    from peft.tuners.lora.arrow import create_arrow_model as peft_create_arrow_model

    base, paths = experts
    general = paths[3:] if gks else None
    arrow = dict(top_k=2, router_temperature=0.7, rng_seed=7, use_gks=gks)
    pa = peft_create_arrow_model(fresh_copy(base), paths[:3], peft.ArrowConfig(**arrow), general).eval()
    fa = create_arrow_model(fresh_copy(base), paths[:3], arrow, general).eval()
    ids = _ids()
    _same_state(pa, fa)
    out_p, out_f = _logits(pa, ids), _logits(fa, ids)
    assert _max_diff(out_f, out_p) < 1e-6
    assert _max_diff(out_f, _logits(base, ids)) > 1e-2
    with torch.no_grad():  # GKS subtracted the general mean from the experts in place, as peft
        for k, v in pa.state_dict().items():
            if ".arrow_router." not in k:  # (the router's own factors are a random, unused init)
                torch.testing.assert_close(fa.state_dict()[k], v, **TIGHT)
    names = ["arrow_router", "task_1", "__base__", "arrow_router"]
    assert _max_diff(_logits(fa, ids, adapter_names=names), _logits(pa, ids, adapter_names=names)) < 1e-6
    for model in (pa, fa):
        with pytest.raises(RuntimeError, match="Cannot merge an active Arrow router adapter"):
            model.merge_adapter()
    # an expert added later joins the routing (peft's on_adapter_change)
    pa.load_adapter(paths[4], adapter_name="late")
    fa.load_adapter(paths[4], adapter_name="late")
    assert _max_diff(_logits(fa, ids), _logits(pa, ids)) < 1e-6


def test_arrow_router_saves_and_loads_in_fastpeft(experts, tmp_path):
    base, paths = experts
    fa = create_arrow_model(fresh_copy(base), paths[:3], {"top_k": 1, "rng_seed": 0})
    ids = _ids()
    out = _logits(fa.eval(), ids)
    fa.save_pretrained(str(tmp_path))
    again = fastpeft.PeftModel.from_pretrained(fresh_copy(base), paths[0], adapter_name="task_0")
    for i in (1, 2):
        again.load_adapter(paths[i], adapter_name=f"task_{i}")
    again.load_adapter(str(tmp_path / "arrow_router"), adapter_name="arrow_router")
    again.set_adapter("arrow_router")
    assert _max_diff(_logits(again.eval(), ids), out) < 1e-6


# --------------------------------------------------------------------------- refused variants


@pytest.mark.parametrize("option", ["velora_config", "monteclora_config"])
def test_refused_variant_saved_by_peft_gives_a_clear_error(option, tmp_path):
    value = peft.VeloraConfig(num_groups=4) if option == "velora_config" else peft.MontecloraConfig(num_samples=2)
    base, _ = tiny("llama")
    pristine = fresh_copy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], **{option: value})).save_pretrained(
            tmp_path)
    with pytest.raises(UnsupportedConfigError, match=rf"`{option}`.*not supported by fastpeft") as err:
        fastpeft.PeftModel.from_pretrained(pristine, str(tmp_path))
    assert "match no module" not in str(err.value)
    assert not any(hasattr(m, "base_layer") for m in pristine.modules())
