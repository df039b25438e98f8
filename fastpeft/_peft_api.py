"""The public names of PEFT's ``PeftModel`` (and its task subclasses) and tuner models
(``LoraModel``, ``IA3Model``, ``AdaLoraModel``) that fastpeft does not implement, with the
reason and what to use instead.

``PeftModel`` and its tuner fall through to the user's model for any other attribute (as PEFT's
do: ``config``, ``device``, ``gradient_checkpointing_enable``...). A PEFT name in this table
must not reach the model, where it would fail with a misleading error about the model's class
(or, worse, find something else): :func:`refuse_unsupported` raises ``AttributeError`` naming
it. ``tests/test_peft_api.py`` fails when peft gains a public name that is neither
implemented nor listed here.
"""
from __future__ import annotations

_OPTIMIZE_HINT = ("fastpeft.optimize(peft_model) speeds up a peft.PeftModel in place and keeps all of peft's API")

# name -> why it is not there (and what to use instead)
UNSUPPORTED: dict[str, str] = {
    "get_prompt": "prompt learning methods (prompt/prefix/p-tuning) are not part of fastpeft",
    "get_prompt_embedding_to_save": "prompt learning methods (prompt/prefix/p-tuning) are not part of fastpeft",
    "inject_adapter": "PEFT's tuner-internal injection; use fastpeft.inject_adapter_in_model(config, model, name) "
                      "or PeftModel.add_adapter(name, config)",
    "subtract_mutated_init": "PEFT's tuner-level step of the PiSSA/OLoRA conversion; use save_pretrained("
                             "path_initial_model_for_weight_conversion=...), which does the whole conversion",
    "supports_lora_conversion": "converting adapters to LoRA (peft.tuners.lora.conversion) is not implemented",
    "resize_state_dict_by_rank_pattern": "AdaLoRA's state-dict slicing happens inside save_pretrained; there is "
                                         "no separate call",
    "target_module_mapping": "PEFT-internal (the default target modules per architecture live in "
                             "fastpeft.targeting)",
    "tuner_layer_cls": "PEFT-internal (fastpeft's layer classes are in fastpeft.nn)",
    "uses_shared_state": "PEFT-internal",
}


def refuse_unsupported(obj, name: str, where: str) -> None:
    """Raise ``AttributeError`` for a PEFT name fastpeft does not implement (no-op otherwise)."""
    reason = UNSUPPORTED.get(name)
    if reason is not None:
        raise AttributeError(
            f"'{name}' is a PEFT {where} API that fastpeft does not support yet ({reason}). {_OPTIMIZE_HINT}."
        )
