"""Adapters on models that accelerate placed (``from_pretrained(device_map=...)`` with layers
offloaded to CPU memory or disk, ``dispatch_model``): each adapter lives on its base layer's
execution device (an offloaded base's weights are on the meta device between calls), and the
outputs equal peft's on the same weights. With several GPUs the same placement runs across them.
(peft itself fails on a CPU-only machine once a layer is on disk: its load re-dispatches with
``model.to``; so the reference here is peft on the unplaced model.)"""
import peft
import pytest
import torch
import transformers as tf

import fastpeft

from models import logits, randomize_adapters, tiny

CONFIGS = {
    "lora": lambda lib: lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "ia3": lambda lib: lib.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "adalora": lambda lib: lib.AdaLoraConfig(target_modules=["q_proj"], total_step=10, init_r=4),
}
DISK_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("placed")
    base, inputs = tiny("llama")
    base.save_pretrained(folder / "base")
    for name, make in CONFIGS.items():
        pm = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(folder / "base"), make(peft))
        randomize_adapters(pm, seed=len(name))
        pm.save_pretrained(folder / name)
    return folder, inputs()


def _placed(folder, device_map=DISK_MAP):
    return tf.AutoModelForCausalLM.from_pretrained(folder / "base", device_map=device_map,
                                                   offload_folder=str(folder / "offload"))


def _reference(folder, name):
    return peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(folder / "base"), folder / name)


def _q1(model):
    return model.model.layers[1].self_attn.q_proj


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_peft_model_on_a_disk_offloaded_model_gives_peft_outputs(saved, name):
    folder, kw = saved
    model = _placed(folder)
    assert model.hf_device_map["model.layers.1"] == "disk"
    fast = fastpeft.PeftModel.from_pretrained(model, str(folder / name), device_map="auto")
    ref = _reference(folder, name)
    torch.testing.assert_close(logits(fast, kw), logits(ref, kw), rtol=0, atol=1e-5)
    layers = [m for m in model.model.layers[1].modules() if isinstance(m, fastpeft.nn.AdapterLayer)]
    assert layers
    for layer in layers:
        assert layer.base_layer.weight.device.type == "meta"  # still offloaded
        assert all(p.device.type == "cpu" for n, p in layer.named_parameters() if not n.startswith("base_layer"))


def test_mixed_batches_and_two_adapters_on_an_offloaded_model(saved):
    folder, kw = saved
    fast = fastpeft.PeftModel.from_pretrained(_placed(folder), str(folder / "lora"), adapter_name="a")
    ref = _reference(folder, "lora")
    ref.load_adapter(folder / "lora", adapter_name="b")
    fast.load_adapter(str(folder / "lora"), adapter_name="b")
    names = ["a", "__base__"]
    torch.testing.assert_close(fast(**kw, adapter_names=names).logits,
                               ref(**{**kw, "adapter_names": ["default", "__base__"]}).logits, rtol=0, atol=1e-5)
    fast.base_model.set_adapter(["a", "b"])  # the two deltas add up
    ref.base_model.set_adapter(["default", "b"])
    torch.testing.assert_close(logits(fast, kw), logits(ref, kw), rtol=0, atol=1e-5)


def test_mixin_on_an_offloaded_model(saved):
    folder, kw = saved
    model = fastpeft.with_adapters(_placed(folder))
    model.load_adapter(str(folder / "lora"), adapter_name="default", device_map="auto")
    torch.testing.assert_close(logits(model, kw), logits(_reference(folder, "lora"), kw), rtol=0, atol=1e-5)


def test_a_new_placement_and_dora_on_offloaded_weights_are_refused(saved, tmp_path):
    folder, kw = saved
    model = _placed(folder)
    with pytest.raises(NotImplementedError, match="device_map"):
        fastpeft.PeftModel.from_pretrained(model, str(folder / "lora"), device_map={"": "cpu"})
    with pytest.raises(NotImplementedError, match="max_memory"):
        fastpeft.PeftModel.from_pretrained(model, str(folder / "lora"), max_memory={"cpu": "1GB"})
    pm = peft.get_peft_model(tiny("llama")[0], peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    pm.save_pretrained(tmp_path / "dora")
    with pytest.raises(NotImplementedError, match="DoRA on a base layer whose weights accelerate offloaded"):
        fastpeft.PeftModel.from_pretrained(model, str(tmp_path / "dora"))
    assert not any("lora_" in n for n, _ in model.named_parameters())  # left as it was


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_layers_split_across_two_gpus_give_peft_outputs_in_the_same_placement(saved):
    folder, kw = saved
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1,
                  "model.rotary_emb": 1, "lm_head": 1}
    fast = fastpeft.PeftModel.from_pretrained(_placed(folder, device_map), str(folder / "lora"))
    ref = peft.PeftModel.from_pretrained(_placed(folder, device_map), folder / "lora")
    kw = {k: v.to("cuda:0") for k, v in kw.items()}
    assert _q1(fast.get_base_model()).lora_A["default"].weight.device == torch.device("cuda:1")
    torch.testing.assert_close(logits(fast, kw), logits(ref, kw), rtol=0, atol=1e-4)
    with fastpeft.mixed_batch(fast, ["default", "__base__"]):
        got = logits(fast, kw)
    torch.testing.assert_close(got, ref(**kw, adapter_names=["default", "__base__"]).logits, rtol=0, atol=1e-4)
