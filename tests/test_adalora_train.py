"""AdaLoRA training against the real peft: the same model, seed and initial adapter weights,
trained by hand for ``total_step`` steps (warmup, cubic budget, final mask, masked fine-tuning);
every step's loss (with the orthogonal regularisation), the rank patterns, the masked ``lora_E``,
the saved files (rank-0 layers included) and loading each other's files must agree."""
import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft import adalora_train
from fastpeft.nn import AdaLoraLinear

from models import fresh_copy, logits, tiny

STEPS = 10
# 8 layers of init_r 4 pruned to 8 ranks in all: with this seed two layers end at rank 0
CFG = dict(init_r=4, target_r=1, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
           total_step=STEPS, tinit=2, tfinal=3, deltaT=1, beta1=0.5, beta2=0.5)


def _pair(task_type="CAUSAL_LM", **over):
    """peft and fastpeft AdaLoRA models on copies of one tiny Llama, with the same adapter weights."""
    base, inputs = tiny("llama")
    pristine = fresh_copy(base)
    kw = dict(CFG, **over)
    if task_type is not None:
        kw["task_type"] = task_type
    pm = peft.get_peft_model(base, peft.AdaLoraConfig(**kw))
    fm = fastpeft.get_peft_model(fresh_copy(pristine), fastpeft.AdaLoraConfig(**kw))
    ours = dict(fm.named_parameters())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            ours[n].copy_(p)
    assert set(ours) == {n for n, _ in pm.named_parameters()}
    return pristine, inputs, pm, fm


def _batch(inputs, step):
    kw = inputs(batch=2, seq=7, seed=100 + step)
    kw["labels"] = kw["input_ids"]
    return kw


def _optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)


def _ranks(pattern):
    return {k.removesuffix(".default"): sum(bool(m) for m in v) for k, v in pattern.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both models trained side by side; per step: losses, rank patterns and the fused logits."""
    pristine, inputs, pm, fm = _pair()
    opt_p, opt_f = _optimizer(pm), _optimizer(fm)
    record = []
    for step in range(STEPS):
        kw = _batch(inputs, step)
        lp, lf = pm(**kw).loss, fm(**kw).loss
        lp.backward()
        lf.backward()
        # peft's documented order: optimizer step, then the allocation (then pruned singular
        # values stay exactly zero until the next step)
        opt_p.step()
        opt_f.step()
        pm.base_model.update_and_allocate(step)
        fm.base_model.update_and_allocate(step)
        opt_p.zero_grad()
        opt_f.zero_grad()
        rp = copy.deepcopy(pm.peft_config["default"].rank_pattern)
        rf = copy.deepcopy(fm.peft_config["default"].rank_pattern)
        # a no-grad forward takes fastpeft's fused route: its stacks must follow the optimizer's
        # in-place updates and the allocator's masking of lora_E
        probe = inputs(batch=2, seq=5, seed=7)
        record.append(dict(loss=(lp.item(), lf.item()), pattern=(rp, rf), logits=(logits(pm, probe), logits(fm, probe))))
    folder = tmp_path_factory.mktemp("adalora")
    return dict(pristine=pristine, inputs=inputs, pm=pm, fm=fm, record=record, folder=folder)


def test_every_step_matches_peft(trained):
    rec = trained["record"]
    for step, r in enumerate(rec):
        lp, lf = r["loss"]
        assert lf == pytest.approx(lp, rel=1e-6, abs=1e-6), f"step {step}: loss {lf} vs peft {lp}"
        rp, rf = r["pattern"]
        assert rf == rp, f"step {step}: rank pattern"
        torch.testing.assert_close(r["logits"][1], r["logits"][0], atol=1e-5, rtol=1e-5, msg=f"step {step}")
    # the schedule: no pattern during warmup (steps <= tinit), one from the first budget step on
    assert all(r["pattern"][0] is None for r in rec[:CFG["tinit"] + 1])
    assert all(r["pattern"][0] is not None for r in rec[CFG["tinit"] + 1:])
    assert len({r["loss"][0] for r in rec}) == STEPS  # training moved


def test_final_pattern_masks_and_parameters_match_peft(trained):
    pm, fm = trained["pm"], trained["fm"]
    rp, rf = pm.peft_config["default"].rank_pattern, fm.peft_config["default"].rank_pattern
    assert rf == rp
    ranks = _ranks(rf)
    assert len(ranks) == 8 and sum(ranks.values()) == CFG["target_r"] * 8  # the final budget
    assert 0 in ranks.values(), "the test needs a layer pruned to rank 0"
    assert max(ranks.values()) > CFG["target_r"]  # ranks moved between layers
    theirs = dict(pm.base_model.model.named_parameters())
    for n, p in fm.base_model.model.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p, theirs[n], atol=1e-6, rtol=1e-5, msg=n)
        if ".lora_E." in n:  # the pruned singular values are exactly zero, the kept ones not
            kept = torch.tensor(rf[n])
            assert (p[~kept] == 0).all() and (p[kept] != 0).all(), n
    alloc = fm.base_model.model._fastpeft_adalora
    assert (alloc.init_bgt, alloc.target_bgt) == (pm.base_model.rankallocator.init_bgt, pm.base_model.rankallocator.target_bgt)
    assert alloc.ipt == {} and pm.base_model.rankallocator.ipt == {}  # reset at the final step, as peft


def test_saved_files_match_peft_and_load_across(trained, tmp_path):
    pristine, inputs, pm, fm = trained["pristine"], trained["inputs"], trained["pm"], trained["fm"]
    pm.eval()
    fm.eval()
    kw = inputs()
    expected = logits(pm, kw)
    torch.testing.assert_close(logits(fm, kw), expected, atol=1e-5, rtol=1e-5)
    pattern = copy.deepcopy(fm.peft_config["default"].rank_pattern)
    ours_dir, peft_dir = tmp_path / "ours", tmp_path / "peft"
    fm.save_pretrained(str(ours_dir))
    pm.save_pretrained(str(peft_dir))
    ours, theirs = load_file(str(ours_dir / "adapter_model.safetensors")), load_file(str(peft_dir / "adapter_model.safetensors"))
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, k
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5, msg=k)
    zero = [k.removesuffix(".lora_E") for k, v in theirs.items() if k.endswith(".lora_E") and v.shape[0] == 0]
    assert zero and all(theirs[z + ".lora_A"].shape == (0, 32) and theirs[z + ".lora_B"].shape[1] == 0 for z in zero)
    # peft strips the adapter name from the pattern's keys when saving; the masks are the same
    saved = json.loads((ours_dir / "adapter_config.json").read_text())["rank_pattern"]
    assert _ranks(saved) == _ranks(pattern)
    assert {k.removesuffix(".default"): v for k, v in saved.items()} == pm.peft_config["default"].rank_pattern

    # peft loads fastpeft's file, fastpeft loads peft's: the trained model's outputs
    p_loaded = peft.PeftModel.from_pretrained(fresh_copy(pristine), str(ours_dir)).eval()
    torch.testing.assert_close(logits(p_loaded, kw), expected, atol=1e-5, rtol=1e-5)
    f_loaded = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(peft_dir))
    torch.testing.assert_close(logits(f_loaded, kw), expected, atol=1e-5, rtol=1e-5)
    # the loaded models hold the same tensors (rank-0 layers: zero-size ones, ranknum 0)
    ps, fs = p_loaded.state_dict(), f_loaded.state_dict()
    assert set(fs) == set(ps)
    for k in ps:
        assert fs[k].shape == ps[k].shape, k
        torch.testing.assert_close(fs[k], ps[k], atol=1e-6, rtol=1e-5, msg=k)
    # ... and saving the loaded one writes peft's file again
    again = tmp_path / "again"
    f_loaded.save_pretrained(str(again))
    resaved = load_file(str(again / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in resaved.items()} == {k: v.shape for k, v in theirs.items()}
    # fastpeft's own file loads in fastpeft too
    f_own = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(ours_dir))
    torch.testing.assert_close(logits(f_own, kw), expected, atol=1e-5, rtol=1e-5)


def test_a_loaded_pruned_adapter_trains_on_as_peft(trained, tmp_path):
    """Loaded with is_trainable=True (rank-0 layers hold zero-size parameters, which take part
    in the forward and get zero-size gradients), training goes on: the same losses and
    parameters as peft. (peft's update_and_allocate then fails: it masks the resized layers with
    the full-rank pattern; fastpeft's does the same.)"""
    pristine, inputs = trained["pristine"], trained["inputs"]
    trained["pm"].save_pretrained(str(tmp_path))
    pm = peft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path), is_trainable=True)
    fm = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path), is_trainable=True)
    opt_p, opt_f = _optimizer(pm), _optimizer(fm)
    assert len(opt_f.param_groups[0]["params"]) == len(opt_p.param_groups[0]["params"])
    for step in (STEPS - 2, STEPS - 1):
        kw = _batch(inputs, step)
        lp, lf = pm(**kw).loss, fm(**kw).loss
        assert lf.item() == pytest.approx(lp.item(), rel=1e-6, abs=1e-6)
        lp.backward()
        lf.backward()
        opt_p.step()
        opt_f.step()
        opt_p.zero_grad()
        opt_f.zero_grad()
    for model in (pm, fm):
        with pytest.raises(RuntimeError, match="must match the size"):
            model.base_model.update_and_allocate(STEPS - 1)
    theirs = dict(pm.named_parameters())
    for n, p in fm.named_parameters():
        assert p.shape == theirs[n].shape, n
        torch.testing.assert_close(p, theirs[n], atol=1e-6, rtol=1e-5, msg=n)


def test_masking_lora_e_is_seen_by_the_fused_forward():
    _, inputs, pm, fm = _pair()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for (n, p), (_, q) in zip(pm.named_parameters(), fm.named_parameters(), strict=True):
            if ".lora_E." in n:
                v = torch.randn(p.shape, generator=g)
                p.copy_(v)
                q.copy_(v)
    pm.eval()
    fm.eval()
    kw = inputs()
    before = logits(fm, kw)  # packs the stacks (A * E) and builds the fast-path plans
    torch.testing.assert_close(before, logits(pm, kw), atol=1e-5, rtol=1e-5)
    layers = [m for m in fm.base_model.model.modules() if isinstance(m, AdaLoraLinear)]
    assert len(layers) == 8 and all(m.bank.packed and m.bank.plan is not None for m in layers)
    pattern = {n: [True, False, False, True] for n, _ in fm.base_model.model.named_parameters() if ".lora_E." in n}
    adalora_train.rank_allocator(fm.base_model.model).mask_using_rank_pattern(fm.base_model.model, pattern)
    pm.base_model.rankallocator.mask_using_rank_pattern(pm.base_model.model, pattern)
    assert all(m.bank.stale and m.bank.plan is None for m in layers)
    after = logits(fm, kw)
    assert all(not m.bank.stale for m in layers)  # repacked from the masked lora_E
    assert not torch.allclose(after, before, atol=1e-4)
    torch.testing.assert_close(after, logits(pm, kw), atol=1e-5, rtol=1e-5)


def test_resize_modules_by_rank_pattern_as_peft():
    _, inputs, pm, fm = _pair()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (n, p), (_, q) in zip(pm.named_parameters(), fm.named_parameters(), strict=True):
            if "lora_" in n:
                v = 0.3 * torch.randn(p.shape, generator=g)
                p.copy_(v)
                q.copy_(v)
    names = [n for n, _ in fm.base_model.model.named_parameters() if ".lora_E." in n]
    pattern = {n: [i % 2 == 0, False, i % 3 == 0, True] if i else [False] * 4 for i, n in enumerate(names)}
    pm.base_model.resize_modules_by_rank_pattern(pattern, "default")
    adalora_train.resize_modules_by_rank_pattern(fm.base_model.model, pattern, "default")
    ps, fs = pm.state_dict(), fm.state_dict()
    assert set(fs) == set(ps)
    for k in ps:
        assert fs[k].shape == ps[k].shape, k
        torch.testing.assert_close(fs[k], ps[k], msg=k)
    kw = inputs()
    pm.eval()
    fm.eval()
    torch.testing.assert_close(logits(fm, kw), logits(pm, kw), atol=1e-5, rtol=1e-5)


def test_without_task_type_the_loss_has_no_regularisation():
    _, inputs, pm, fm = _pair(task_type=None)
    _, _, pm_task, _ = _pair()
    kw = _batch(inputs, 0)
    lp, lf = pm(**kw).loss, fm(**kw).loss
    assert lf.item() == pytest.approx(lp.item(), rel=1e-6, abs=1e-6)
    assert pm_task(**kw).loss.item() > lp.item() + 1e-3  # with a task_type the regularisation adds up


def test_negative_orth_reg_weight_raises_as_peft():
    with pytest.raises(ValueError, match="orth_reg_weight"):
        fastpeft.AdaLoraConfig(**CFG, orth_reg_weight=-0.1)
    with pytest.raises(ValueError, match="orth_reg_weight"):
        peft.AdaLoraConfig(**CFG, orth_reg_weight=-0.1)
    _, inputs, pm, fm = _pair()
    kw = _batch(inputs, 0)
    for model in (pm, fm):
        model.peft_config["default"].orth_reg_weight = -0.1
        with pytest.raises(ValueError, match="orth_reg_weight should be greater than or equal to 0"):
            model(**kw)
        del kw["labels"]  # no loss: nothing to regularise, no check (as peft)
        assert model(**kw).loss is None
        kw["labels"] = kw["input_ids"]
    fm.peft_config["default"].orth_reg_weight = 0.0
    pm.peft_config["default"].orth_reg_weight = 0.0
    assert fm(**kw).loss.item() == pytest.approx(pm(**kw).loss.item(), rel=1e-6)


def test_an_adapter_loaded_for_inference_has_no_trainable_adapter_as_in_peft(tmp_path):
    pristine, inputs, pm, fm = _pair()
    fm.save_pretrained(str(tmp_path))
    kw = _batch(inputs, 0)
    assert fm(**kw).loss is not None  # saving (inference_mode=True in the file) keeps the trainable adapter
    p_inf = peft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path))
    f_inf = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path))
    with pytest.raises(AttributeError, match="trainable_adapter_name"):
        p_inf(**kw)
    with pytest.raises(AttributeError, match="trainable_adapter_name"):
        f_inf(**kw)
    with pytest.raises(AttributeError, match="trainable_adapter_name"):
        f_inf.base_model.update_and_allocate(0)


def test_a_second_trainable_adalora_adapter_is_refused():
    _, inputs, pm, fm = _pair()
    with pytest.raises(ValueError, match="only 1 trainable adapter"):
        pm.add_adapter("other", peft.AdaLoraConfig(**CFG))
    fm.add_adapter("other", fastpeft.AdaLoraConfig(**CFG))  # fastpeft's tuner accepts it; its use is refused
    with pytest.raises(ValueError, match="only 1 trainable adapter"):
        fm(**_batch(inputs, 0))
