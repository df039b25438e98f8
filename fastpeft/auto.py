"""``AutoPeftModelFor*``: load base model + adapter from one adapter folder or Hub id (as PEFT).

The base model is read from the adapter config's ``base_model_name_or_path`` through the
matching Transformers ``AutoModelFor*`` class (so it must be available locally or on the Hub).
"""
from __future__ import annotations

from .config import PeftConfig
from .peft_model import PeftModel


class _AutoPeftModel:
    _auto_class_name = "AutoModel"

    def __init__(self, *args, **kwargs):
        raise OSError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(...)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, adapter_name: str = "default",
                        is_trainable: bool = False, config=None, revision=None, token=None,
                        subfolder=None, **model_kwargs) -> PeftModel:
        import transformers

        peft_config = PeftConfig.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder,
                                                 revision=revision, token=token)
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(
                f"adapter config of {pretrained_model_name_or_path!r} names no base_model_name_or_path; "
                f"load the base model yourself and use PeftModel.from_pretrained(model, ...)"
            )
        auto_cls = getattr(transformers, cls._auto_class_name)
        base = auto_cls.from_pretrained(base_path, revision=peft_config.revision, token=token, **model_kwargs)
        return PeftModel.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                         is_trainable=is_trainable, config=peft_config, revision=revision,
                                         token=token, subfolder=subfolder)


def _auto(name: str, auto_class: str) -> type:
    return type(name, (_AutoPeftModel,), {"_auto_class_name": auto_class, "__module__": __name__})


AutoPeftModel = _auto("AutoPeftModel", "AutoModel")
AutoPeftModelForCausalLM = _auto("AutoPeftModelForCausalLM", "AutoModelForCausalLM")
AutoPeftModelForSeq2SeqLM = _auto("AutoPeftModelForSeq2SeqLM", "AutoModelForSeq2SeqLM")
AutoPeftModelForSequenceClassification = _auto("AutoPeftModelForSequenceClassification", "AutoModelForSequenceClassification")
AutoPeftModelForTokenClassification = _auto("AutoPeftModelForTokenClassification", "AutoModelForTokenClassification")
AutoPeftModelForQuestionAnswering = _auto("AutoPeftModelForQuestionAnswering", "AutoModelForQuestionAnswering")
AutoPeftModelForFeatureExtraction = _auto("AutoPeftModelForFeatureExtraction", "AutoModel")
