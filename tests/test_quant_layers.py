"""fastpeft.quantize and fastpeft.quant.layers against bitsandbytes' own layers and PEFT's LoRA on them.

* quantize() builds bitsandbytes Linear4bit / Linear8bitLt whose storage, forward and
  state_dict are those of bitsandbytes' own layers for the same weights;
* bad arguments raise ValueError and leave the model untouched;
* quantized_adapter_linear on a bitsandbytes base equals PEFT's LoRA layer on that base
  (``result = base_layer(x)`` by bitsandbytes, plus the LoRA delta), single and mixed adapters,
  with the PyTorch and the Triton backends.

bitsandbytes' CPU forward of Linear4bit in eval mode on an AVX512-BF16 machine repacks the
weight and runs in bfloat16; the exact comparisons therefore run bitsandbytes in training mode
(dropout 0), which takes its dequantize + matmul path. The eval path is checked separately.
"""
import copy
import os
import warnings

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import bitsandbytes.functional as BF  # noqa: E402

import fastpeft  # noqa: E402
import fastpeft.ops as ops  # noqa: E402
from fastpeft.quant import formats as F  # noqa: E402
from fastpeft.quant.layers import (  # noqa: E402
    dequantize_weight,
    is_quantized_linear,
    quantized_adapter_linear,
    quantized_like,
)
from fastpeft.quantize import quantize  # noqa: E402

from tolerance import ATOL, RTOL  # noqa: E402

BACKENDS = ["torch"] + (["triton"] if "triton" in ops.available_backends() else [])


@pytest.fixture(autouse=True)
def _quiet():
    import torch._dynamo

    with warnings.catch_warnings(), torch._dynamo.config.patch(disable=True):
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(params=BACKENDS)
def backend(request):
    prev = ops.get_backend()
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend(prev)


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96, bias=False), nn.ReLU(), nn.Linear(96, 64)).to(dtype)


def bnb_reference(lin: nn.Linear, bits, quant_type="nf4", double_quant=True, compute_dtype=None):
    """bitsandbytes' own layer for ``lin``, built the documented way (load_state_dict, then .to(device))."""
    if bits == 4:
        layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                                  compress_statistics=double_quant, quant_type=quant_type, device="cpu").to(lin.weight.dtype)
    else:
        layer = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False)
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(cfg)


def snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model, snap):
    mods, sd = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == mods
    now = model.state_dict()
    assert now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd)


# ---- quantize(): layers equal to bitsandbytes' own -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False), ("fp4", True)])
def test_quantize_4bit_equals_bnb_layers(dtype, quant_type, double_quant):
    model = mlp(dtype)
    refs = [bnb_reference(model[i], 4, quant_type, double_quant) for i in (0, 2, 4)]
    assert quantize(model, bits=4, quant_type=quant_type, double_quant=double_quant) is model
    assert getattr(model, "is_loaded_in_4bit", False)
    x = torch.randn(5, 64, dtype=dtype)
    for i, r in zip((0, 2, 4), refs, strict=True):
        q = model[i]
        assert type(q) is bnb.nn.Linear4bit and is_quantized_linear(q)
        assert torch.equal(q.weight.data, r.weight.data) and q.weight.quant_state == r.weight.quant_state
        assert q.weight.quant_type == quant_type and q.weight.compress_statistics == double_quant
        assert q.weight.blocksize == 64 and q.weight.quant_state.blocksize == 64
        q.train(), r.train()
        xi = torch.randn(5, q.in_features, dtype=dtype)
        assert torch.equal(q(xi), r(xi))
    model.train()
    assert model(x).shape == (5, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_8bit_equals_bnb_layers(dtype):
    model = mlp(dtype)
    refs = [bnb_reference(model[i], 8) for i in (0, 2, 4)]
    quantize(model, bits=8)
    assert getattr(model, "is_loaded_in_8bit", False)
    for i, r in zip((0, 2, 4), refs, strict=True):
        q = model[i]
        assert type(q) is bnb.nn.Linear8bitLt and is_quantized_linear(q)
        assert torch.equal(q.weight.data, r.weight.data) and torch.equal(q.weight.SCB, r.weight.SCB)
        xi = torch.randn(4, q.in_features, dtype=dtype)
        for train in (True, False):  # fp path (train) and int8 path (eval)
            q.train(train), r.train(train)
            with torch.no_grad():
                assert torch.equal(q(xi), r(xi))


@pytest.mark.parametrize("bits", [4, 8])
def test_state_dict_roundtrip_safetensors_into_bnb(tmp_path, bits):
    from safetensors.torch import load_file, save_file

    model = quantize(mlp(torch.float16), bits=bits)
    layer = model[0]
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(tmp_path / "l.safetensors"))
    sd = load_file(str(tmp_path / "l.safetensors"))
    if bits == 4:  # how Transformers loads a pre-quantized 4-bit checkpoint
        other = bnb.nn.Linear4bit(64, 128, compress_statistics=True, quant_type="nf4", device="meta")
        other.weight = bnb.nn.Params4bit.from_prequantized(
            sd["weight"], {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}, device="cpu",
            module=other)
        other.bias = nn.Parameter(sd["bias"], requires_grad=False)
    else:  # bitsandbytes' documented way: quantize (any values), then load_state_dict
        other = bnb.nn.Linear8bitLt(64, 128, has_fp16_weights=False).to("cpu")
        other.load_state_dict(sd)
    x = torch.randn(3, 64, dtype=torch.float16)
    layer.train(), other.train()
    assert torch.equal(layer(x), other(x))
    assert torch.equal(dequantize_weight(other), dequantize_weight(layer))


def test_quantize_skips_lm_head_tied_and_named_modules():
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied output embedding
    quantize(model, skip_modules=["k_proj", "mlp.up_proj"])
    layer = model.model.layers[0]
    assert type(model.lm_head) is nn.Linear
    assert type(layer.self_attn.k_proj) is nn.Linear and type(layer.mlp.up_proj) is nn.Linear
    for m in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert type(m) is bnb.nn.Linear4bit
    model.train()
    assert model(torch.randint(0, 128, (2, 5))).logits.shape == (2, 5, 128)


def test_quantize_keeps_adapter_projections_dense():
    model = mlp()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["0", "2"]))
    quantize(pm)
    inner = pm.base_model.model
    assert type(inner[0].base_layer) is bnb.nn.Linear4bit and type(inner[2].base_layer) is bnb.nn.Linear4bit
    assert type(inner[0].lora_A["default"]) is nn.Linear and type(inner[2].lora_B["default"]) is nn.Linear
    assert type(inner[4]) is bnb.nn.Linear4bit


def test_already_quantized_model_is_accepted_unchanged():
    model = quantize(mlp(), bits=4)
    snap = snapshot(model)
    ids = [id(m) for m in model.modules()]
    assert quantize(model, bits=4) is model and quantize(model, bits=8) is model
    assert [id(m) for m in model.modules()] == ids
    assert_same(model, snap)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3), r"bits=3.*4 or 8"),
    (dict(bits=True), r"bits=True"),
    (dict(bits="4"), r"bits='4'"),
    (dict(quant_type="int4"), r"quant_type='int4'.*'nf4' or 'fp4'"),
    (dict(bits=8, quant_type="fp4"), r"quant_type='fp4'.*bits=8"),
    (dict(compute_dtype=torch.int8), r"compute_dtype=torch.int8.*floating"),
    (dict(compute_dtype="bfloat16"), r"compute_dtype='bfloat16'"),
    (dict(compute_dtype=torch.float64), r"compute_dtype=torch.float64"),
    (dict(double_quant="yes"), r"double_quant"),
    (dict(skip_modules=[3]), r"skip_modules"),
])
def test_bad_arguments_leave_model_unchanged(kwargs, match):
    model = mlp()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        quantize(model, **kwargs)
    assert_same(model, snap)


def test_bad_weights_leave_model_unchanged():
    model = mlp()
    model[4].to(torch.float64)  # the last layer cannot be quantized: nothing may change
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"4\.weight.*float64"):
        quantize(model)
    assert_same(model, snap)
    with pytest.raises(ValueError, match="nn.Module"):
        quantize("not a model")


# ---- layers interface ------------------------------------------------------------------------


def test_dequantize_weight_matches_bnb_and_peft():
    from peft.utils.integrations import dequantize_bnb_weight

    m4 = quantize(mlp(torch.bfloat16), bits=4)
    w = dequantize_weight(m4[0])
    assert w.dtype == torch.bfloat16 and w.shape == (128, 64)
    assert torch.equal(w, BF.dequantize_4bit(m4[0].weight.data, m4[0].weight.quant_state))
    m8 = quantize(mlp(), bits=8)
    w8 = dequantize_weight(m8[2])
    assert torch.equal(w8, dequantize_bnb_weight(m8[2].weight, m8[2].state))


def test_dequantize_weight_after_bnb_cpu_repack():
    # bitsandbytes' eval forward on an AVX512-BF16 CPU repacks the weight (absmax -> bf16)
    model = quantize(mlp(torch.bfloat16), bits=4)
    layer = model[0]
    before = dequantize_weight(layer)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    layer.train()
    y_train = layer(x)
    layer.eval()
    with torch.no_grad():
        layer(x)
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack on this CPU")
    after = dequantize_weight(layer)
    torch.testing.assert_close(after, before, rtol=2 ** -7, atol=0)  # only the bf16-rounded absmax
    y = quantized_adapter_linear(layer, x, None, None, None, None, None, None, None)
    torch.testing.assert_close(y, y_train, rtol=RTOL[torch.bfloat16], atol=ATOL[torch.bfloat16])


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_like_requantizes_with_same_settings(bits):
    model = quantize(mlp(torch.float16), bits=bits, quant_type="fp4" if bits == 4 else "nf4", double_quant=False)
    base = model[0]
    new_w = dequantize_weight(base).float() + 0.01 * torch.randn(128, 64)
    new = quantized_like(base, new_w)
    assert type(new) is type(base) and new.bias is base.bias
    if bits == 4:
        qs, qn = base.weight.quant_state, new.weight.quant_state
        assert (qn.quant_type, qn.blocksize, qn.nested, qn.dtype) == (qs.quant_type, qs.blocksize, qs.nested, qs.dtype)
        packed, st = F.quantize_4bit(new_w.to(torch.float16), "fp4", 64, False)
        assert torch.equal(new.weight.data, packed)
    else:
        cb, scb = F.quantize_8bit_rowwise(new_w)
        assert torch.equal(new.weight.data, cb) and torch.equal(new.weight.SCB, scb)
    x = torch.randn(3, 64, dtype=torch.float16)
    new.train()
    torch.testing.assert_close(new(x), torch.nn.functional.linear(x, dequantize_weight(new).half(), base.bias.half()))


def test_compute_dtype_is_fixed_by_first_input_like_bnb(backend):
    model = quantize(mlp(torch.float32), bits=4)  # compute_dtype None: bnb takes it from the first input
    ours, theirs = model[0], copy.deepcopy(model[0])
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    theirs.train()
    want = theirs(x)
    got = quantized_adapter_linear(ours, x, None, None, None, None, None, None, None)
    assert ours.compute_dtype == theirs.compute_dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=RTOL[torch.bfloat16], atol=ATOL[torch.bfloat16])


# ---- parity with PEFT's LoRA on bitsandbytes layers -----------------------------------------


def stacked(layers_ab, R):
    """lora_a [S, R, K], lora_b [S, R, N] from [(A [r, K], B [N, r]), ...]: lora_a[s, :r] = A, lora_b[s, :r] = B.T."""
    K = layers_ab[0][0].shape[1]
    N = layers_ab[0][1].shape[0]
    a = torch.zeros(len(layers_ab), R, K)
    b = torch.zeros(len(layers_ab), R, N)
    for s, (A, B) in enumerate(layers_ab):
        a[s, : A.shape[0]] = A
        b[s, : A.shape[0]] = B.t()
    return a, b


def capture(model, names):
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: seen.__setitem__(n, (args[0].detach(), out.detach()))) for n in names]
    return seen, hooks


@pytest.mark.parametrize("bits", [4, 8])
def test_peft_lora_parity_tiny_llama(backend, bits):
    model = quantize(tiny_llama(), bits=bits)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                          init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    pm.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                            lora_dropout=0.0, init_lora_weights=False))
    names = [n for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer) and hasattr(m, "base_layer")]
    assert len(names) == 3
    bnb_cls = peft.tuners.lora.bnb.Linear4bit if bits == 4 else peft.tuners.lora.bnb.Linear8bitLt
    assert all(type(pm.get_submodule(n)) is bnb_cls for n in names)
    pm.eval()  # PEFT refuses adapter_names in training mode
    for m in pm.modules():  # ...but bitsandbytes' layers in training mode take their exact
        if is_quantized_linear(m):  # dequantize + matmul CPU path
            m.train()
    ids = torch.randint(0, 128, (3, 5))
    for adapter_names in (None, ["default", "__base__", "other"]):
        seen, hooks = capture(pm, names)
        with torch.no_grad():
            if adapter_names is None:
                pm(input_ids=ids)
            else:
                pm(input_ids=ids, adapter_names=adapter_names)
        for h in hooks:
            h.remove()
        for n in names:
            layer = pm.get_submodule(n)
            x, want = seen[n]
            ab = [(layer.lora_A[a].weight, layer.lora_B[a].weight) for a in ("default", "other")]
            a, b = stacked(ab, 8)
            scales = torch.tensor([layer.scaling["default"], layer.scaling["other"]], dtype=torch.float32)
            x2 = x.reshape(-1, x.shape[-1])
            if adapter_names is None:
                slots = torch.tensor([[0]], dtype=torch.int32)
            else:
                per_row = {"default": 0, "__base__": -1, "other": 1}
                slots = torch.tensor([per_row[s] for s in adapter_names], dtype=torch.int32)
                slots = slots.repeat_interleave(x.shape[1])[:, None]
            got = quantized_adapter_linear(layer.base_layer, x2, a, b, scales, slots, None, None, None)
            got = got.reshape(want.shape)
            if backend == "torch":  # same operations in the same order as PEFT + bitsandbytes
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            else:
                torch.testing.assert_close(got, want, rtol=RTOL[torch.float32], atol=ATOL[torch.float32])


def test_peft_lora_8bit_int8_eval_path_within_activation_rounding():
    # bitsandbytes' eval int8 path also rounds x to int8 per row: compare within that bound
    model = quantize(tiny_llama(), bits=8)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj"], lora_dropout=0.0,
                                                     init_lora_weights=False))
    name = [n for n, m in pm.named_modules() if n.endswith("q_proj") and hasattr(m, "base_layer")][0]
    layer = pm.get_submodule(name)
    pm.eval()
    seen, hooks = capture(pm, [name])
    with torch.no_grad():
        pm(input_ids=torch.randint(0, 128, (2, 4)))
    hooks[0].remove()
    x, want = seen[name]
    x2 = x.reshape(-1, x.shape[-1])
    a, b = stacked([(layer.lora_A["default"].weight, layer.lora_B["default"].weight)], 8)
    got = quantized_adapter_linear(layer.base_layer, x2, a, b, torch.tensor([layer.scaling["default"]]),
                                   torch.tensor([[0]], dtype=torch.int32), None, None, None).reshape(want.shape)
    w = dequantize_weight(layer.base_layer)
    # |x - q(x)| <= absmax_row(x.half()) / 127 / 2 per element, plus float16 rounding of x and y
    step = x2.half().float().abs().amax(dim=1, keepdim=True) / 127 * 0.5 + x2.abs() * 2 ** -11
    bound = step @ w.abs().t() + want.reshape(x2.shape[0], -1).abs() * 2 ** -10 + 1e-5
    assert ((got - want).reshape(bound.shape).abs() <= bound).all()


class _LinearNF4Holder(nn.Module):
    def __init__(self, lin, custom_forward=False):
        super().__init__()
        nf4 = bnb.nn.LinearNF4(lin.in_features, lin.out_features, bias=lin.bias is not None, device="cpu")
        nf4.load_state_dict(lin.state_dict())
        self.proj = nf4.to("cpu")
        self.is_loaded_in_4bit = True  # as Transformers sets it: PEFT then picks its bitsandbytes LoRA layer

    def forward(self, x):
        return self.proj(x)


def test_bnb_subclass_linear_nf4_is_a_quantized_base_as_in_peft():
    """bitsandbytes' LinearNF4 (a Linear4bit subclass) counts as a quantized base everywhere:
    the fused path runs, outputs equal PEFT's, and merging dequantizes and requantizes (it used
    to be taken for an nn.Linear-like layer by one rule and quantized by another)."""
    from fastpeft.nn._base_kinds import base_kind, fused_forward_ok

    torch.manual_seed(0)
    lin = nn.Linear(64, 96)
    cfg = dict(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False)
    pm = peft.get_peft_model(_LinearNF4Holder(lin), peft.LoraConfig(**cfg))
    fm = fastpeft.get_peft_model(_LinearNF4Holder(lin), fastpeft.LoraConfig(**cfg))
    fm.load_state_dict(pm.state_dict(), strict=False)
    base = fm.base_model.model.proj.base_layer
    assert type(base).__name__ == "LinearNF4" and base_kind(base) == "quant" and fused_forward_ok(base)
    x = torch.randn(5, 64)
    with torch.no_grad():
        want = pm(x)
        torch.testing.assert_close(fm(x), want, atol=1e-4, rtol=1e-4)
        merged = fm.merge_and_unload()
        peft_merged = pm.merge_and_unload()
        # the same requantized NF4 weight as PEFT's merge (PEFT keeps the LinearNF4 object and swaps its
        # weight; fastpeft's merge builds a Linear4bit with the same storage and settings)
        assert isinstance(merged.proj, bnb.nn.Linear4bit) and merged.proj.weight.quant_type == "nf4"
        torch.testing.assert_close(merged(x), peft_merged(x), atol=1e-5, rtol=1e-5)


def test_bnb_subclass_with_its_own_forward_runs_unfused():
    from fastpeft.nn._base_kinds import fused_forward_ok

    class Scaled4bit(bnb.nn.Linear4bit):
        def forward(self, x):
            return 2 * super().forward(x)

    layer = Scaled4bit(64, 32, device="cpu")
    assert not fused_forward_ok(layer)


def test_merge_into_a_bnb_subclass_with_its_own_forward_is_refused_and_changes_nothing():
    class Scaled4bit(bnb.nn.Linear4bit):
        def forward(self, x):
            return 2 * super().forward(x)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            lin = nn.Linear(64, 32)
            layer = Scaled4bit(64, 32, device="cpu")
            layer.load_state_dict(lin.state_dict())
            self.proj = layer.to("cpu")

        def forward(self, x):
            return self.proj(x)

    fm = fastpeft.get_peft_model(Holder(), fastpeft.LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False))
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = fm(x)
        with pytest.raises(TypeError, match="Scaled4bit subclasses bitsandbytes' Linear4bit with its own forward"):
            fm.merge_and_unload()
        assert type(fm.base_model.model.proj.base_layer) is Scaled4bit
        torch.testing.assert_close(fm(x), want, atol=0, rtol=0)
