"""``add_weighted_adapter`` against peft itself: the same adapters (identical weights) in peft and
fastpeft, the same call under the same ``torch`` seed, then the new adapter's config, weights
(B @ A for the svd types: SVD signs are free), outputs, RNG state, mixed batches, a save that
peft loads, and the errors."""

import contextlib

import peft
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.nn import LoraLinear

from models import fresh_copy, randomize_adapters, tiny

ATOL = 1e-5
FACTOR = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
SVD = ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]
ALL_TYPES = ["cat"] + FACTOR + SVD


class Odd(nn.Module):
    """Odd shapes: an embedding 17 x 12, linears 12 -> 7 -> 5."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(17, 12)
        self.lin1 = nn.Linear(12, 7)
        self.lin2 = nn.Linear(7, 5)

    def forward(self, input_ids):
        return self.lin2(torch.relu(self.lin1(self.emb(input_ids))))


class Convs(nn.Module):
    """Conv2d 3 -> 6 (3x3), Conv2d 6 -> 5 (1x1), then (``conv1d``) Conv1d 5 -> 4 (k=3) over the flattened map."""

    def __init__(self, conv1d=False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 5, 1)
        self.c3 = nn.Conv1d(5, 4, 3) if conv1d else None

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        return y if self.c3 is None else self.c3(y.flatten(2))


def _custom(arch):
    torch.manual_seed(0)
    model = (Odd() if arch == "odd" else Convs(conv1d=arch == "conv1d")).eval()

    def inputs(batch=2, seq=7, seed=1):
        g = torch.Generator().manual_seed(seed)
        if arch == "odd":
            return dict(input_ids=torch.randint(0, 17, (batch, seq), generator=g))
        return dict(x=torch.randn(batch, 3, 4, seq, generator=g))

    return model, inputs


def _cfg(**kw):
    return lambda: peft.LoraConfig(**kw)


# arch -> adapters (name -> peft config maker); "eq": equal ranks, "mixed": ranks differ (cat, svd types)
CASES = {
    "llama-emb-eq": ("llama", {"x": _cfg(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"]),
                               "b": _cfg(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
                               "d": _cfg(r=4, lora_alpha=4, use_rslora=True, target_modules=["embed_tokens", "down_proj"])}),
    "llama-mixed": ("llama", {"x": _cfg(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"]),
                              "b": _cfg(r=6, lora_alpha=3, target_modules=["q_proj", "down_proj"]),
                              "d": _cfg(r=2, lora_alpha=2, target_modules=["embed_tokens", "v_proj"])}),
    "gpt2-conv1d-eq": ("gpt2", {"x": _cfg(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
                                "b": _cfg(r=4, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)}),
    "odd-eq": ("odd", {"x": _cfg(r=3, lora_alpha=6, target_modules=["emb", "lin1", "lin2"]),
                       "b": _cfg(r=3, lora_alpha=3, target_modules=["lin1", "lin2"])}),
    "conv-eq": ("conv", {"x": _cfg(r=3, lora_alpha=6, target_modules=["c1", "c2"]),
                         "b": _cfg(r=3, lora_alpha=3, target_modules=["c1"])}),
    "conv-mixed": ("conv", {"x": _cfg(r=3, lora_alpha=6, target_modules=["c1", "c2"]),
                            "b": _cfg(r=4, lora_alpha=3, target_modules=["c1", "c2"])}),
    "odd-mixed": ("odd", {"x": _cfg(r=3, lora_alpha=6, target_modules=["emb", "lin1", "lin2"]),
                          "b": _cfg(r=5, lora_alpha=3, target_modules=["emb", "lin2"])}),
}
WEIGHTS = [1.0, -0.6, 0.8]


def _out(model, kw, **extra):
    with torch.no_grad():
        out = model(**kw, **extra)
    return out if isinstance(out, torch.Tensor) else out.logits


def _fp(cfg):
    return fastpeft.PeftConfig.from_dict(cfg.to_dict())


def _pair(case, seed=3):
    """(pristine base, peft model, fastpeft model with the same adapter weights, inputs)."""
    arch, makers = CASES[case] if isinstance(case, str) else case
    base, inputs = _custom(arch) if arch in ("odd", "conv", "conv1d") else tiny(arch)
    names = list(makers)
    pm = peft.get_peft_model(fresh_copy(base), makers[names[0]](), adapter_name=names[0])
    fm = fastpeft.get_peft_model(fresh_copy(base), _fp(makers[names[0]]()), adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, makers[n]())
        fm.add_adapter(n, _fp(makers[n]()))
    randomize_adapters(pm, seed=seed)
    fm.load_state_dict(pm.state_dict())
    return base, pm.eval(), fm.eval(), inputs


def _both(pm, fm, *args, seed=7, **kw):
    """The same call on both under the same seed; returns (peft RNG state, fastpeft RNG state) after."""
    states = []
    for m in (pm, fm):
        torch.manual_seed(seed)
        m.add_weighted_adapter(*args, **kw)
        states.append(torch.get_rng_state())
    return states


def _adapter_sd(model, name):
    return {k: v.detach() for k, v in model.state_dict().items() if f".{name}." in k or k.endswith(f".{name}")}


def _products(sd):
    """key prefix -> B @ A (embeddings: lora_embedding_B @ lora_embedding_A)."""
    out = {}
    for k, a in sd.items():
        if ".lora_A." in k or ".lora_embedding_A." in k:
            kb = k.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
            r = a.shape[0]  # convolutions: B [C_out, r, 1..] @ A [r, C_in * prod(k)]
            out[k] = sd[kb].float().reshape(-1, r) @ a.float().reshape(r, -1)
    return out


def _max_diff(x, y):
    return (x.float() - y.float()).abs().max().item()


def _check_same(pm, fm, inputs, kind, name="c"):
    cp, cf = pm.peft_config[name], fm.peft_config[name]
    assert (cf.r, cf.lora_alpha, cf.target_modules) == (cp.r, cp.lora_alpha, cp.target_modules)
    assert (cf.rank_pattern, cf.alpha_pattern) == ({}, {})
    for f in ("use_rslora", "lora_dropout", "init_lora_weights", "modules_to_save", "fan_in_fan_out", "bias",
              "layers_to_transform", "exclude_modules"):
        assert getattr(cf, f) == getattr(cp, f), f
    assert fm.active_adapters == pm.active_adapters  # the new adapter is not activated
    sp, sf = _adapter_sd(pm, name), _adapter_sd(fm, name)
    assert set(sp) == set(sf) and sp
    for k in sp:
        assert sf[k].shape == sp[k].shape, k
        assert not sf[k].requires_grad
    if kind in SVD:
        pp, pf = _products(sp), _products(sf)
        for k in pp:
            assert _max_diff(pf[k], pp[k]) <= 1e-5 * (1 + pp[k].abs().max().item()), k
    else:
        for k in sp:
            torch.testing.assert_close(sf[k], sp[k], atol=1e-6, rtol=1e-5, msg=k)
    kw = inputs(batch=3, seq=5)
    pm.set_adapter(name)
    fm.set_adapter(name)
    expected = _out(pm, kw)
    got = _out(fm, kw)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
    return kw, expected


# the factor types need equal ranks (the error is tested below); odd shapes and convolutions: cat
# and the svd types with mixed ranks, the factor types with equal ones
PAIRS = [(c, k) for c in sorted(CASES) for k in ALL_TYPES
         if (k in FACTOR) != c.endswith("mixed") or c.startswith(("llama-emb", "gpt2"))]
SAVED = ("cat", "dare_ties", "svd", "ties_svd")  # the kinds also saved and loaded in peft (time)


@pytest.mark.parametrize("case,kind", PAIRS)
def test_matches_peft(case, kind, tmp_path):
    base, pm, fm, inputs = _pair(case)
    names = list(CASES[case][1])
    extra = {"density": 0.6} if kind not in ("cat", "linear", "svd") else {}
    if kind.startswith("ties") or kind.startswith("dare_ties"):
        extra["majority_sign_method"] = "frequency" if case.startswith("odd") else "total"
    sources = {k: v.clone() for k, v in fm.state_dict().items()}
    st_p, st_f = _both(pm, fm, names, WEIGHTS[: len(names)], "c", combination_type=kind, **extra)
    assert torch.equal(st_p, st_f), "RNG state after the call differs from peft's (draws replayed wrongly)"
    ranks = [CASES[case][1][n]().r for n in names]
    assert fm.peft_config["c"].r == {"cat": sum(ranks)}.get(kind, max(ranks))
    kw, expected = _check_same(pm, fm, inputs, kind)
    after = fm.state_dict()
    for k, v in sources.items():  # the source adapters are untouched
        assert torch.equal(after[k], v), k

    # the fused route ran with the new adapter
    linears = [m for m in fm.modules() if isinstance(m, LoraLinear) and "c" in m.r]
    assert not linears or any(m.bank.plan is not None for m in linears)
    # mixed batch rows == the rows of whole-batch runs with one adapter (rows are independent)
    mixed = _out(fm, kw, adapter_names=["c", names[0], "__base__"])
    fm.set_adapter(names[0])
    first = _out(fm, kw)
    with fm.disable_adapter():
        plain = _out(fm, kw)
    for i, ref in enumerate((expected, first, plain)):
        torch.testing.assert_close(mixed[i], ref[i], atol=ATOL, rtol=1e-5)
    # a save of the new adapter loads in peft with the same outputs
    if kind in SAVED:
        fm.save_pretrained(str(tmp_path), selected_adapters=["c"])
        loaded = peft.PeftModel.from_pretrained(fresh_copy(base), str(tmp_path / "c")).eval()
        torch.testing.assert_close(_out(loaded, kw), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("opts", [dict(combination_type="svd", svd_rank=3, svd_clamp=0.9),
                                  dict(combination_type="ties_svd", svd_rank=2, density=0.5, svd_full_matrices=False),
                                  dict(combination_type="dare_ties", density=1.0),
                                  dict(combination_type="ties", density=0.0),
                                  dict(combination_type="svd")])  # one adapter: linear, as peft
def test_options_match_peft(opts):
    _, pm, fm, inputs = _pair("llama-emb-eq")
    adapters = ["b"] if opts == dict(combination_type="svd") else ["x", "b", "d"]
    w = WEIGHTS[: len(adapters)]
    with pytest.warns(UserWarning, match="no pruning") if opts.get("density") == 1.0 else contextlib.nullcontext():
        st_p, st_f = _both(pm, fm, adapters, w, "c", **opts)
    assert torch.equal(st_p, st_f)
    kind = "linear" if len(adapters) == 1 else opts["combination_type"]
    _check_same(pm, fm, inputs, kind)
    assert fm.peft_config["c"].r == opts.get("svd_rank", 4)


@pytest.mark.parametrize("init", [False, "gaussian"])
def test_init_draws_replayed(init):
    """The first adapter's init_lora_weights (copied to the new config) sets the random draws of
    peft's initialization, which come before the DARE masks."""
    makers = dict(CASES["llama-emb-eq"][1])
    makers["x"] = _cfg(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], init_lora_weights=init)
    _, pm, fm, inputs = _pair(("llama", makers))
    st_p, st_f = _both(pm, fm, ["x", "b", "d"], WEIGHTS, "c", combination_type="dare_ties", density=0.5)
    assert torch.equal(st_p, st_f)
    _check_same(pm, fm, inputs, "dare_ties")


def test_svd_rank_above_layer_size():
    """svd_rank 8 above the 5 outputs of lin2 (peft's shapes break there): zero-padded, and at a
    rank that holds every delta the result is the exact combination, as cat's."""
    _, pm, fm, inputs = _pair("odd-mixed")
    fm.add_weighted_adapter(["x", "b"], [0.7, -0.4], "s", combination_type="svd", svd_rank=8)
    fm.add_weighted_adapter(["x", "b"], [0.7, -0.4], "cat", combination_type="cat")
    lin2 = fm.base_model.model.lin2
    assert lin2.lora_A["s"].weight.shape == (8, 7) and lin2.lora_B["s"].weight[:, 5:].abs().max() == 0
    kw = inputs()
    fm.set_adapter("s")
    got = _out(fm, kw)
    fm.set_adapter("cat")
    torch.testing.assert_close(got, _out(fm, kw), atol=1e-5, rtol=1e-4)


def test_conv1d():
    """peft's svd types fail on Conv1d (a 3-D delta); the others match peft, and fastpeft's svd at
    full rank reproduces the weighted sum of the deltas."""
    makers = {"x": _cfg(r=3, lora_alpha=6, target_modules=["c1", "c3"]), "b": _cfg(r=2, lora_alpha=2, target_modules=["c3"])}
    _, pm, fm, inputs = _pair(("conv1d", makers))
    _both(pm, fm, ["x", "b"], [0.7, -0.4], "c", combination_type="cat")
    _check_same(pm, fm, inputs, "cat")
    with pytest.raises(RuntimeError):
        pm.add_weighted_adapter(["x", "b"], [0.7, -0.4], "s", combination_type="svd", svd_rank=5)
    fm.add_weighted_adapter(["x", "b"], [0.7, -0.4], "s", combination_type="svd", svd_rank=5)
    layer = fm.base_model.model.c3
    expected = 0.7 * layer.get_delta_weight("x") - 0.4 * layer.get_delta_weight("b")
    torch.testing.assert_close(layer.get_delta_weight("s"), expected, atol=1e-5, rtol=1e-4)
    makers["b"] = _cfg(r=3, lora_alpha=2, target_modules=["c3"])
    _, pm, fm, inputs = _pair(("conv1d", makers))
    _both(pm, fm, ["x", "b"], [0.7, -0.4], "c", combination_type="dare_ties", density=0.5)
    _check_same(pm, fm, inputs, "dare_ties")


def test_bf16_base():
    """A bf16 model with fp32 adapters (autocast, the default of both): the new adapter is fp32 too."""
    makers = CASES["llama-emb-eq"][1]
    base, inputs = tiny("llama")
    base = base.to(torch.bfloat16)
    names = list(makers)
    pm = peft.get_peft_model(fresh_copy(base), makers["x"](), adapter_name="x")
    fm = fastpeft.get_peft_model(fresh_copy(base), _fp(makers["x"]()), adapter_name="x")
    for n in names[1:]:
        pm.add_adapter(n, makers[n]())
        fm.add_adapter(n, _fp(makers[n]()))
    randomize_adapters(pm, seed=3)
    fm.load_state_dict(pm.state_dict())
    pm.eval()
    fm.eval()
    for kind in ("dare_linear", "svd"):
        st_p, st_f = _both(pm, fm, names, WEIGHTS, kind, combination_type=kind, density=0.7)
        assert torch.equal(st_p, st_f)
        sp, sf = _adapter_sd(pm, kind), _adapter_sd(fm, kind)
        assert {v.dtype for v in sf.values()} == {v.dtype for v in sp.values()} == {torch.float32}
        kw = inputs()
        pm.set_adapter(kind)
        fm.set_adapter(kind)
        torch.testing.assert_close(_out(fm, kw).float(), _out(pm, kw).float(), atol=3e-2, rtol=3e-2)


def test_modules_to_save_as_peft():
    """One source with modules_to_save: the new adapter gets a fresh copy of the original module
    (peft's semantics); two sources sharing one: refused by both."""
    makers = {"x": _cfg(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
              "b": _cfg(r=4, target_modules=["query"])}
    _, pm, fm, inputs = _pair(("roberta_tok", makers))
    _both(pm, fm, ["x", "b"], [0.7, 0.5], "c", combination_type="cat")
    assert fm.peft_config["c"].modules_to_save == pm.peft_config["c"].modules_to_save == ["classifier"]
    _check_same(pm, fm, inputs, "cat")
    makers["b"] = _cfg(r=4, target_modules=["query"], modules_to_save=["classifier"])
    _, pm, fm, _ = _pair(("roberta_tok", makers))
    _expect_both(pm, fm, ValueError, ValueError, "same module with modules_to_save", ["x", "b"], [1, 1], "c",
                 combination_type="linear")


IA3_CASES = {
    "llama": {"x": lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
              "b": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[])},
    "conv": {"x": lambda: peft.IA3Config(target_modules=["c1", "c2"], feedforward_modules=["c1"]),
             "b": lambda: peft.IA3Config(target_modules=["c2"], feedforward_modules=[])},
}


@pytest.mark.parametrize("arch", sorted(IA3_CASES))
def test_ia3_matches_peft(arch, tmp_path):
    base, pm, fm, inputs = _pair((arch, IA3_CASES[arch]))
    _both(pm, fm, ["x", "b"], [0.6, 0.7], "c")
    assert fm.peft_config["c"].target_modules == pm.peft_config["c"].target_modules
    assert fm.peft_config["c"].feedforward_modules == pm.peft_config["c"].feedforward_modules
    sp, sf = _adapter_sd(pm, "c"), _adapter_sd(fm, "c")
    assert set(sp) == set(sf) and sp
    for k in sp:
        torch.testing.assert_close(sf[k], sp[k], atol=0, rtol=0, msg=k)
    kw = inputs()
    pm.set_adapter("c")
    fm.set_adapter("c")
    torch.testing.assert_close(_out(fm, kw), _out(pm, kw), atol=ATOL, rtol=1e-5)
    fm.save_pretrained(str(tmp_path), selected_adapters=["c"])
    loaded = peft.PeftModel.from_pretrained(fresh_copy(base), str(tmp_path / "c")).eval()
    torch.testing.assert_close(_out(loaded, kw), _out(pm, kw), atol=ATOL, rtol=1e-5)
    _expect_both(pm, fm, TypeError, TypeError, "combination_type", ["x", "b"], [1, 1], "e", combination_type="cat")


def _state(fm, inputs):
    return (list(fm.peft_config), sorted(fm.state_dict()), _out(fm, inputs()), torch.get_rng_state(),
            [(m.adapter_names, m.active_adapters) for m in fm.modules() if isinstance(m, fastpeft.nn.AdapterLayer)])


def _expect_both(pm, fm, peft_exc, our_exc, match, *args, inputs=None, **kw):
    """peft raises ``peft_exc`` (None: it does not raise); fastpeft raises ``our_exc`` matching
    ``match`` and leaves the model, its outputs and the RNG state as they were."""
    if peft_exc is not None:
        with pytest.raises(peft_exc):
            pm.add_weighted_adapter(*args, **kw)
    if inputs is None:
        with pytest.raises(our_exc, match=match):
            fm.add_weighted_adapter(*args, **kw)
        return
    before = _state(fm, inputs)
    with pytest.raises(our_exc, match=match):
        fm.add_weighted_adapter(*args, **kw)
    after = _state(fm, inputs)
    assert before[0] == after[0] and before[1] == after[1] and before[4] == after[4]
    torch.testing.assert_close(after[2], before[2], atol=0, rtol=0)
    assert torch.equal(after[3], before[3])


def test_errors_as_peft():
    _, pm, fm, inputs = _pair("llama-mixed")
    ab = ["x", "b"]
    _expect_both(pm, fm, ValueError, ValueError, "Adapter zz does not exist", ["x", "zz"], [1, 1], "c", inputs=inputs)
    for kind in FACTOR:
        _expect_both(pm, fm, ValueError, ValueError, "same r value", ab, [1, 1], "c", combination_type=kind,
                     density=0.5, inputs=inputs)
    _expect_both(pm, fm, ValueError, ValueError, "Invalid combination_type", ab, [1, 1], "c",
                 combination_type="average", inputs=inputs)
    # peft fails late (after adding half an adapter) or not at all here; fastpeft refuses first
    _expect_both(pm, fm, None, ValueError, "needs density", ab, [1, 1], "c1", combination_type="ties_svd",
                 inputs=inputs)
    _expect_both(pm, fm, RuntimeError, ValueError, "CUDA only", ab, [1, 1], "c2", svd_driver="gesvd", inputs=inputs)
    _expect_both(None, fm, None, ValueError, "one number per adapter", ab, [1], "c", inputs=inputs)
    _expect_both(None, fm, None, ValueError, "majority_sign_method", ab, [1, 1], "c", majority_sign_method="x",
                 inputs=inputs)
    _expect_both(None, fm, None, ValueError, "svd_rank", ab, [1, 1], "c", svd_rank=0, inputs=inputs)
    _expect_both(None, fm, None, ValueError, "svd_clamp", ab, [1, 1], "c", svd_clamp=1.5, inputs=inputs)
    _expect_both(None, fm, None, ValueError, "1/0", ab, [1, 1], "c", combination_type="dare_linear_svd", density=0,
                 inputs=inputs)
    _expect_both(None, fm, None, ValueError, "Density should be >= 0", ab, [1, 1], "c", combination_type="ties_svd",
                 density=-0.1, inputs=inputs)
    _expect_both(None, fm, None, ValueError, "non-empty list", [], [], "c", inputs=inputs)
    # an existing name: nothing happens (peft returns silently; fastpeft warns)
    before = _state(fm, inputs)
    with pytest.warns(UserWarning, match="already exists"):
        fm.add_weighted_adapter(ab, [1, 1], "b")
    assert before[0] == _state(fm, inputs)[0]


def test_errors_of_configs():
    # str and list target_modules cannot be combined
    makers = {"x": _cfg(r=4, target_modules=r".*\.q_proj"), "b": _cfg(r=4, target_modules=["v_proj"])}
    _, pm, fm, inputs = _pair(("llama", makers))
    _expect_both(pm, fm, ValueError, ValueError, "same target_modules type", ["x", "b"], [1, 1], "c", inputs=inputs)
    # a module the combined config targets but no source holds (b limited to layer 1 by its own config)
    makers = {"x": _cfg(r=4, target_modules=["q_proj"]),
              "b": _cfg(r=4, target_modules=["v_proj"], layers_to_transform=[1], layers_pattern="layers")}
    _, pm, fm, inputs = _pair(("llama", makers))
    _expect_both(pm, fm, ValueError, ValueError, "holds none of", ["x", "b"], [1, 1], "c", combination_type="cat",
                 inputs=inputs)
    # equal config ranks, different ranks in one layer (rank_pattern): refused inside, rolled back
    makers = {"x": _cfg(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}),
              "b": _cfg(r=4, target_modules=["q_proj", "v_proj"])}
    _, pm, fm, inputs = _pair(("llama", makers))
    _expect_both(pm, fm, RuntimeError, ValueError, "different ranks", ["x", "b"], [1, 1], "c",
                 combination_type="linear", inputs=inputs)
    # DoRA and lora_bias: peft builds an adapter whose magnitude / bias is not combined; refused here
    makers = {"x": _cfg(r=4, target_modules=["q_proj"], use_dora=True), "b": _cfg(r=4, target_modules=["q_proj"])}
    _, pm, fm, inputs = _pair(("llama", makers))
    _expect_both(None, fm, None, ValueError, "DoRA", ["x", "b"], [1, 1], "c", inputs=inputs)
    makers = {"x": _cfg(r=4, target_modules=["v_proj"]), "b": _cfg(r=4, target_modules=["v_proj"], lora_bias=True)}
    _, pm, fm, inputs = _pair(("llama", makers))
    _expect_both(None, fm, None, ValueError, "lora_bias", ["x", "b"], [1, 1], "c", inputs=inputs)


def test_adalora_refused_as_peft():
    makers = {"x": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj"], total_step=10)}
    _, pm, fm, _ = _pair(("llama", makers))
    _expect_both(pm, fm, TypeError, TypeError, "does not support add_weighted_adapter", ["x"], [1], "c")


@pytest.mark.gpu
def test_cuda_random_masks_match_peft():
    """On CUDA the DARE masks come from the CUDA generator (peft's initialization draws stay on
    the CPU one): both generators end where peft's do, and the weights match."""
    _, pm, fm, inputs = _pair("gpt2-conv1d-eq")
    pm.cuda()
    fm.cuda()
    kw = {k: v.cuda() for k, v in inputs(batch=3, seq=5).items()}
    for kind in ("dare_ties", "dare_linear_svd"):
        states = []
        for m in (pm, fm):
            torch.manual_seed(11)
            m.add_weighted_adapter(["x", "b"], [1.0, -0.6], kind, combination_type=kind, density=0.6)
            states.append((torch.get_rng_state(), torch.cuda.get_rng_state()))
        assert all(torch.equal(a, b) for a, b in zip(*states, strict=True))
        sp, sf = _adapter_sd(pm, kind), _adapter_sd(fm, kind)
        pp, pf = (_products(sp), _products(sf)) if kind in SVD else (sp, sf)
        for k in pp:
            torch.testing.assert_close(pf[k], pp[k], atol=1e-5, rtol=1e-4, msg=k)
        pm.set_adapter(kind)
        fm.set_adapter(kind)
        torch.testing.assert_close(_out(fm, kw), _out(pm, kw), atol=1e-4, rtol=1e-4)
