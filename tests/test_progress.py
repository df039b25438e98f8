"""Progress bars (huggingface_hub's tqdm): shown where asked for, hidden by
HF_HUB_DISABLE_PROGRESS_BARS=1, quiet by default where PEFT is quiet; load_adapters."""
import os
import subprocess
import sys

import peft
import pytest
import torch

import fastpeft

from models import fresh_copy, logits, randomize_adapters, tiny

SCRIPT = r"""
import sys, warnings
sys.path.insert(0, "tests")
warnings.simplefilter("ignore")
import torch, fastpeft
from models import tiny
what = sys.argv[1]
base, _ = tiny("llama")
if what == "merge":
    m = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    m.merge_and_unload(progressbar=True)
elif what == "merge-default":
    m = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    m.merge_and_unload()
elif what == "unload":
    m = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    m.unload(progressbar=True)
elif what == "quantize":
    fastpeft.quantize(base, bits=8, progressbar=True)
elif what == "quantize-default":
    fastpeft.quantize(base, bits=8)
elif what == "optimize":
    import peft
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fastpeft.optimize(pm, progressbar=True)
"""

BARS = {"merge": "Unloading and merging model", "unload": "Unloading model", "quantize": "Quantizing to 8-bit",
        "optimize": "Optimizing PEFT layers"}


def _stderr(what, disable):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    if disable:
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", SCRIPT, what], env=env, capture_output=True, text=True, timeout=300,
                         cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stderr


@pytest.mark.slow  # two interpreters per case
@pytest.mark.parametrize("what", sorted(BARS))
def test_bar_appears_and_disappears_with_hf_hub_disable_progress_bars(what):
    shown = _stderr(what, disable=False)
    assert BARS[what] in shown
    # it counted the layers: 4 adapter layers (q, v in 2 blocks); 14 linear layers to quantize
    assert ("14/14" if what == "quantize" else "4/4") in shown, shown[-500:]
    assert BARS[what] not in _stderr(what, disable=True)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["merge-default", "quantize-default"])
def test_quiet_by_default(what):
    err = _stderr(what, disable=False)
    assert not any(bar in err for bar in BARS.values()), err[-500:]


def test_load_adapters_from_a_peft_folder_a_list_and_a_mapping(tmp_path):
    base, inputs = tiny("llama")
    pm = peft.get_peft_model(fresh_copy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, r in (("b", 3), ("c", 5)):
        pm.add_adapter(name, peft.LoraConfig(r=r, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    randomize_adapters(pm, seed=3)
    pm.eval()
    pm.save_pretrained(str(tmp_path))  # default at the top, b and c in subfolders
    kw = inputs()
    want = {}
    for name in ("default", "b", "c"):
        pm.set_adapter(name)
        want[name] = logits(pm, kw)

    fm = fastpeft.PeftModel.from_pretrained(fresh_copy(base), str(tmp_path / "b"), adapter_name="b")
    assert fastpeft.load_adapters(fm, {"c": str(tmp_path / "c")}) == ["c"]
    assert fastpeft.load_adapters(fm, [str(tmp_path)], progressbar=False) == [os.path.basename(tmp_path)]
    for name, key in (("b", "b"), ("c", "c"), (os.path.basename(tmp_path), "default")):
        fm.set_adapter(name)
        torch.testing.assert_close(logits(fm, kw), want[key], atol=1e-5, rtol=1e-5)

    mixin = fastpeft.with_adapters(fresh_copy(base))
    assert fastpeft.load_adapters(mixin, str(tmp_path)) == ["default", "b", "c"]
    for name in ("default", "b", "c"):
        mixin.set_adapter(name)
        torch.testing.assert_close(logits(mixin, kw), want[name], atol=1e-5, rtol=1e-5)


def test_load_adapters_refuses_clashing_names_before_loading(tmp_path):
    base, _ = tiny("llama")
    pm = peft.get_peft_model(fresh_copy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path))
    fm = fastpeft.PeftModel.from_pretrained(fresh_copy(base), str(tmp_path))
    before = {k: v.clone() for k, v in fm.state_dict().items()}
    with pytest.raises(ValueError, match=r"\['default'\] already exist"):
        fastpeft.load_adapters(fm, str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no adapter_config.json"):
        fastpeft.load_adapters(fm, str(empty))
    after = fm.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture
def bars_on():
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    enable_progress_bars()
    yield
    if was_disabled:
        disable_progress_bars()


def _deep_mlp(n):
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(n)])


def test_automatic_bar_only_above_64_layers(capsys, bars_on):
    """progressbar=None (quantize, optimize, load_adapters): a bar for more than 64 items only."""
    fastpeft.quantize(_deep_mlp(64), bits=8)
    assert "Quantizing" not in capsys.readouterr().err
    fastpeft.quantize(_deep_mlp(65), bits=8)
    err = capsys.readouterr().err
    assert "Quantizing to 8-bit" in err and "65/65" in err
    fastpeft.quantize(_deep_mlp(65), bits=8, progressbar=False)
    assert "Quantizing" not in capsys.readouterr().err


def test_load_adapters_bar(tmp_path, capsys, bars_on):
    base, _ = tiny("llama")
    pm = peft.get_peft_model(fresh_copy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.add_adapter("b", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path))
    fastpeft.load_adapters(fastpeft.with_adapters(fresh_copy(base)), str(tmp_path), progressbar=True)
    err = capsys.readouterr().err
    assert "Loading adapters" in err and "2/2" in err
    fastpeft.load_adapters(fastpeft.with_adapters(fresh_copy(base)), str(tmp_path))  # 2 adapters: quiet
    assert "Loading adapters" not in capsys.readouterr().err


def test_load_adapters_rolls_back_when_one_fails(tmp_path):
    base, inputs = tiny("llama")
    pm = peft.get_peft_model(fresh_copy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path / "good"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    fm = fastpeft.with_adapters(fresh_copy(base))
    fm.load_adapter(str(tmp_path / "good"), adapter_name="kept")
    kw = inputs()
    before = logits(fm, kw)
    with pytest.raises(Exception):  # noqa: B017  (whatever the loader raises for a broken config)
        fastpeft.load_adapters(fm, {"new": str(tmp_path / "good"), "broken": str(tmp_path / "bad")})
    assert sorted(fm.peft_config) == ["kept"] and fm.active_adapters() == ["kept"]
    torch.testing.assert_close(logits(fm, kw), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="is not a local folder"):
        fastpeft.load_adapters(fm, "team/some-hub-repo")
