"""What fastpeft does with every field of PEFT 0.21's ``LoraConfig``, ``IA3Config`` and
``AdaLoraConfig``: one table per method (``FIELD_TABLES``), which the configs' refusal logic reads.

Statuses:

- ``"implemented"``: fastpeft targets, computes and saves it with PEFT's meaning.
- ``"metadata"``: kept and saved as given, but it changes neither what fastpeft's layers compute
  nor the saved weights, and PEFT's own layers behave the same on every base layer fastpeft
  adapts (training-only, runtime-only, or read only by a PEFT tool that runs before training).
- ``"unsupported"``: fastpeft does not implement it. A config that sets it raises
  :class:`UnsupportedConfigError` naming the field: in the constructor, in ``from_dict`` /
  ``from_pretrained`` (so before any model is touched) and on attribute assignment.

``tests/test_config_fields.py`` fails when PEFT has a field that is not in these tables.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from ._variant_fields import variant_fields

IMPLEMENTED, METADATA, UNSUPPORTED = "implemented", "metadata", "unsupported"

_PEFT_HINT = ("build the adapter with PEFT (peft.get_peft_model / peft.PeftModel.from_pretrained) and call "
              "fastpeft.optimize(peft_model), which fuses the layers it supports and keeps PEFT's own layers "
              "for the rest")


class UnsupportedConfigError(ValueError):
    """A config sets an option fastpeft does not implement (the message names the field)."""


class Field(NamedTuple):
    status: str  # IMPLEMENTED, METADATA or UNSUPPORTED
    reason: str
    # UNSUPPORTED: whether a value turns the option on (PEFT's own test for it)
    is_set: Callable[[Any], bool] | None = None
    # IMPLEMENTED with refused values: a message for a refused value, else None
    check: Callable[[Any], str | None] | None = None


def _not_none(value) -> bool:
    return value is not None


def _unsupported(reason: str, is_set: Callable[[Any], bool] = bool) -> Field:
    return Field(UNSUPPORTED, reason, is_set)


# --------------------------------------------------------------------------- init_lora_weights

# PEFT 0.21's LoRA initializations (tuners/lora/layer.py ``update_layer``), by what a fastpeft
# layer does with them.
_COMPUTED_INITS = "'pissa', 'pissa_niter_<n>', 'olora', 'orthogonal'"  # fastpeft.nn.lora_init, also on load
_WEIGHTS_ONLY_INITS = ("eva", "lora_ga", "mica")  # base untouched; a trained adapter is plain LoRA
_PISSA_NITER = re.compile(r"pissa_niter_[0-9]+")


def _check_lora_init(value) -> str | None:
    if not isinstance(value, str) or value.lower() in ("gaussian", "olora", "mica") or value == "orthogonal":
        return None  # True, False (the type is checked by LoraConfig); PEFT compares these in any case but orthogonal
    if value.startswith("pissa"):  # PEFT's test: by prefix, then "pissa" or "pissa_niter_<n>"
        if value == "pissa" or _PISSA_NITER.fullmatch(value):
            return None
        return (f"`init_lora_weights`={value!r} is not an initialization PEFT 0.21 knows: init_lora_weights should "
                "be 'pissa' or 'pissa_niter_[number of iters]' (a non-negative integer).")
    if value.startswith("corda") or value == "loftq":
        plain = ("save the LoftQ-initialised base model and the adapter with init_lora_weights=True, as PEFT's "
                 "LoftQ guide does" if value == "loftq" else "save the trained adapter as plain LoRA with PEFT "
                 "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
        return (
            f"`init_lora_weights`={value!r} is not supported by fastpeft yet: PEFT rewrites the base layer's "
            "weights when it creates this adapter (also when it loads a saved one) from data (CorDA) or a "
            f"quantizer (LoftQ) that fastpeft does not have, so the outputs would differ. Either {plain}, or "
            f"{_PEFT_HINT}."
        )
    if value in _WEIGHTS_ONLY_INITS:
        return None
    return (
        f"`init_lora_weights`={value!r} is not an initialization PEFT 0.21 knows (PEFT raises \"Unknown "
        f"initialization\" when it builds the layers); use True, False, 'gaussian', {_COMPUTED_INITS}, 'eva', "
        "'mica' or 'lora_ga'."
    )


# --------------------------------------------------------------------------- the tables

# aLoRA, BD-LoRA, Arrow, KaSA (fastpeft/nn/lora_variants): entries and value checks
_VARIANTS = variant_fields(Field, IMPLEMENTED)

COMMON_FIELDS: dict[str, Field] = {
    "task_type": Field(IMPLEMENTED, "task heads join modules_to_save as in PEFT's PeftModelFor<Task>; the "
                                    "SEQ_CLS head is left out of 'all-linear'"),
    "peft_type": Field(IMPLEMENTED, "picks the config class and the adapter method"),
    "auto_mapping": Field(METADATA, "the base model class PEFT's AutoPeftModel imports for task_type=None"),
    "peft_version": Field(METADATA, "the PEFT version that wrote the file"),
    "base_model_name_or_path": Field(IMPLEMENTED, "the base model AutoPeftModelFor*.from_pretrained loads"),
    "revision": Field(IMPLEMENTED, "the base model revision AutoPeftModelFor*.from_pretrained loads"),
    "inference_mode": Field(IMPLEMENTED, "the adapter's parameters are frozen"),
}

LORA_FIELDS: dict[str, Field] = {
    **COMMON_FIELDS,
    "r": Field(IMPLEMENTED, "rank"),
    "target_modules": Field(IMPLEMENTED, "PEFT's matching rules, per-model defaults and 'all-linear' (fastpeft.targeting)"),
    "exclude_modules": Field(IMPLEMENTED, "PEFT's matching rules"),
    "lora_alpha": Field(IMPLEMENTED, "scaling lora_alpha / r"),
    "lora_dropout": Field(IMPLEMENTED, "dropout on the adapter's input in training"),
    "fan_in_fan_out": Field(IMPLEMENTED, "PEFT overrides it from the base layer (False for nn.Linear and "
                                         "bitsandbytes, True for Conv1D) and fastpeft takes it from the base too"),
    "bias": Field(IMPLEMENTED, "'none' / 'all' / 'lora_only': which biases train and are saved"),
    "use_rslora": Field(IMPLEMENTED, "scaling lora_alpha / sqrt(r)"),
    "modules_to_save": Field(IMPLEMENTED, "trainable copies, saved in the file"),
    "init_lora_weights": Field(
        IMPLEMENTED, "True, False, 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora' (base weights become the "
        "residual, also when loading, as in PEFT) and 'orthogonal' (fastpeft.nn.lora_init). 'eva', 'mica', "
        "'lora_ga' leave the base weights alone and their trained adapters are plain LoRA, so they load as in PEFT "
        "(a new fastpeft adapter with one raises: fastpeft.tuner.inject). 'corda', 'loftq' are refused: PEFT "
        "rewrites the base weights from data / a quantizer, also when loading", check=_check_lora_init),
    "layers_to_transform": Field(IMPLEMENTED, "PEFT's layer-index filter"),
    "layers_pattern": Field(IMPLEMENTED, "PEFT's layer-index filter"),
    "rank_pattern": Field(IMPLEMENTED, "per-module r (regex keys, PEFT's get_pattern_key)"),
    "alpha_pattern": Field(IMPLEMENTED, "per-module lora_alpha (regex keys, PEFT's get_pattern_key)"),
    "megatron_config": Field(METADATA, "PEFT reads it only to build Megatron tensor-parallel LoRA layers (plain "
                                       "LoRA math) on megatron.core Column/RowParallelLinear bases (its "
                                       "dispatch_megatron imports megatron_core, then a plain nn.Linear gets PEFT's "
                                       "ordinary LoRA layer); fastpeft adapts no Megatron layer (targeting one "
                                       "raises) and imports nothing"),
    "megatron_core": Field(METADATA, "the module megatron_config's layers come from; read only with megatron_config"),
    "trainable_token_indices": Field(IMPLEMENTED, "the listed rows of the input embedding (a list) or of the named "
                                                  "modules (a dict) train as trainable_tokens_delta, shared by a tied "
                                                  "LM head, with PEFT's keys (fastpeft.nn.trainable_tokens, "
                                                  "fastpeft.targeting_tokens); repeated or negative ids and LoRA or "
                                                  "modules_to_save on the same module are refused"),
    "loftq_config": Field(METADATA, "read only by init_lora_weights='loftq' (refused); otherwise PEFT drops it "
                                    "with a warning, as fastpeft does"),
    "eva_config": Field(METADATA, "read only by PEFT's data-driven initialize_lora_eva_weights(); the trained "
                                  "adapter is plain LoRA with its ranks and alphas in rank_pattern / alpha_pattern"),
    "corda_config": Field(METADATA, "read only by PEFT's preprocess_corda and init_lora_weights='corda' (refused)"),
    "lora_ga_config": Field(METADATA, "read only by LoRA-GA's initialization from gradients (preprocess_loraga); "
                                      "the trained adapter is plain LoRA"),
    "use_dora": Field(IMPLEMENTED, "DoRA (magnitude vector) on nn.Linear, Conv1D, bitsandbytes and nn.Embedding "
                                   "bases (fastpeft.nn.dora_embedding); refused on nn.MultiheadAttention, as in PEFT"),
    "velora_config": _unsupported("VeLoRA: PEFT's layer trains lora_A through a custom backward on compressed "
                                  "activations and saves a lora_velora_embed buffer per layer", _not_none),
    "alora_invocation_tokens": _VARIANTS["alora_invocation_tokens"],
    "use_qalora": Field(METADATA, "QALoRA exists only in PEFT's GPTQ layers, which fastpeft does not adapt "
                                  "(targeting one raises); PEFT ignores it on every other base"),
    "qalora_group_size": Field(METADATA, "read only with use_qalora (GPTQ layers)"),
    "monteclora_config": _unsupported("MonteCLoRA: Monte-Carlo sampled perturbations of lora_A while training and "
                                      "saved lora_monteclora_sampler parameters in PEFT's layers", _not_none),
    "layer_replication": Field(IMPLEMENTED, "PEFT's replicate_layers before targeting: the stack at (.model)*.layers, "
                                            "(.bert).encoder.layer or .h rebuilt from the ranges with shared base "
                                            "weights, layer_idx and num_hidden_layers updated, one adapter per copy "
                                            "(fastpeft.replication); other layouts raise as in PEFT; refused: a second "
                                            "adapter with it on an adapted model and merging a replicated model (PEFT "
                                            "silently gives wrong models there)"),
    "runtime_config": Field(METADATA, "runtime-only (ephemeral_gpu_offload: where DoRA's norm of offloaded "
                                      "weights is computed); neither PEFT nor fastpeft saves it"),
    "lora_bias": Field(IMPLEMENTED, "a bias on lora_B"),
    "target_parameters": Field(IMPLEMENTED, "LoRA on nn.Parameter tensors (e.g. 3-D MoE expert stacks) with "
                                            "PEFT's ParamWrapper matching, nesting, keys and shapes "
                                            "(fastpeft.targeting_params, fastpeft.nn.lora_param); with lora_dropout, "
                                            "use_dora, lora_bias, fan_in_fan_out or a LoRA variant refused as PEFT "
                                            "refuses them"),
    "use_bdlora": _VARIANTS["use_bdlora"],
    "arrow_config": _VARIANTS["arrow_config"],
    "kasa_config": _VARIANTS["kasa_config"],
    "ensure_weight_tying": _unsupported("with tie_word_embeddings, PEFT then adds the adapter only to the input "
                                        "embedding and gives the tied lm_head LoRA factors that are the embedding's "
                                        "lora_embedding_B / lora_embedding_A transposed (shared parameters), a "
                                        "modules_to_save copy of the lm_head tied to the embedding's copy, and tied "
                                        "trainable-token rows; fastpeft has no tied adapter layers or copies"),
}

_ADALORA_TRAINING = ("training: read by the rank allocator (model.base_model.update_and_allocate, called by the "
                     "training loop; fastpeft/adalora_train.py, compared with PEFT's in tests/test_adalora_train.py); "
                     "the result is saved as rank_pattern and the kept ranks")

ADALORA_FIELDS: dict[str, Field] = {
    **LORA_FIELDS,
    "r": Field(METADATA, "unused by AdaLoRA (init_r is the rank); a warning, as in PEFT"),
    "init_lora_weights": Field(IMPLEMENTED, "true: E = 0, A and B ~ N(0, 0.02); False: random A, E, B. PEFT's "
                                            "AdaLoRA layers take any str as true, and so does fastpeft"),
    "rank_pattern": Field(IMPLEMENTED, "masks of the kept ranks (the saved tensors hold only those)"),
    "alpha_pattern": Field(METADATA, "PEFT's AdaLoRA uses lora_alpha on every layer, as fastpeft does"),
    "use_rslora": Field(METADATA, "PEFT's AdaLoRA layers ignore it (scaling lora_alpha / ranknum), as fastpeft does"),
    "lora_bias": Field(METADATA, "PEFT's AdaLoRA layers ignore it (no bias on lora_B), as fastpeft does"),
    "use_dora": Field(IMPLEMENTED, "False only: AdaLoRA with DoRA is refused, as in PEFT"),
    **{name: _unsupported("a LoRA variant on AdaLoRA: PEFT's AdaLoRA layers do not implement it", test)
       for name, test in (("alora_invocation_tokens", bool), ("use_bdlora", _not_none), ("arrow_config", _not_none),
                          ("kasa_config", _not_none))},
    "target_parameters": _unsupported("PEFT's AdaLoRA cannot target parameters (its _create_and_replace takes no "
                                      "parameter_name and raises TypeError)"),
    "target_r": Field(IMPLEMENTED, _ADALORA_TRAINING),
    "init_r": Field(IMPLEMENTED, "the rank the layers are built with (and the scaling divisor ranknum)"),
    "tinit": Field(IMPLEMENTED, _ADALORA_TRAINING),
    "tfinal": Field(IMPLEMENTED, _ADALORA_TRAINING),
    "deltaT": Field(IMPLEMENTED, _ADALORA_TRAINING),
    "beta1": Field(IMPLEMENTED, _ADALORA_TRAINING),
    "beta2": Field(IMPLEMENTED, _ADALORA_TRAINING),
    "total_step": Field(IMPLEMENTED, _ADALORA_TRAINING + " (required > 0, as in PEFT)"),
    "orth_reg_weight": Field(IMPLEMENTED, "orth_reg_weight times the orthogonality penalty joins outputs.loss "
                                          "when the PeftModel has a task_type (PEFT's AdaLoraModel.forward; "
                                          "fastpeft/adalora_train.py)"),
}

IA3_FIELDS: dict[str, Field] = {
    **COMMON_FIELDS,
    "target_modules": Field(IMPLEMENTED, "PEFT's matching rules and per-model defaults"),
    "exclude_modules": Field(IMPLEMENTED, "PEFT's matching rules"),
    "feedforward_modules": Field(IMPLEMENTED, "input scale on these, output scale on the other targets"),
    "fan_in_fan_out": Field(IMPLEMENTED, "PEFT overrides it from the base layer (False for nn.Linear, True for "
                                         "Conv1D) and fastpeft takes it from the base too"),
    "modules_to_save": Field(IMPLEMENTED, "trainable copies, saved in the file"),
    "init_ia3_weights": Field(IMPLEMENTED, "True: ones (identity); False: random"),
}

# by peft_type value
FIELD_TABLES: dict[str, dict[str, Field]] = {"LORA": LORA_FIELDS, "ADALORA": ADALORA_FIELDS, "IA3": IA3_FIELDS}


# --------------------------------------------------------------------------- the refusal


def _default(config, name: str):
    for f in dataclasses.fields(config):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return None


def refusal(config, name: str, value) -> str | None:
    """The message fastpeft refuses ``config.<name> = value`` with, or None when it is accepted."""
    entry = config._FIELD_TABLE.get(name)
    if entry is None:
        return None  # not a PEFT field (tests/test_config_fields.py keeps the tables complete)
    if entry.status == UNSUPPORTED and entry.is_set(value):
        return (
            f"`{name}`={value!r} is not supported by fastpeft yet ({entry.reason}). Leave it at its default "
            f"({_default(config, name)!r}), or {_PEFT_HINT}."
        )
    if entry.check is not None:
        return entry.check(value)
    return None


def refuse_unsupported(config, values: dict | None = None) -> None:
    """Raise :class:`UnsupportedConfigError` for the first field of ``config`` (or of ``values``,
    name -> value about to be assigned) that fastpeft does not implement."""
    items = values.items() if values is not None else ((f.name, getattr(config, f.name)) for f in dataclasses.fields(config))
    for name, value in items:
        message = refusal(config, name, value)
        if message:
            raise UnsupportedConfigError(f"{type(config).__name__}: {message}")
