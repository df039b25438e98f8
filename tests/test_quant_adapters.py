"""Adapters on bitsandbytes 4-bit / 8-bit bases, through the whole model, against peft.

fastpeft computes with the exactly dequantized weight. bitsandbytes' CPU eval path does not:
on CPUs with AVX512-BF16 a 4-bit layer repacks its weight with absmax rounded to bf16 and
computes in bf16 (switched off here, as it is a property of this CPU, not of the format), and
an 8-bit layer rounds its activations to int8 (so 8-bit is compared with PEFT in train mode,
where bitsandbytes dequantizes the weight, with dropout 0).
"""
import peft
import pytest
import torch

import fastpeft

from models import fresh_copy, logits, randomize_adapters, tiny

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(autouse=True)
def _exact_bnb_cpu_path(monkeypatch):
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)


def _quantized_llama(bits, quant_type="nf4"):
    base, inputs = tiny("llama_q")
    fastpeft.quantize(base, bits=bits, quant_type=quant_type, compute_dtype=torch.float32)
    return base, inputs


@pytest.mark.parametrize("bits,quant_type", [(4, "nf4"), (4, "fp4"), (8, None)])
def test_lora_on_quantized_base_matches_peft(bits, quant_type, tmp_path):
    base, inputs = _quantized_llama(bits, quant_type or "nf4")
    kinds = {type(m).__name__ for m in base.modules()}
    assert ("Linear4bit" if bits == 4 else "Linear8bitLt") in kinds
    pristine = fresh_copy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    pm.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"]))
    randomize_adapters(pm)
    pm.train(bits == 8)  # 8-bit: bitsandbytes' exact path (see the module docstring)
    pm.save_pretrained(str(tmp_path))
    kw = inputs(batch=3, seq=5)
    names = ["b", "__base__", "default"]
    expected = logits(pm, kw)

    fm = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path))
    fm.load_adapter(str(tmp_path / "b"), "b")
    fm.train(bits == 8)  # the layers without adapter are plain bitsandbytes layers: same mode as pm
    tol = dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(logits(fm, kw), expected, **tol)
    with torch.no_grad():
        got_mixed = fm(**kw, adapter_names=names).logits
        if bits == 4:  # peft's mixed batch on bnb layers fails with grad enabled (in-place on a view)
            torch.testing.assert_close(got_mixed, pm(**kw, adapter_names=names).logits, **tol)
    # each row equals that row run alone with its adapter
    for i, name in enumerate(names):
        row = {k: v[i : i + 1] for k, v in kw.items()}
        if name == "__base__":  # fastpeft's op for a row without adapter (bitsandbytes' forward
            with torch.no_grad():  # would round 8-bit activations in eval mode)
                alone = fm(**row, adapter_names=["__base__"]).logits
        else:
            fm.set_adapter(name)
            alone = logits(fm, row)
        torch.testing.assert_close(got_mixed[i : i + 1], alone, **tol)


def test_ia3_dora_adalora_on_4bit(tmp_path):
    base, inputs = _quantized_llama(4)
    pristine = fresh_copy(base)
    kw = inputs()
    for cfg in (peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
                peft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "gate_proj"]),
                peft.AdaLoraConfig(init_r=4, target_r=2, target_modules=["v_proj", "up_proj"], total_step=10)):
        pm = peft.get_peft_model(fresh_copy(pristine), cfg)
        randomize_adapters(pm)
        pm.eval()
        d = tmp_path / type(cfg).__name__
        pm.save_pretrained(str(d))
        fm = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(d))
        torch.testing.assert_close(logits(fm, kw), logits(pm, kw), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_and_unload_on_quantized_base_matches_peft(bits, tmp_path):
    """Dequantize, merge, requantize: the rounding is PEFT's too, so the merged models agree."""
    base, inputs = _quantized_llama(bits)
    pristine = fresh_copy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    randomize_adapters(pm, scale=0.05)
    pm.train(bits == 8)
    pm.save_pretrained(str(tmp_path))
    kw = inputs()
    fm = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path))
    unmerged = logits(fm, kw)
    with pytest.warns(UserWarning, match="(?i)quantiz"):
        merged = fm.merge_and_unload()
    assert any(type(m).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt") for m in merged.modules())
    peft_merged = pm.merge_and_unload()
    merged.train(bits == 8)  # both merged models are plain bitsandbytes layers now: same mode
    got, expected = logits(merged, kw), logits(peft_merged, kw)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
    assert not torch.equal(got, unmerged)  # requantization rounds: close to, not equal to, unmerged
