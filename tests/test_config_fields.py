"""Every field of PEFT's LoraConfig / IA3Config / AdaLoraConfig is classified in fastpeft's table
(fastpeft/config/_fields.py), "unsupported" ones are refused (constructor, saved file, assignment),
"implemented" ones give PEFT's outputs, "metadata" ones round-trip through save/load."""

import dataclasses
import json
import re
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

import fastpeft  # noqa: E402
from fastpeft.config import (  # noqa: E402
    CONFIG_NAME,
    FIELD_TABLES,
    AdaLoraConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    UnsupportedConfigError,
)
from fastpeft.config._fields import IMPLEMENTED, METADATA, UNSUPPORTED  # noqa: E402

from models import fresh_copy, logits, randomize_adapters, tiny  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

# peft_type -> (PEFT's class, fastpeft's class, fields every instance needs)
CLASSES = {
    "LORA": (peft.LoraConfig, LoraConfig, {"target_modules": ["q_proj"]}),
    "IA3": (peft.IA3Config, IA3Config, {"target_modules": ["q_proj"], "feedforward_modules": []}),
    "ADALORA": (peft.AdaLoraConfig, AdaLoraConfig, {"target_modules": ["q_proj"], "total_step": 10}),
}

# a value that switches each unsupported option on, and that PEFT's config accepts
UNSUPPORTED_VALUES = {
    "velora_config": {"num_groups": 8},
    "alora_invocation_tokens": [5, 6],  # (this and the other variants: refused for AdaLoRA only)
    "monteclora_config": {"num_samples": 2},
    "target_parameters": ["mlp.experts.gate_up_proj"],  # AdaLoRA only (LoRA: tests/test_target_parameters.py)
    "use_bdlora": {"nblocks": 2},
    "arrow_config": {"top_k": 2},
    "kasa_config": {"beta": 0.001},
    "ensure_weight_tying": True,
}
# a non-default value for each metadata field (runtime_config and loftq_config: see below)
METADATA_VALUES = {
    "auto_mapping": {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers"},
    "peft_version": "0.21.2",
    "megatron_config": {"num_layers": 2, "hidden_size": 32},
    "megatron_core": "megatron.core.other",
    "eva_config": {"rho": 1.5, "tau": 0.9},
    "corda_config": {"corda_method": "kpm"},
    "lora_ga_config": {"direction": "ArBr", "stable_gamma": 8},
    "use_qalora": True,
    "qalora_group_size": 8,
    # AdaLoRA
    "r": 4,
    "alpha_pattern": {"q_proj": 3},
    "use_rslora": True,
    "lora_bias": True,
    "target_r": 2,
    "tinit": 1,
    "tfinal": 2,
    "deltaT": 2,
    "beta1": 0.8,
    "beta2": 0.9,
    "total_step": 20,
    "orth_reg_weight": 0.1,
}
NOT_SAVED = {"runtime_config", "loftq_config"}


def _fields(key, status):
    return [(key, name) for name, entry in FIELD_TABLES[key].items() if entry.status == status]


def _json(value):
    return json.loads(json.dumps(value, default=list, sort_keys=True))


# --------------------------------------------------------------------------- the table is complete


@pytest.mark.parametrize("key", sorted(CLASSES))
def test_every_peft_field_is_classified(key):
    theirs, ours, _ = CLASSES[key]
    table = FIELD_TABLES[key]
    names = [f.name for f in dataclasses.fields(theirs)]
    missing = [n for n in names if n not in table]
    assert not missing, (
        f"peft.{theirs.__name__} (peft {peft.__version__}) has field(s) {missing} that fastpeft does not classify: "
        f"read what PEFT does with them and add each to the {key} table in fastpeft/config/_fields.py as "
        f"implemented, metadata or unsupported (and the field to fastpeft.{ours.__name__})"
    )
    assert not sorted(set(table) - set(names)), "the table lists fields PEFT does not have"
    assert [f.name for f in dataclasses.fields(ours)] == names, "fastpeft's config has PEFT's fields, in order"
    for name, entry in table.items():
        assert entry.status in (IMPLEMENTED, METADATA, UNSUPPORTED) and entry.reason, name
        assert (entry.is_set is not None) == (entry.status == UNSUPPORTED), name
    unsupported = {n for _, n in _fields(key, UNSUPPORTED)}
    assert unsupported <= set(UNSUPPORTED_VALUES), "give a sample value for each unsupported field"
    metadata = {n for _, n in _fields(key, METADATA)}
    assert metadata <= set(METADATA_VALUES) | NOT_SAVED, "give a sample value for each metadata field"


# --------------------------------------------------------------------------- unsupported: refused


def _assert_refused(call, name):
    with pytest.raises(UnsupportedConfigError, match=rf"`{name}`.*not supported by fastpeft"):
        call()


@pytest.mark.parametrize("key,name", _fields("LORA", UNSUPPORTED) + _fields("ADALORA", UNSUPPORTED))
def test_unsupported_field_is_refused(key, name, tmp_path):
    theirs, ours, base = CLASSES[key]
    kwargs = {**base, "task_type": "CAUSAL_LM", name: UNSUPPORTED_VALUES[name]}
    ref = theirs(**kwargs)  # PEFT accepts it
    _assert_refused(lambda: ours(**kwargs), name)

    ref.save_pretrained(tmp_path)
    _assert_refused(lambda: PeftConfig.from_pretrained(str(tmp_path)), name)
    _assert_refused(lambda: ours.from_dict(json.loads((tmp_path / CONFIG_NAME).read_text())), name)

    cfg = ours(**base)
    _assert_refused(lambda: setattr(cfg, name, UNSUPPORTED_VALUES[name]), name)
    assert cfg == ours(**base), "a refused assignment leaves the config as it was"


def test_loading_a_refused_adapter_leaves_the_model_untouched(tmp_path):
    model, _ = tiny("llama")
    peft.LoraConfig(target_modules=["q_proj"], ensure_weight_tying=True).save_pretrained(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedConfigError, match=rf"'{re.escape(str(tmp_path))}.*ensure_weight_tying"):
        fastpeft.PeftModel.from_pretrained(model, str(tmp_path))
    mixin = fastpeft.with_adapters(model)
    with pytest.raises(UnsupportedConfigError, match="ensure_weight_tying"):
        mixin.load_adapter(str(tmp_path))
    assert not getattr(model, "peft_config", None)
    assert not any(hasattr(m, "base_layer") for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _peft_lora_file(tmp_path, **fields):
    """adapter_config.json as PEFT writes it, with ``fields`` set (also values PEFT's constructor
    cannot check here, e.g. LoftQ without scipy)."""
    data = peft.LoraConfig(target_modules=["q_proj"]).to_dict()
    data.update(fields)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(_json(data)))
    return str(tmp_path)


@pytest.mark.parametrize("init", ["corda", "loftq", "no_such_init", "pissa_foo"])
def test_lora_inits_fastpeft_cannot_reproduce_are_refused(init, tmp_path):
    # ("pissa", "pissa_niter_<n>", "olora", "orthogonal" are computed as PEFT does: tests/test_init_methods.py)
    extra = {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}} if init == "loftq" else {}
    if init != "loftq":  # PEFT's LoftQ check needs scipy
        peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=init)
    match = "rewrites the base layer's weights" if init in ("corda", "loftq") else "not an initialization PEFT"
    with pytest.raises(UnsupportedConfigError, match=rf"`init_lora_weights`='{init}'.*{match}"):
        LoraConfig(target_modules=["q_proj"], init_lora_weights=init, **extra)
    with pytest.raises(UnsupportedConfigError, match=rf"init_lora_weights`='{init}'"):
        PeftConfig.from_pretrained(_peft_lora_file(tmp_path, init_lora_weights=init, **extra))
    cfg = LoraConfig(target_modules=["q_proj"])
    with pytest.raises(UnsupportedConfigError, match="init_lora_weights"):
        cfg.init_lora_weights = init
    if init != "loftq":  # (AdaLoRA refuses LoftQ, as PEFT does)
        # PEFT's AdaLoRA layers take any str as True (their only init), and so does fastpeft
        assert AdaLoraConfig(total_step=10, init_lora_weights=init).init_lora_weights == init


# --------------------------------------------------------------------------- metadata: round trip


@pytest.mark.parametrize("key,name", [kn for k in sorted(CLASSES) for kn in _fields(k, METADATA) if kn[1] not in NOT_SAVED])
def test_metadata_field_round_trips(key, name, tmp_path):
    theirs, ours, base = CLASSES[key]
    kwargs = {**base, name: METADATA_VALUES[name]}
    cfg = ours(**kwargs)
    cfg.save_pretrained(tmp_path / "ours")
    back = PeftConfig.from_pretrained(str(tmp_path / "ours"))
    assert type(back) is ours and back == cfg
    assert _json(back.to_dict()[name]) == _json(METADATA_VALUES[name])
    # PEFT reads our file as it reads its own
    theirs(**kwargs).save_pretrained(tmp_path / "peft")
    from_ours = peft.PeftConfig.from_pretrained(str(tmp_path / "ours")).to_dict()[name]
    from_peft = peft.PeftConfig.from_pretrained(str(tmp_path / "peft")).to_dict()[name]
    assert _json(dataclasses.asdict(from_ours) if dataclasses.is_dataclass(from_ours) else from_ours) == \
        _json(dataclasses.asdict(from_peft) if dataclasses.is_dataclass(from_peft) else from_peft)


def test_runtime_and_unused_loftq_config_are_not_saved_as_in_peft(tmp_path):
    cfg = LoraConfig(target_modules=["q_proj"], runtime_config={"ephemeral_gpu_offload": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="loftq_config"):
            LoraConfig(target_modules=["q_proj"], loftq_config={"loftq_bits": 4})
    assert LoraConfig(target_modules=["q_proj"], loftq_config={"loftq_bits": 4}).loftq_config == {}
    assert peft.LoraConfig(target_modules=["q_proj"], loftq_config={"loftq_bits": 4}).loftq_config == {}
    cfg.save_pretrained(tmp_path)
    assert "runtime_config" not in json.loads((tmp_path / CONFIG_NAME).read_text())


# --------------------------------------------------------------------------- implemented: PEFT's outputs

PARITY_CASES = {
    "lora-many-fields": ("llama", lambda: peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
        exclude_modules=["model.layers.1.self_attn.q_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3},
        layers_to_transform=[0, 1], layers_pattern="layers", bias="lora_only", lora_bias=True,
        modules_to_save=["lm_head"], init_lora_weights=False, task_type="CAUSAL_LM", revision="main")),
    "dora-regex-gaussian": ("llama", lambda: peft.LoraConfig(
        r=4, use_dora=True, target_modules=r".*\.(k_proj|up_proj)", init_lora_weights="gaussian")),
    "conv1d-fan-in-fan-out": ("gpt2", lambda: peft.LoraConfig(
        r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="all")),
    "lora-metadata-fields": ("llama", lambda: peft.LoraConfig(
        r=4, target_modules=["q_proj"], use_qalora=True, qalora_group_size=8, megatron_core="megatron.core.x",
        eva_config=peft.EvaConfig(rho=1.5), lora_ga_config=peft.LoraGAConfig(stable_gamma=4))),
    "init-eva": ("llama", lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="eva")),
    "init-orthogonal": ("llama", lambda: peft.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights="orthogonal")),
    "init-pissa": ("llama", lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa")),
    "init-olora": ("gpt2", lambda: peft.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights="olora")),
    "init-mica": ("llama", lambda: peft.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights="mica")),
    "init-lora-ga": ("llama", lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="lora_ga")),
    # LoRA variants (fastpeft/nn/lora_variants; aLoRA and Arrow need their call context: tests/test_lora_variants.py)
    "variant-kasa": ("llama", lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                      kasa_config=peft.KasaConfig(beta=0.01))),
    "variant-bdlora": ("llama", lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], use_bdlora=peft.BdLoraConfig(
        target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj"], nblocks=2))),
    "ia3-fields": ("gpt2", lambda: peft.IA3Config(
        target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True,
        init_ia3_weights=False, modules_to_save=["lm_head"])),
    "adalora-ignored-fields": ("llama", lambda: peft.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], total_step=20, tinit=2, tfinal=3,
        orth_reg_weight=0.2, use_rslora=True, alpha_pattern={"q_proj": 3}, init_lora_weights="olora")),
    "adalora-lora-bias": ("gpt2", lambda: peft.AdaLoraConfig(
        init_r=3, lora_alpha=4, target_modules=["c_attn"], total_step=5, lora_bias=True, r=6, beta1=0.5)),
    # the rows keep their start values here (randomize_adapters leaves them): tests/test_trainable_tokens.py
    "lora-trainable-tokens-tied": ("gpt2", lambda: peft.LoraConfig(r=4, target_modules=["c_attn"],
                                                                   trainable_token_indices=[1, 5, 7])),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_implemented_fields_give_peft_outputs(case, tmp_path):
    arch, make = PARITY_CASES[case]
    base, inputs = tiny(arch)
    pristine = fresh_copy(base)
    kw = inputs()
    pm = peft.get_peft_model(base, make())
    randomize_adapters(pm, seed=3)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    fm = fastpeft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path / "peft"))
    torch.testing.assert_close(logits(fm, kw), logits(pm, kw), atol=1e-5, rtol=1e-5)
    assert set(fm.state_dict()) == set(pm.state_dict())

    # a fresh fastpeft adapter from the same config, saved by fastpeft, gives the same outputs in PEFT
    cfg = PeftConfig.from_pretrained(str(tmp_path / "peft"))
    init = getattr(cfg, "init_lora_weights", True)
    if type(cfg).__name__ == "LoraConfig" and isinstance(init, str) and init in ("eva", "mica", "lora_ga"):
        # an initialization only PEFT has: loading its adapters is right (above), a new one is refused
        with pytest.raises(ValueError, match=f"init_lora_weights={init!r}"):
            fastpeft.get_peft_model(fresh_copy(pristine), cfg)
        return
    fm2 = fastpeft.get_peft_model(fresh_copy(pristine), cfg)
    randomize_adapters(fm2, seed=5)
    fm2.eval()
    fm2.save_pretrained(str(tmp_path / "ours"))
    pm2 = peft.PeftModel.from_pretrained(fresh_copy(pristine), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(pm2, kw), logits(fm2, kw), atol=1e-5, rtol=1e-5)
