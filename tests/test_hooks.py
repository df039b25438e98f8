"""Hooks on a layer's base module run as in PEFT (PEFT calls ``base_layer(x)``): forward hooks
and pre-hooks, hooks added after the fast path made its plan, global module hooks, and
accelerate's hooks (``cpu_offload`` / ``disk_offload``: weights on the meta device until the
hook loads them), with PEFT's outputs."""
from __future__ import annotations

import peft
import pytest
import torch

import fastpeft

from models import fresh_copy, logits, randomize_adapters, tiny

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture()
def pair():
    base, inputs = tiny("llama")
    pm = peft.get_peft_model(fresh_copy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_adapters(pm)
    pm.eval()
    fm = fastpeft.PeftModel(fresh_copy(base), fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    fm.load_state_dict(pm.state_dict(), strict=False)
    fm.eval()
    return pm, fm, inputs()


def _q(model):
    return model.get_base_model().model.layers[0].self_attn.q_proj


def _hook_both(pm, fm, calls):
    for name, model in (("peft", pm), ("fastpeft", fm)):
        base = _q(model).base_layer
        base.register_forward_pre_hook(lambda m, args, name=name: calls.append(("pre", name)))
        base.register_forward_hook(lambda m, args, out, name=name: (calls.append(("post", name)), out * 1.5)[1])


def test_hooks_on_the_base_layer_run_as_in_peft(pair):
    pm, fm, kw = pair
    with torch.no_grad():
        logits(fm, kw)
        logits(fm, kw)  # the fast path has its plans now
    assert _q(fm).bank.plan is not None
    calls = []
    _hook_both(pm, fm, calls)
    expected = logits(pm, kw)
    got = logits(fm, kw)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert [c for c in calls if c[1] == "fastpeft"] == [("pre", "fastpeft"), ("post", "fastpeft")]
    assert calls.count(("pre", "peft")) == 1 and calls.count(("post", "peft")) == 1
    with fastpeft.mixed_batch(fm, ["default", "__base__"]):  # mixed batches too
        got = logits(fm, kw)
    torch.testing.assert_close(got, pm(**kw, adapter_names=["default", "__base__"]).logits, atol=1e-5, rtol=1e-5)


def test_global_module_hooks_see_the_base_layer(pair):
    pm, fm, kw = pair
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(m) if m is _q(fm).base_layer else None)
    try:
        logits(fm, kw)
    finally:
        handle.remove()
    assert seen == [_q(fm).base_layer]


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "dispatch_model"])
def test_accelerate_offloaded_weights_give_peft_outputs(pair, how, tmp_path):
    import accelerate

    pm, fm, kw = pair
    expected = logits(pm, kw)
    model = fm.get_base_model()
    if how == "cpu_offload":
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    elif how == "disk_offload":
        accelerate.disk_offload(model, offload_dir=str(tmp_path / "off"), execution_device=torch.device("cpu"))
    else:  # the decoder layers on disk, the rest in memory (a device_map as from_pretrained makes)
        top = {n: "cpu" for n, _ in model.model.named_children() if n != "layers"}
        device_map = {f"model.{n}": d for n, d in top.items()} | {"model.layers": "disk", "lm_head": "cpu"}
        accelerate.dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path / "off"))
    assert _q(fm).base_layer.weight.device.type == "meta"
    torch.testing.assert_close(logits(fm, kw), expected, atol=1e-5, rtol=1e-5)
    with fastpeft.mixed_batch(fm, ["__base__", "default"]):
        got = logits(fm, kw)
    torch.testing.assert_close(got, pm(**kw, adapter_names=["__base__", "default"]).logits, atol=1e-5, rtol=1e-5)
