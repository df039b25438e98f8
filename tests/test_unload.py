"""merge_and_unload / unload edge cases, against peft where peft defines the behaviour."""
import copy

import peft
import pytest
import torch
from torch import nn

import fastpeft

from models import fresh_copy, logits, randomize_adapters, tiny


def _pair(config_kwargs):
    base, inputs = tiny("llama")
    pm = peft.get_peft_model(fresh_copy(base), peft.LoraConfig(**config_kwargs))
    randomize_adapters(pm, seed=2)
    fm = fastpeft.get_peft_model(fresh_copy(base), fastpeft.LoraConfig(**config_kwargs))
    fm.load_state_dict(pm.state_dict())
    return pm.eval(), fm.eval(), inputs()


def test_merge_adapter_with_an_empty_list_merges_nothing_as_peft():
    pm, fm, kw = _pair(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in fm.state_dict().items()}
    pm.merge_adapter(adapter_names=[])
    fm.merge_adapter(adapter_names=[])
    after = fm.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(getattr(m, "merged", False) for m in fm.modules())
    assert not any(getattr(m, "merged", False) for m in pm.modules())


def test_failed_merge_leaves_every_layer_wrapped_and_unmerge_recovers():
    pm, fm, kw = _pair(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    want = logits(fm, kw)
    layer = fm.base_model.model.model.layers[1].self_attn.v_proj  # a late layer: earlier ones merge first
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="(?i)nan"):
        fm.merge_and_unload(safe_merge=True)
    wrapped = [m for m in fm.modules() if isinstance(m, fastpeft.nn.AdapterLayer)]
    assert len(wrapped) == 4  # nothing was unloaded
    fm.unmerge_adapter()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = pm.base_model.model.model.layers[1].self_attn.v_proj.lora_B[
            "default"].weight[0, 0]
    torch.testing.assert_close(logits(fm, kw), want, atol=1e-5, rtol=1e-5)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.head = nn.Sequential(nn.Linear(8, 8))

    def forward(self, x):
        return self.head(self.a(x))


def test_unload_with_adapter_layers_inside_a_modules_to_save_wrapper():
    """An adapter layer inside a module that another adapter saves whole: the inner layer is
    replaced before its wrapper (it used to fail with "'Sequential' has no attribute 'original_module'")."""
    kw = dict(init_lora_weights=False)
    pm = peft.get_peft_model(_Net(), peft.LoraConfig(r=2, target_modules=["head.0"], **kw))
    pm.add_adapter("two", peft.LoraConfig(r=2, target_modules=["a"], modules_to_save=["head"], **kw))
    fm = fastpeft.get_peft_model(_Net(), fastpeft.LoraConfig(r=2, target_modules=["head.0"], **kw))
    fm.add_adapter("two", fastpeft.LoraConfig(r=2, target_modules=["a"], modules_to_save=["head"], **kw))
    fm.load_state_dict(pm.state_dict())
    x = torch.randn(3, 8)
    for name in ("default", "two"):
        p, f = copy.deepcopy(pm).eval(), copy.deepcopy(fm).eval()
        p.set_adapter(name)
        f.set_adapter(name)
        with torch.no_grad():
            want = p(x)
            torch.testing.assert_close(f(x), want, atol=1e-5, rtol=1e-5)
            merged_p, merged_f = p.merge_and_unload(), f.merge_and_unload()
            assert not any(isinstance(m, fastpeft.nn.AdapterLayer) for m in merged_f.modules())
            torch.testing.assert_close(merged_f(x), merged_p(x), atol=1e-5, rtol=1e-5)
