"""Adapters on nn.Conv1d / Conv2d / Conv3d against the real peft library: LoRA (rsLoRA, patterns),
DoRA, lora_bias, IA3 (feed-forward and not), AdaLoRA (Conv2d), with random non-zero adapter
weights copied between the two. Outputs (float32; bf16 / fp16 bases against an fp64 reference),
state-dict keys and shapes, saving and loading both ways, merge_and_unload, mixed batches,
several active adapters, a training step, the cached kernel's invalidation and the refusals."""
import copy
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastpeft
from fastpeft.nn import AdaLoraConv2d, IA3Conv, LoraConv

ATOL = 2e-5  # float32: the cached kernel W + dK vs PEFT's base + lora_B(lora_A(x)) (|y| ~ 10..100)
RTOL = 2e-5


class Net(nn.Module):
    """Conv2d (stride 2, padding 1), grouped Conv2d (groups 2), Conv1d, Conv3d."""

    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.c2g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c1 = nn.Conv1d(8, 6, 3, padding=1, bias=False)
        self.c3 = nn.Conv3d(8, 4, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x):
        h = self.c2g(self.c2(x))
        a, b = self.c1(h.flatten(2)), self.c3(h.unsqueeze(2))
        return torch.cat([a.flatten(1), b.flatten(1)], 1)


class Net2d(nn.Module):
    """Conv2d only, one dilated (IA3 and AdaLoRA adapt dilated convolutions; LoRA refuses them)."""

    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.cd = nn.Conv2d(8, 6, 3, padding=2, dilation=2)
        self.c2g = nn.Conv2d(6, 6, 1, groups=2)

    def forward(self, x):
        return self.c2g(self.cd(self.c2(x))).flatten(1)


ALL = ["c2", "c2g", "c1", "c3"]
CASES = {  # name -> (model, config class name, kwargs); the same kwargs build peft's and fastpeft's config
    "lora": (Net, "LoraConfig", dict(r=4, lora_alpha=8, target_modules=ALL)),
    "rslora-patterns": (Net, "LoraConfig", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=ALL,
                                                rank_pattern={"c1": 2}, alpha_pattern={"c3": 3})),
    "dora": (Net, "LoraConfig", dict(r=4, lora_alpha=8, use_dora=True, target_modules=ALL)),
    "lora-bias": (Net, "LoraConfig", dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["c2", "c2g", "c3"])),
    "ia3": (Net2d, "IA3Config", dict(target_modules=["c2", "cd", "c2g"], feedforward_modules=[])),
    "ia3-ff": (Net2d, "IA3Config", dict(target_modules=["c2", "cd", "c2g"], feedforward_modules=["cd", "c2g"])),
    "adalora": (Net2d, "AdaLoraConfig", dict(init_r=4, target_r=2, lora_alpha=8, total_step=10,
                                             target_modules=["c2", "cd"])),
}
MERGEABLE = {  # no grouped conv with LoRA: PEFT cannot merge those
    "lora": dict(r=4, lora_alpha=8, target_modules=["c2", "c1", "c3"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c2", "c1", "c3"]),
    "lora-bias": dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["c2", "c3"]),
}


def randomize(model, seed=3, scale=0.3):
    """Random adapter values (PEFT initializes B, E to zero and IA3 to ones: a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_" in n or "ia3_l" in n:
                noise = scale * torch.randn(p.shape, generator=g).to(p.dtype)
                p.copy_(p + noise if ("magnitude" in n or "ia3_l" in n) else noise)


def inputs(model_cls, batch=3, seed=0):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def pristine(model_cls, dtype=torch.float32):
    torch.manual_seed(0)
    return model_cls().to(dtype)


def pair(case, dtype=torch.float32, seed=3):
    """(peft model, fastpeft model, x) with the same base and the same random adapter weights."""
    model_cls, cfg_name, kw = CASES[case] if isinstance(case, str) else case
    base = pristine(model_cls, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), getattr(peft, cfg_name)(**copy.deepcopy(kw)))
        fm = fastpeft.get_peft_model(copy.deepcopy(base), getattr(fastpeft, cfg_name)(**copy.deepcopy(kw)))
    randomize(pm, seed)
    fm.load_state_dict(pm.state_dict())
    return pm.eval(), fm.eval(), inputs(model_cls).to(dtype)


def run(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw)


def close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# ----- structure -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_keys_shapes_dtypes_equal_peft(case):
    pm, fm, _ = pair(case)
    ps, fs = pm.state_dict(), fm.state_dict()
    assert set(ps) == set(fs)
    for k in ps:
        assert (ps[k].shape, ps[k].dtype) == (fs[k].shape, fs[k].dtype), k
    kinds = {LoraConv: "lora", IA3Conv: "ia3", AdaLoraConv2d: "adalora"}
    layers = [m for m in fm.modules() if type(m) in kinds]
    assert layers and all(kinds[type(m)] == CASES[case][1].removesuffix("Config").lower() for m in layers)


# ----- outputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_equal_peft(case):
    pm, fm, x = pair(case)
    want = run(pm, x)
    close(run(fm, x), want)  # the cached kernel (grouped convs: PEFT's composition)
    close(run(fm, x), want)  # the cache hit
    for m in fm.modules():
        if isinstance(m, LoraConv):  # the grouped conv runs PEFT's composition, the others a cached kernel
            assert bool(m.bank.kernels) == (m.base_layer.groups == 1), m
    close(fm(x).detach(), pm(x).detach())  # gradients enabled: PEFT's composition
    with pm.disable_adapter(), fm.disable_adapter():
        close(run(fm, x), run(pm, x), atol=0, rtol=0)
    close(run(fm, x), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["lora", "dora", "lora-bias", "ia3-ff", "adalora"])
def test_low_precision_base_as_accurate_as_peft(case, dtype):
    """bf16 / fp16 bases (adapters in float32, PEFT's autocast_adapter_dtype): fastpeft's error
    against an fp64 run of PEFT's model is at most about PEFT's own."""
    pm, fm, x = pair(case, dtype)
    ref = run(copy.deepcopy(pm).double(), x.double())
    got, theirs = run(fm, x), run(pm, x)
    assert got.dtype == theirs.dtype == dtype
    err, peft_err = (got.double() - ref).abs().max().item(), (theirs.double() - ref).abs().max().item()
    assert err <= 2 * peft_err + 1e-2 * ref.abs().max().item(), (err, peft_err)


def test_several_active_adapters_add_in_peft_order():
    """LoRA with lora_bias, then DoRA (applied by PEFT to the running result), then rsLoRA."""
    pm, fm, x = pair("lora-bias")
    for name, kw in (("d", dict(r=4, lora_alpha=4, use_dora=True, target_modules=["c2", "c1", "c3"])),
                     ("e", dict(r=2, lora_alpha=2, use_rslora=True, target_modules=["c2g", "c1"]))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.add_adapter(name, peft.LoraConfig(**kw))
            fm.add_adapter(name, fastpeft.LoraConfig(**kw))
    randomize(pm, seed=7)
    fm.load_state_dict(pm.state_dict())
    pm.base_model.set_adapter(["default", "d", "e"])
    fm.base_model.set_adapter(["default", "d", "e"])
    close(run(fm, x), run(pm, x))
    pm.base_model.set_adapter(["e", "default"])
    fm.base_model.set_adapter(["e", "default"])
    close(run(fm, x), run(pm, x))


@pytest.mark.parametrize("case", ["lora", "lora-bias", "dora", "ia3", "ia3-ff", "adalora"])
def test_mixed_batch_rows_equal_per_row_runs(case):
    pm, fm, x = pair(case)
    model_cls, cfg_name, kw = CASES[case]
    kw = dict(kw, inference_mode=True) if cfg_name == "AdaLoraConfig" else kw  # PEFT: one trainable AdaLoRA
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("b", getattr(peft, cfg_name)(**copy.deepcopy(kw)))
        fm.add_adapter("b", getattr(fastpeft, cfg_name)(**copy.deepcopy(kw)))
    randomize(pm, seed=9)
    fm.load_state_dict(pm.state_dict())
    x = inputs(model_cls, batch=5)
    names = ["b", "__base__", "default", "b", "default"]
    got = run(fm, x, adapter_names=names)
    with fastpeft.mixed_batch(fm, names):
        close(run(fm, x), got, atol=0, rtol=0)
    for i, n in enumerate(names):
        if n == "__base__":
            with fm.disable_adapter():
                want = run(fm, x[i:i + 1])
        else:
            fm.set_adapter(n)
            want = run(fm, x[i:i + 1])
        close(got[i:i + 1], want)
    if cfg_name == "LoraConfig" and not kw.get("use_dora"):  # PEFT's own mixed batches (no DoRA, no IA3)
        close(got, run(pm, x, adapter_names=names))
    with pytest.raises(ValueError):
        run(fm, x, adapter_names=names[:2])


# ----- saving, loading, merging ----------------------------------------------------------------
@pytest.mark.parametrize("case", ["lora", "dora", "lora-bias", "ia3-ff", "adalora"])
def test_save_load_both_ways(case, tmp_path):
    pm, fm, x = pair(case)
    base = pristine(CASES[case][0])
    with fm.disable_adapter():
        base_out = run(fm, x)
    close(run(base, x), base_out, atol=0, rtol=0)
    pm.save_pretrained(str(tmp_path / "peft"))
    fm.save_pretrained(str(tmp_path / "fast"))
    pf = load_file(str(tmp_path / "peft/adapter_model.safetensors"))
    ff = load_file(str(tmp_path / "fast/adapter_model.safetensors"))
    assert {k: v.shape for k, v in pf.items()} == {k: v.shape for k, v in ff.items()}
    want = run(pm, x)
    from_peft = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    close(run(from_peft, x), want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_fast = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "fast")).eval()
    close(run(from_fast, x), want)


@pytest.mark.parametrize("case", sorted(MERGEABLE) + ["ia3", "ia3-ff", "adalora"])
def test_merge_and_unload_equals_peft(case):
    spec = (Net, "LoraConfig", MERGEABLE[case]) if case in MERGEABLE else CASES[case]
    pm, fm, x = pair(spec)
    want = run(fm, x)
    fm.merge_adapter()
    close(run(fm, x), want, atol=1e-4, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm.unmerge_adapter()
    close(run(fm, x), want, atol=1e-4, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_peft = pm.merge_and_unload()
    merged = fm.merge_and_unload()
    assert type(merged) is type(merged_peft) and not any(isinstance(m, fastpeft.nn.AdapterLayer) for m in merged.modules())
    ps, fs = merged_peft.state_dict(), merged.state_dict()
    assert set(ps) == set(fs)
    for k in ps:
        close(fs[k], ps[k], atol=1e-5, rtol=1e-5)
    close(run(merged, x), want, atol=1e-4, rtol=1e-4)


def test_merging_two_dora_adapters_equals_peft():
    spec = (Net, "LoraConfig", MERGEABLE["dora"])
    pm, fm, x = pair(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("b", peft.LoraConfig(**MERGEABLE["dora"]))
    fm.add_adapter("b", fastpeft.LoraConfig(**MERGEABLE["dora"]))
    randomize(pm, seed=4)
    fm.load_state_dict(pm.state_dict())
    pm.base_model.set_adapter(["default", "b"])
    fm.base_model.set_adapter(["default", "b"])
    want = run(pm, x)
    close(run(fm, x), want)
    merged_peft, merged = pm.merge_and_unload(), fm.merge_and_unload()
    for k, v in merged_peft.state_dict().items():
        close(merged.state_dict()[k], v, atol=1e-5, rtol=1e-5)
    close(run(merged, x), want, atol=1e-4, rtol=1e-4)


def test_merge_refusals_as_peft():
    pm, fm, x = pair("lora")  # targets the grouped c2g
    with pytest.raises(NotImplementedError, match="groups > 1"):
        fm.merge_adapter()
    layer = LoraConv(nn.Conv2d(4, 4, 3, bias=False))
    with pytest.warns(UserWarning, match="no bias"):
        layer.add_adapter("a", r=2, lora_alpha=2, lora_bias=True)
    layer.set_adapter("a")
    with pytest.raises(RuntimeError, match="lora_bias=True"):
        layer.merge()
    assert not layer.merged


# ----- training and the cached kernel ----------------------------------------------------------
@pytest.mark.parametrize("case", ["lora", "dora", "lora-bias", "ia3", "ia3-ff", "adalora"])
def test_training_step_loss_grads_equal_peft(case):
    pm, fm, x = pair(case)
    pm.train()
    fm.train()
    params = {}
    for name, m in (("peft", pm), ("fast", fm)):
        m.zero_grad()
        loss = m(x).square().mean()
        loss.backward()
        params[name] = (loss.detach(), {n: p for n, p in m.named_parameters() if p.requires_grad})
    (lp, pp), (lf, fp) = params["peft"], params["fast"]
    close(lf, lp, atol=1e-5, rtol=1e-5)
    assert set(pp) == set(fp) and pp
    for n in pp:
        close(fp[n].grad, pp[n].grad, atol=1e-5, rtol=1e-4)
    for m, ps in ((pm, pp), (fm, fp)):
        torch.optim.SGD(ps.values(), lr=0.05).step()
        m.eval()
    close(run(fm, x), run(pm, x), atol=1e-4, rtol=1e-4)  # the cached kernel was rebuilt from the stepped weights


def test_dropout_runs_peft_composition():
    kw = dict(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=ALL)
    pm, fm, x = pair((Net, "LoraConfig", kw))
    pm.train()
    fm.train()
    torch.manual_seed(5)
    want = run(pm, x)
    torch.manual_seed(5)
    got = run(fm, x)
    close(got, want)  # the same dropout masks, drawn in PEFT's order
    assert (got - run(fm.eval(), x)).abs().max() > 1e-3  # dropout was active


def _layer(fm, name="c2"):
    return fm.get_base_model().get_submodule(name)


def test_cached_kernel_reused_and_invalidated():
    pm, fm, x = pair("dora")
    layer = _layer(fm)
    run(fm, x)
    (entry,) = layer.bank.kernels.values()
    run(fm, x)
    assert next(iter(layer.bank.kernels.values())) is entry  # reused
    pairs = [(dict(pm.named_parameters()), dict(fm.named_parameters()))]
    key = "base_model.model.c2.lora_A.default.weight"

    def both(fn):
        for d in pairs[0]:
            fn(d)
        close(run(fm, x), run(pm, x))

    with torch.no_grad():
        both(lambda d: d[key].mul_(1.5))  # in place (an optimizer step)
        both(lambda d: d["base_model.model.c2.lora_magnitude_vector.default.weight"].add_(0.1))
        both(lambda d: d["base_model.model.c2.base_layer.weight"].add_(0.01))
    new = torch.randn_like(pairs[0][0][key])
    both(lambda d: setattr(d[key], "data", new.clone()))  # new storage
    sd = {k: v + 0.05 for k, v in pm.state_dict().items() if "lora_B" in k}
    pm.load_state_dict(sd, strict=False)
    fm.load_state_dict(sd, strict=False)
    close(run(fm, x), run(pm, x))
    for m in (pm, fm):
        for mod in m.modules():
            if hasattr(mod, "set_scale"):
                mod.set_scale("default", 0.5)
    close(run(fm, x), run(pm, x))
    fastpeft.optimize.prepare(fm)
    assert layer.bank.kernels and layer.bank.nbytes() > 0
    fm.to(torch.float64)
    assert not layer.bank.kernels  # a move drops them


def test_frozen_base_grad_input_uses_kernel_and_trained_base_does_not():
    pm, fm, x = pair("lora")
    for m in (pm, fm):
        for p in m.parameters():
            p.requires_grad_(False)
    with torch.inference_mode():  # the kernel built here is a normal tensor: usable for backward below
        close(fm(x), pm(x))
    xg = x.clone().requires_grad_(True)
    xp = x.clone().requires_grad_(True)
    fm(xg).sum().backward()
    pm(xp).sum().backward()
    close(xg.grad, xp.grad, atol=1e-4, rtol=1e-4)
    assert _layer(fm).bank.kernels  # d/dx through the cached kernel
    for m in (pm, fm):
        _layer(m).base_layer.weight.requires_grad_(True)
    fm(x).sum().backward()
    pm(x).sum().backward()
    close(_layer(fm).base_layer.weight.grad, _layer(pm).base_layer.weight.grad, atol=1e-4, rtol=1e-4)


# ----- layers, targeting, refusals ---------------------------------------------------------------
@pytest.mark.parametrize("conv", [nn.Conv1d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2), nn.Conv3d(4, 6, 1)])
def test_fresh_adapters_initialize_as_peft(conv):
    x = torch.randn(2, 4, *([6] * (conv.weight.dim() - 2)))
    want = conv(x).detach()
    layer = LoraConv(copy.deepcopy(conv))
    layer.add_adapter("a", r=4, lora_alpha=8)
    layer.add_adapter("g", r=4, lora_alpha=8, init_lora_weights="gaussian", use_dora=True)
    layer.add_adapter("f", r=4, lora_alpha=8, init_lora_weights=False)
    for n in ("a", "g"):
        layer.set_adapter(n)
        close(run(layer, x), want, atol=1e-5, rtol=1e-5)  # B = 0: the base's output
    dims = tuple(range(1, conv.weight.dim()))
    torch.testing.assert_close(layer.lora_magnitude_vector["g"].weight,
                               conv.weight.norm(p=2, dim=dims, keepdim=True).transpose(0, 1))
    layer.set_adapter("f")
    assert (run(layer, x) - want).abs().max() > 1e-3


def test_all_linear_does_not_target_convolutions():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3)
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(self.conv(x).mean((2, 3)))

    fm = fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(r=2, target_modules="all-linear"), Mixed())
    assert isinstance(fm.conv, nn.Conv2d) and not isinstance(fm.conv, fastpeft.nn.AdapterLayer)
    assert isinstance(fm.proj, fastpeft.nn.LoraLinear)


def test_optimize_leaves_peft_conv_layers():
    pm, _, x = pair("lora")
    want = run(pm, x)
    kinds = [type(m) for m in pm.base_model.modules()]
    with pytest.warns(UserWarning, match="left as they are"):
        fastpeft.optimize(pm)
    assert [type(m) for m in pm.base_model.modules()] == kinds
    close(run(pm, x), want, atol=0, rtol=0)


@pytest.mark.parametrize("make, cfg, match", [
    (lambda: nn.Conv2d(4, 4, 3, dilation=2), fastpeft.LoraConfig(r=2, target_modules=["c"]), "dilation"),
    (lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), fastpeft.LoraConfig(r=2, target_modules=["c"]),
     "padding_mode"),
    (lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
     fastpeft.AdaLoraConfig(init_r=2, total_step=5, target_modules=["c"]), "padding_mode"),
    (lambda: nn.Conv2d(4, 4, 3, groups=2), fastpeft.LoraConfig(r=3, target_modules=["c"]), "divisible by groups"),
    (lambda: nn.Conv2d(4, 4, 3, groups=2), fastpeft.AdaLoraConfig(init_r=2, total_step=5, target_modules=["c"]),
     "groups=2"),
    (lambda: nn.Conv1d(4, 4, 3), fastpeft.AdaLoraConfig(init_r=2, total_step=5, target_modules=["c"]), "Conv1d"),
    (lambda: nn.Conv3d(4, 4, 1), fastpeft.AdaLoraConfig(init_r=2, total_step=5, target_modules=["c"]), "Conv3d"),
    (lambda: nn.Conv1d(4, 4, 3), fastpeft.IA3Config(target_modules=["c"], feedforward_modules=[]), "Conv1d"),
])
def test_refused_options_name_themselves_and_leave_the_model(make, cfg, match):
    model = nn.Sequential()
    model.add_module("c", make())
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            fastpeft.inject_adapter_in_model(cfg, model)
    assert type(model.c) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_ia3_on_padding_modes_and_dilation_equals_peft():
    """IA3 only scales around the base conv: any padding mode works, as in PEFT."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
                             nn.Conv2d(6, 6, 3, padding=2, dilation=2, padding_mode="circular", groups=3))
    for ff in ([], ["1"]):
        kw = dict(target_modules=["0", "1"], feedforward_modules=ff)
        pm = peft.get_peft_model(make(), peft.IA3Config(**kw))
        fm = fastpeft.get_peft_model(make(), fastpeft.IA3Config(**kw))
        randomize(pm)
        fm.load_state_dict(pm.state_dict())
        x = inputs(Net)
        close(run(fm, x), run(pm, x), atol=1e-6, rtol=1e-6)
        close(run(fm.merge_and_unload(), x), run(pm.merge_and_unload(), x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make, shape, cfg_name, kw", [
    (lambda: nn.Conv2d(4, 6, 4, padding="same"), (2, 4, 7, 7), "LoraConfig", dict(r=2, lora_alpha=4)),
    (lambda: nn.Conv2d(4, 6, 1), (2, 4, 5, 5), "LoraConfig", dict(r=2, lora_alpha=4, use_dora=True)),
    (lambda: nn.Conv2d(4, 6, (1, 3), stride=(2, 1), padding=(0, 1)), (2, 4, 6, 6), "AdaLoraConfig",
     dict(init_r=3, total_step=5)),
    (lambda: nn.Conv3d(4, 6, 3, padding=1, groups=2), (2, 4, 3, 5, 5), "IA3Config", dict(feedforward_modules=[])),
    (lambda: nn.Conv3d(4, 6, 3, padding=1, groups=2), (2, 4, 3, 5, 5), "IA3Config", dict(feedforward_modules=["c"])),
    (lambda: nn.Conv3d(4, 6, (1, 3, 3), stride=2), (2, 4, 3, 7, 7), "LoraConfig", dict(r=4, lora_bias=True)),
])
def test_more_conv_shapes_equal_peft(make, shape, cfg_name, kw):
    """'same' padding with an even kernel, 1x1 kernels (PEFT's special case), non-square kernels
    and strides, Conv3d with groups: outputs, merged weights and merged outputs as PEFT's."""
    def model():
        torch.manual_seed(0)
        m = nn.Sequential()
        m.add_module("c", make())
        return m
    kw = dict(kw, target_modules=["c"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model(), getattr(peft, cfg_name)(**kw))
        fm = fastpeft.get_peft_model(model(), getattr(fastpeft, cfg_name)(**kw))
    randomize(pm)
    fm.load_state_dict(pm.state_dict())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    close(run(fm, x), run(pm, x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_peft, merged = pm.merge_and_unload(), fm.merge_and_unload()
    close(merged.c.weight, merged_peft.c.weight, atol=1e-6, rtol=1e-5)
    close(run(merged, x), run(merged_peft, x))
