"""fastpeft.targeting against the real PEFT library on tiny random Transformers models."""

import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils.other import ModulesToSaveWrapper  # noqa: E402

from fastpeft import config as fc  # noqa: E402
from fastpeft.targeting import (  # noqa: E402
    NoMatchingModuleError,
    adalora_ranks,
    default_feedforward_modules,
    default_target_modules,
    find_modules_to_save,
    find_target_modules,
    get_rank_and_alpha,
    is_feedforward,
    is_target,
    prepare_config,
    with_task_defaults,
)

pytestmark = pytest.mark.filterwarnings("ignore")


def _seeded(build):
    def make():
        torch.manual_seed(0)
        return build()

    return make


@_seeded
def llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg)


@_seeded
def llama3():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg)


@_seeded
def opt():
    cfg = transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=100, word_embed_proj_dim=32, max_position_embeddings=64)
    return transformers.OPTForCausalLM(cfg)


@_seeded
def gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


def _roberta_cfg():
    return transformers.RobertaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=100, max_position_embeddings=64,
                                      num_labels=3)


@_seeded
def roberta_tok():
    return transformers.RobertaForTokenClassification(_roberta_cfg())


@_seeded
def roberta_seq():
    return transformers.RobertaForSequenceClassification(_roberta_cfg())


@_seeded
def t5():
    cfg = transformers.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=100)
    return transformers.T5ForConditionalGeneration(cfg)


def _ours(peft_config):
    """The fastpeft config with the same fields as a PEFT config."""
    return fc.PeftConfig.from_dict(peft_config.to_dict())


def _peft_result(make_model, peft_config, use_get_peft_model=False):
    """Module paths PEFT adapted (relative to the inner model) and the PEFT layers by path."""
    model = make_model()
    if use_get_peft_model:
        model = peft.get_peft_model(model, peft_config).base_model.model
    else:
        model = peft.inject_adapter_in_model(peft_config, model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    wrappers = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    return layers, wrappers


LORA_CASES = [
    (llama, dict(target_modules=["q_proj", "v_proj"])),
    (llama, dict(target_modules=["self_attn.q_proj", "mlp.down_proj"])),
    (llama, dict(target_modules=r".*\.layers\.1\..*(q|k)_proj")),
    (llama, dict(target_modules="all-linear")),
    (llama, dict(target_modules="ALL-LINEAR")),
    (llama, dict(target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"])),
    (llama, dict(target_modules=["q_proj", "k_proj", "v_proj"], exclude_modules=r".*layers\.0\.self_attn\.k_proj")),
    (llama3, dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2], layers_pattern="layers")),
    (llama3, dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1)),
    (llama3, dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern=["blocks", "layers"])),
    (llama3, dict(target_modules=["q_proj", "model.layers.0.self_attn.v_proj"], layers_to_transform=[2])),
    (llama, dict(target_modules="all-linear", exclude_modules=r".*\.mlp\..*")),
    (llama, dict(target_modules=["q_proj", "v_proj", "up_proj"],
                 rank_pattern={"q_proj": 4, r"layers\.1\.self_attn\.v_proj": 2, "proj": 3},
                 alpha_pattern={r"model\.layers\.0\.self_attn\.q_proj": 32, "up_proj": 5.5})),
    (llama, dict(target_modules=None)),
    (llama, dict(target_modules=["q_proj", "lm_head", "embed_tokens"], modules_to_save=["lm_head"])),
    (opt, dict(target_modules="all-linear")),
    (opt, dict(target_modules=["fc1", "out_proj"])),
    (opt, dict(target_modules=None)),
    (gpt2, dict(target_modules="all-linear")),
    (gpt2, dict(target_modules=None)),
    (t5, dict(target_modules=["q", "v"])),
    (t5, dict(target_modules="all-linear")),
    (t5, dict(target_modules=r".*decoder.*(SelfAttention|EncDecAttention)\.(q|v)")),
    (t5, dict(target_modules=None)),
    (roberta_tok, dict(target_modules=["query", "value"], layers_to_transform=[1])),
]


@pytest.mark.parametrize("make_model,kwargs", LORA_CASES)
def test_lora_targets_ranks_and_alphas_match_peft(make_model, kwargs):
    peft_config = peft.LoraConfig(**kwargs)
    ours = _ours(peft.LoraConfig(**kwargs))
    layers, wrappers = _peft_result(make_model, peft_config)

    found = find_target_modules(make_model(), ours)
    assert found == list(layers), "same modules, in model order"
    for path, layer in layers.items():
        assert get_rank_and_alpha(path, ours) == (layer.r["default"], layer.lora_alpha["default"])
    assert find_modules_to_save(make_model(), ours) == wrappers


def test_rank_and_alpha_patterns_give_distinct_values():
    ours = fc.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"],
                         rank_pattern={"q_proj": 4, r"layers\.1\.self_attn\.q_proj": 2},
                         alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3})
    # the first matching key in dict order wins, so "q_proj" shadows the more specific key
    assert get_rank_and_alpha("model.layers.1.self_attn.q_proj", ours) == (4, 3)
    assert get_rank_and_alpha("model.layers.0.self_attn.q_proj", ours) == (4, 16)
    assert get_rank_and_alpha("model.layers.0.self_attn.k_proj", ours) == (8, 16)
    # a key must match whole dotted components at the end
    assert get_rank_and_alpha("model.layers.0.self_attn.xq_proj", ours) == (8, 16)


@pytest.mark.parametrize("make_model,kwargs", [
    (roberta_seq, dict(target_modules="all-linear", task_type="SEQ_CLS")),
    (roberta_seq, dict(target_modules=["dense"], task_type="SEQ_CLS")),
    (roberta_tok, dict(target_modules=["query", "value"], task_type="TOKEN_CLS")),
])
def test_task_heads_like_get_peft_model(make_model, kwargs):
    layers, wrappers = _peft_result(make_model, peft.LoraConfig(**kwargs), use_get_peft_model=True)
    ours = with_task_defaults(fc.LoraConfig(**kwargs), before_injection=True)
    assert find_target_modules(make_model(), ours) == list(layers)
    full = with_task_defaults(fc.LoraConfig(**kwargs))
    assert full.modules_to_save == ["classifier", "score"]
    assert find_modules_to_save(make_model(), full) == wrappers == ["classifier"]


def test_task_defaults_stages():
    seq = fc.LoraConfig(target_modules=["q"], task_type="SEQ_CLS", modules_to_save=["extra"])
    assert with_task_defaults(seq, before_injection=True).modules_to_save == ["extra", "classifier", "score"]
    assert seq.modules_to_save == ["extra"], "the input config is not changed"
    tok = fc.LoraConfig(target_modules=["q"], task_type="TOKEN_CLS")
    assert with_task_defaults(tok, before_injection=True).modules_to_save is None
    qa = fc.IA3Config(target_modules=["q"], task_type="QUESTION_ANS")
    assert with_task_defaults(qa).modules_to_save == ["qa_outputs"]
    assert with_task_defaults(fc.LoraConfig(target_modules=["q"])).modules_to_save is None


def test_all_linear_seq_cls_excludes_score_head_without_modules_to_save():
    make = _seeded(lambda: transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, num_labels=2, pad_token_id=0)))
    kwargs = dict(target_modules="all-linear", task_type="SEQ_CLS")
    layers, _ = _peft_result(make, peft.LoraConfig(**kwargs))
    found = find_target_modules(make(), fc.LoraConfig(**kwargs))
    assert found == list(layers) and "score" not in found
    # without SEQ_CLS the head is a plain linear layer and is targeted
    assert "score" in find_target_modules(make(), fc.LoraConfig(target_modules="all-linear"))


def test_many_full_paths_are_condensed_like_peft():
    # 21 full paths: PEFT condenses them to suffixes (>= 20 entries), after which layers_to_transform
    # applies; with fewer entries the exact-path rule would skip the layer check.
    names = [n for n, m in llama3().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(names) == 21
    kwargs = dict(target_modules=names, layers_to_transform=[1])
    layers, _ = _peft_result(llama3, peft.LoraConfig(**kwargs))
    ours = fc.LoraConfig(**kwargs)
    assert prepare_config(ours, llama3()).target_modules == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    found = find_target_modules(llama3(), ours)
    assert found == list(layers) and len(found) == 7 and all(".layers.1." in n for n in found)
    few = fc.LoraConfig(target_modules=names[:19], layers_to_transform=[1])
    assert find_target_modules(llama3(), few) == names[:19]


def test_lora_on_a_model_that_already_has_an_adapter():
    model = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["q_proj"]), llama())
    second = peft.LoraConfig(target_modules="all-linear")
    expected = [n for n, m in peft.inject_adapter_in_model(second, model, adapter_name="b").named_modules()
                if isinstance(m, BaseTunerLayer)]
    fresh = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["q_proj"]), llama())
    found = find_target_modules(fresh, fc.LoraConfig(target_modules="all-linear"))
    assert found == expected
    assert not any("lora_" in n or "base_layer" in n for n in found)


@pytest.mark.parametrize("make_model,kwargs", [
    (llama, dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
    (llama, dict(target_modules=None, feedforward_modules=None)),
    (t5, dict(target_modules=None, feedforward_modules=None)),
    (t5, dict(target_modules=r".*\.(k|wo)", feedforward_modules=r".*\.wo")),
    (gpt2, dict(target_modules=None, feedforward_modules=None)),
    (roberta_tok, dict(target_modules=None, feedforward_modules=None)),
])
def test_ia3_targets_and_feedforward_match_peft(make_model, kwargs):
    layers, _ = _peft_result(make_model, peft.IA3Config(**kwargs))
    ours = fc.IA3Config(**kwargs)
    model = make_model()
    assert find_target_modules(model, ours) == list(layers)
    prepared = prepare_config(ours, model)
    for path, layer in layers.items():
        assert is_feedforward(path, prepared) == layer.is_feedforward, path


def test_ia3_feedforward_must_be_subset():
    with pytest.raises(ValueError, match="subset"):
        peft.IA3Config(target_modules=["k"], feedforward_modules=["wo"])
    with pytest.raises(ValueError, match="subset.*wo"):
        fc.IA3Config(target_modules=["k"], feedforward_modules=["wo"])


@pytest.mark.parametrize("make_model,kwargs", [
    (llama, dict(target_modules=["q_proj", "v_proj"], init_r=6, lora_alpha=12)),
    (t5, dict(target_modules=None)),
    (opt, dict(target_modules=None)),
])
def test_adalora_targets_and_ranks_match_peft(make_model, kwargs):
    peft_config = peft.AdaLoraConfig(total_step=10, **kwargs)
    layers, _ = _peft_result(make_model, peft_config, use_get_peft_model=True)
    ours = fc.AdaLoraConfig(total_step=10, **kwargs)
    assert find_target_modules(make_model(), ours) == list(layers)
    for path, layer in layers.items():
        assert get_rank_and_alpha(path, ours) == (layer.r["default"], layer.lora_alpha["default"])


def test_adalora_ranks_from_rank_pattern():
    cfg = fc.AdaLoraConfig(total_step=10, init_r=4, rank_pattern={
        "model.layers.0.self_attn.q_proj.lora_E": [True, False, True, True],
        "model.layers.1.self_attn.q_proj.lora_E.default": [False] * 4,
    })
    assert adalora_ranks(cfg) == {"model.layers.0.self_attn.q_proj": 3, "model.layers.1.self_attn.q_proj": 0}


def test_default_target_modules_table_matches_peft():
    from peft.utils import constants

    tables = {
        "LORA": constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
        "ADALORA": constants.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
        "IA3": constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    }
    for model_type in ["llama", "mistral", "opt", "gpt2", "roberta", "bert", "t5", "bart", "gpt_neox",
                       "falcon", "qwen2", "gemma", "phi"]:
        for peft_type, table in tables.items():
            assert default_target_modules(peft_type, model_type) == table.get(model_type), (peft_type, model_type)
        assert default_feedforward_modules(model_type) == \
            constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
    assert default_target_modules(fc.PeftType.LORA, "no-such-model") is None


def test_no_default_for_unknown_model_type():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="target_modules"):
        find_target_modules(model, fc.LoraConfig())


def test_nothing_matched_raises_with_names():
    with pytest.raises(ValueError):
        peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["nope"]), llama())
    with pytest.raises(NoMatchingModuleError, match=r"nope.*model\.layers"):
        find_target_modules(llama(), fc.LoraConfig(target_modules=["nope"]))
    with pytest.raises(NoMatchingModuleError, match="layers_to_transform=\\[7\\]"):
        find_target_modules(llama(), fc.LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    with pytest.raises(NoMatchingModuleError, match="exclude"):
        find_target_modules(llama(), fc.LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))


def test_exclude_modules_unused_warns():
    with pytest.warns(UserWarning, match="exclude_modules"):
        find_target_modules(llama(), fc.LoraConfig(target_modules=["q_proj"], exclude_modules=["nothing"]))


def test_is_target_single_modules():
    cfg = fc.LoraConfig(target_modules=["q_proj"], exclude_modules=["layers.1.self_attn.q_proj"])
    assert is_target("model.layers.0.self_attn.q_proj", None, cfg)
    assert not is_target("model.layers.1.self_attn.q_proj", None, cfg)
    assert not is_target("model.layers.0.self_attn.xq_proj", None, cfg)
    regex = fc.LoraConfig(target_modules=r".*q_proj")
    assert is_target("a.q_proj", None, regex) and not is_target("a.q_proj.b", None, regex)
    linear = fc.LoraConfig(target_modules="all-linear")
    assert is_target("x", torch.nn.Linear(2, 2), linear)
    assert not is_target("x", torch.nn.LayerNorm(2), linear)
    model = llama()
    assert not is_target("lm_head", model.lm_head, linear, model=model)
    assert is_target("model.layers.0.mlp.up_proj", None, fc.LoraConfig(), model=model) is False
    assert is_target("model.layers.0.self_attn.v_proj", None, fc.LoraConfig(), model=model)


def test_modules_to_save_is_plain_suffix_match():
    model = torch.nn.ModuleDict({"my_classifier": torch.nn.Linear(2, 2), "classifier": torch.nn.Linear(2, 2),
                                 "body": torch.nn.Linear(2, 2)})
    cfg = fc.LoraConfig(target_modules=["body"], modules_to_save=["classifier"])
    assert find_modules_to_save(model, cfg) == ["my_classifier", "classifier"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["body"]), model)
    peft.utils.other._set_trainable(peft_model, "default", ["classifier"], inference_mode=False)
    assert [n for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)] == \
        ["my_classifier", "classifier"]


@pytest.mark.parametrize("make_model,config", [
    (llama, lambda: peft.LoraConfig(target_modules="all-linear", rank_pattern={"v_proj": 2})),
    (t5, lambda: peft.IA3Config()),
    (opt, lambda: peft.AdaLoraConfig(total_step=5)),
])
def test_functions_accept_peft_config_objects(make_model, config):
    layers, _ = _peft_result(make_model, config(), use_get_peft_model=True)
    assert find_target_modules(make_model(), config()) == list(layers)
    if not isinstance(config(), peft.IA3Config):
        for path, layer in layers.items():
            assert get_rank_and_alpha(path, config()) == (layer.r["default"], layer.lora_alpha["default"])
