"""fastpeft.config: fields, validation, and JSON round trips with the real PEFT library."""

import dataclasses
import enum
import json
import os

import pytest

peft = pytest.importorskip("peft")

from fastpeft.config import (  # noqa: E402
    CONFIG_NAME,
    AdaLoraConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftType,
    TaskType,
    UnsupportedConfigError,
)
from fastpeft.hub import AdapterFormatError, AdapterNotFoundError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PAIRS = [(LoraConfig, peft.LoraConfig), (IA3Config, peft.IA3Config), (AdaLoraConfig, peft.AdaLoraConfig)]


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


def _defaults(cls, **required):
    """Field name -> default value of a config class, as JSON-ready plain values."""
    cfg = cls(**required)
    return json.loads(json.dumps(cfg.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_same_fields_and_defaults_as_peft(ours, theirs):
    required = {"total_step": 10} if ours is AdaLoraConfig else {}
    mine = _defaults(ours, **required)
    ref = _defaults(theirs, **required)
    ref.pop("peft_version")  # PEFT fills in its own version; ours keeps what the file says
    mine.pop("peft_version")
    assert mine == ref


def test_enums():
    assert [t.value for t in TaskType] == [t.value for t in peft.TaskType]
    assert {p.value for p in PeftType} == {"LORA", "IA3", "ADALORA"}
    assert TaskType.CAUSAL_LM == "CAUSAL_LM" == peft.TaskType.CAUSAL_LM
    assert LoraConfig(task_type="SEQ_CLS").task_type is TaskType.SEQ_CLS
    assert LoraConfig().peft_type is PeftType.LORA


def test_target_modules_normalisation():
    assert LoraConfig(target_modules=["q", "v", "q"]).target_modules == {"q", "v"}
    assert LoraConfig(target_modules=".*q").target_modules == ".*q"
    assert LoraConfig(target_modules="all-linear").target_modules == "all-linear"
    assert LoraConfig(exclude_modules=["a"]).exclude_modules == {"a"}
    assert IA3Config(target_modules=["a", "b"], feedforward_modules=["b"]).feedforward_modules == {"b"}
    with pytest.raises(TypeError, match="target_modules"):
        LoraConfig(target_modules=[1, 2])
    with pytest.raises(TypeError, match="target_modules"):
        LoraConfig(target_modules=5)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(r=0), ValueError, r"`r`.*positive integer.*0"),
    (dict(r=-3), ValueError, r"`r`.*-3"),
    (dict(r=2.5), ValueError, r"`r`.*2\.5"),
    (dict(r=True), ValueError, r"`r`"),
    (dict(r="8"), ValueError, r"`r`.*'8'"),
    (dict(lora_alpha="16"), TypeError, r"`lora_alpha`.*'16'"),
    (dict(lora_alpha=None), TypeError, r"`lora_alpha`"),
    (dict(lora_dropout=1.0), ValueError, r"`lora_dropout`.*\[0, 1\).*1\.0"),
    (dict(lora_dropout=-0.1), ValueError, r"`lora_dropout`"),
    (dict(bias="some"), ValueError, r"`bias`.*'none', 'all', 'lora_only'.*'some'"),
    (dict(task_type="CLASSIFY"), ValueError, r"task_type.*CLASSIFY"),
    (dict(use_dora="yes"), TypeError, r"`use_dora`"),
    (dict(inference_mode=1), TypeError, r"`inference_mode`"),
    (dict(target_modules=".*q", layers_to_transform=[0]), ValueError, "layers_to_transform"),
    (dict(target_modules=".*q", layers_pattern="layers"), ValueError, "layers_pattern"),
    (dict(target_modules="all-linear", layers_to_transform=1), ValueError, "layers_to_transform"),
    (dict(target_modules=["q"], layers_pattern="layers"), ValueError, "layers_to_transform"),
    (dict(layers_to_transform=["0"]), TypeError, "layers_to_transform"),
    (dict(lora_bias=True, use_dora=True), ValueError, "DoRA"),
    (dict(lora_bias=True, init_lora_weights="gaussian"), ValueError, "init_lora_weights"),
    (dict(use_dora=True, megatron_config={"a": 1}), ValueError, "megatron"),
    (dict(init_lora_weights="loftq"), ValueError, "loftq_config"),
    (dict(rank_pattern={"q": 0}), ValueError, r"rank_pattern\['q'\]"),
    (dict(alpha_pattern={"q": "x"}), TypeError, r"alpha_pattern\['q'\]"),
    (dict(rank_pattern=["q"]), TypeError, "rank_pattern"),
    (dict(modules_to_save="classifier"), TypeError, "modules_to_save"),
    (dict(target_parameters="w"), TypeError, "target_parameters"),
])
def test_lora_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(**kwargs)


def test_validation_rules_also_raise_in_peft():
    """Where PEFT's config validates, it rejects the same values (ours adds checks PEFT only does
    later, when building layers)."""
    for kwargs in [dict(target_modules=".*q", layers_to_transform=[0]), dict(lora_bias=True, use_dora=True),
                   dict(target_modules=["q"], layers_pattern="layers"), dict(task_type="CLASSIFY")]:
        with pytest.raises(ValueError):
            peft.LoraConfig(**kwargs)
        with pytest.raises(ValueError):
            LoraConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "total_step"),
    (dict(total_step=0), "total_step"),
    (dict(total_step=10, init_r=0), "init_r"),
    (dict(total_step=10, target_r=-1), "target_r"),
    (dict(total_step=10, orth_reg_weight=-0.1), "orth_reg_weight"),
    (dict(total_step=10, tinit=5, tfinal=5), "budgeting phase"),
    (dict(total_step=10, use_dora=True), "DoRA"),
    (dict(total_step=10, init_lora_weights="loftq", loftq_config={"loftq_bits": 4}), "LoftQ"),
    (dict(total_step=10, rank_pattern={"m.lora_E": 3}), "rank_pattern"),
])
def test_adalora_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AdaLoraConfig(**kwargs)


def test_adalora_r_is_ignored_with_warning():
    with pytest.warns(UserWarning, match="init_r"):
        cfg = AdaLoraConfig(total_step=10, r=4)
    assert cfg.peft_type is PeftType.ADALORA and cfg.r == 4 and cfg.rank_pattern is None


def test_loftq_config_is_dropped_when_not_used():
    with pytest.warns(UserWarning, match="loftq_config"):
        cfg = LoraConfig(loftq_config={"loftq_bits": 4})
    assert cfg.loftq_config == {}
    # LoftQ itself rewrites the base weights, which fastpeft does not implement (tests/test_config_fields.py)
    with pytest.raises(UnsupportedConfigError, match="init_lora_weights"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})


def test_save_is_sorted_json_with_lists(tmp_path):
    cfg = LoraConfig(target_modules=["v", "q"], r=4, lora_alpha=8.5, task_type="CAUSAL_LM",
                     rank_pattern={"q": 2}, layers_to_transform=[1, 0])
    cfg.save_pretrained(tmp_path)
    text = (tmp_path / CONFIG_NAME).read_text()
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert data["target_modules"] == ["q", "v"] and data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert "runtime_config" not in data
    assert os.listdir(tmp_path) == [CONFIG_NAME], "no temp file left behind"
    assert PeftConfig.from_pretrained(str(tmp_path)) == cfg


def test_save_pretrained_rejects_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        LoraConfig().save_pretrained(tmp_path / "f")


def test_save_is_atomic(tmp_path, monkeypatch):
    LoraConfig(r=4).save_pretrained(tmp_path)
    before = (tmp_path / CONFIG_NAME).read_text()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        LoraConfig(r=16).save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).read_text() == before
    assert os.listdir(tmp_path) == [CONFIG_NAME]


PEFT_CONFIGS = [
    lambda: peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=32, lora_dropout=0.1,
                            bias="lora_only", lora_bias=True, use_rslora=True, task_type="CAUSAL_LM",
                            modules_to_save=["lm_head"], rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3},
                            base_model_name_or_path="m", revision="r1", layers_to_transform=[0, 1],
                            layers_pattern="layers"),
    lambda: peft.LoraConfig(target_modules=r".*\.q_proj", use_dora=True, init_lora_weights="gaussian",
                            exclude_modules=["a"], fan_in_fan_out=True),
    # (fields fastpeft refuses, e.g. trainable_token_indices or target_parameters: tests/test_config_fields.py)
    lambda: peft.LoraConfig(target_modules="all-linear", init_lora_weights="eva",
                            eva_config=peft.EvaConfig(rho=1.5)),
    lambda: peft.LoraConfig(target_modules=["q"], use_qalora=True, qalora_group_size=8, task_type="CAUSAL_LM",
                            megatron_config={"x": 1}, megatron_core="megatron.core.other"),
    lambda: peft.IA3Config(target_modules=["k", "wo"], feedforward_modules=["wo"], modules_to_save=["c"],
                           task_type="SEQ_2_SEQ_LM", init_ia3_weights=False),
    lambda: peft.AdaLoraConfig(target_modules=["q"], init_r=6, target_r=2, total_step=100, tinit=5, tfinal=10,
                               deltaT=2, beta1=0.8, beta2=0.9, orth_reg_weight=0.2,
                               rank_pattern={"m.q.lora_E": [True, False, True, True, True, False]}),
]


@pytest.mark.parametrize("make", PEFT_CONFIGS)
def test_peft_file_loads_here_and_back(tmp_path, make):
    ref = make()
    ref.save_pretrained(tmp_path / "peft")
    ours = PeftConfig.from_pretrained(str(tmp_path / "peft"))
    assert ours.peft_type.value == ref.peft_type.value
    assert type(ours).__name__ == type(ref).__name__

    peft_json = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    ours.save_pretrained(tmp_path / "ours")
    our_json = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    for key in ("target_modules", "exclude_modules", "feedforward_modules"):
        for data in (peft_json, our_json):
            if isinstance(data.get(key), list):
                data[key] = sorted(data[key])
    assert our_json == peft_json, "the same JSON as PEFT writes"

    back = peft.PeftConfig.from_pretrained(str(tmp_path / "ours"))
    assert type(back) is type(ref)
    assert back.to_dict() == peft.PeftConfig.from_pretrained(str(tmp_path / "peft")).to_dict()


@pytest.mark.parametrize("cls", [LoraConfig, IA3Config, AdaLoraConfig])
def test_our_file_loads_in_peft(tmp_path, cls):
    kwargs = {"total_step": 50, "init_r": 4, "target_modules": ["q"]} if cls is AdaLoraConfig else {"target_modules": ["q", "k"]}
    ours = cls(task_type="CAUSAL_LM", **kwargs)
    ours.save_pretrained(tmp_path)
    ref = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert type(ref).__name__ == cls.__name__
    mine = ours.to_dict()
    theirs = ref.to_dict()
    theirs.pop("runtime_config", None)
    mine.pop("peft_version"), theirs.pop("peft_version")
    assert {k: _plain(v) for k, v in mine.items()} == {k: _plain(v) for k, v in theirs.items()}
    # to_dict() itself is accepted by PEFT's constructors
    assert peft.PeftConfig.from_peft_type(**ours.to_dict()).to_dict()["target_modules"] == ours.target_modules


def test_from_dict_dispatches_and_warns_on_unknown_keys():
    with pytest.warns(UserWarning, match=r"\['from_the_future', 'z'\]"):
        cfg = PeftConfig.from_dict({"peft_type": "IA3", "target_modules": ["a"], "from_the_future": 1, "z": 2})
    assert isinstance(cfg, IA3Config) and cfg.target_modules == {"a"}
    assert isinstance(LoraConfig.from_dict({"r": 4}), LoraConfig)
    assert isinstance(LoraConfig.from_dict({"peft_type": "ADALORA", "total_step": 3}), AdaLoraConfig)
    with pytest.raises(ValueError, match="peft_type"):
        PeftConfig.from_dict({"r": 4})
    with pytest.raises(ValueError, match="'PREFIX_TUNING'.*LORA"):
        PeftConfig.from_dict({"peft_type": "PREFIX_TUNING"})


def test_runtime_config_in_file_is_dropped(tmp_path):
    data = LoraConfig(r=4).to_dict()
    data["runtime_config"] = {"ephemeral_gpu_offload": True}
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="runtime_config"):
        assert "runtime_config" not in PeftConfig.from_json_file(str(path))


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / CONFIG_NAME
    path.write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json.*not a valid JSON"):
        PeftConfig.from_pretrained(str(tmp_path))
    path.write_text("[1, 2]")
    with pytest.raises(AdapterFormatError, match="JSON object"):
        PeftConfig.from_pretrained(str(tmp_path))
    path.write_text(json.dumps({"peft_type": "BOGUS"}))
    with pytest.raises(ValueError, match=r"adapter_config.json.*'BOGUS'"):
        PeftConfig.from_pretrained(str(tmp_path))
    path.write_text(json.dumps({"peft_type": "LORA", "r": 0}))
    with pytest.raises(ValueError, match=r"adapter_config.json.*`r`"):
        PeftConfig.from_pretrained(str(tmp_path))
    path.write_text(json.dumps({"r": 4}))
    with pytest.raises(ValueError, match="peft_type"):
        PeftConfig.from_pretrained(str(tmp_path))
    assert LoraConfig.from_pretrained(str(tmp_path)).r == 4
    with pytest.raises(AdapterNotFoundError, match="adapter_config.json"):
        PeftConfig.from_pretrained(str(tmp_path), subfolder="sub")


def test_from_pretrained_kwargs_fill_missing_fields(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    cfg = PeftConfig.from_pretrained(str(tmp_path), lora_alpha=32, r=99, cache_dir=None, unrelated=1)
    assert (cfg.r, cfg.lora_alpha) == (4, 32)


def test_to_dict_is_a_copy_and_dataclass_fields_are_complete():
    cfg = LoraConfig(target_modules=["q"], rank_pattern={"q": 2})
    d = cfg.to_dict()
    d["rank_pattern"]["q"] = 5
    assert cfg.rank_pattern == {"q": 2}
    names = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert names == {f.name for f in dataclasses.fields(LoraConfig)}
