"""``PeftModel``: PEFT's wrapper class, same attributes (``base_model.model``) and methods."""
from __future__ import annotations

import contextlib
import os

from torch import nn

from . import checkpoint, targeting, tuner
from ._locks import reading
from .config import PeftConfig


class AdapterModel(nn.Module):
    """The tuner level of PEFT (``LoraModel`` & co.): holds the user model as ``.model`` so
    state-dict keys read ``base_model.model.<path>`` exactly as in PEFT."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def peft_config(self) -> dict:
        return tuner._configs(self.model)

    def forward(self, *args, **kwargs):
        return reading(self.model, self._forward, args, kwargs)

    def _forward(self, args, kwargs):
        outputs = self.model(*args, **kwargs)
        if any(tuner._method(c) == "adalora" for c in self.peft_config.values()):
            from . import adalora_train  # AdaLoRA's orthogonal regularisation joins the loss, as PEFT's AdaLoraModel

            outputs = adalora_train.add_orthogonal_regularization(self.model, outputs)
        return outputs

    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA's rank allocation step (PEFT's ``AdaLoraModel.update_and_allocate``): call it
        after ``loss.backward()`` and before ``optimizer.zero_grad()``; fastpeft/adalora_train.py."""
        from . import adalora_train

        adalora_train.update_and_allocate(self.model, global_step)

    # PEFT's tuner-level API (LoraModel & co.): ``model.base_model.set_adapter([...])`` is how
    # PEFT users activate several adapters at once
    @property
    def active_adapters(self) -> list[str]:
        return tuner.active_adapters(self.model)

    @property
    def active_adapter(self):
        act = self.active_adapters
        return act[0] if len(act) == 1 else act

    def set_adapter(self, adapter_name) -> None:
        """Make ``adapter_name`` (a name or a list of names, whose deltas add up) active."""
        tuner.set_adapter(self.model, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        tuner.delete_adapter(self.model, adapter_name)

    def enable_adapter_layers(self) -> None:
        tuner.enable_adapters(self.model, True)

    def disable_adapter_layers(self) -> None:
        tuner.enable_adapters(self.model, False)

    def merge_adapter(self, adapter_names=None) -> None:
        tuner.merge(self.model, adapter_names)

    def unmerge_adapter(self) -> None:
        tuner.unmerge(self.model)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        return tuner.unload(self.model, merge_first=True, adapter_names=adapter_names, safe_merge=safe_merge,
                            progressbar=progressbar)

    def unload(self, progressbar: bool = False) -> nn.Module:
        return tuner.unload(self.model, merge_first=False, progressbar=progressbar)

    def add_weighted_adapter(self, adapters, weights, adapter_name, **kwargs) -> None:
        """PEFT's ``LoraModel.add_weighted_adapter``: a new adapter combined from existing ones
        (fastpeft/combine.py has the combination types and their maths)."""
        from . import combine

        combine.add_weighted_adapter(self.model, adapters, weights, adapter_name, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class PeftModel(nn.Module):
    """A model with adapters, as ``peft.PeftModel``.

    Build it with :func:`fastpeft.get_peft_model` (fresh adapter) or
    :meth:`PeftModel.from_pretrained` (saved adapter, local folder or Hub repo id).
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False, _weights=None):
        super().__init__()
        self.base_model = AdapterModel(model)
        self._task_type = getattr(peft_config, "task_type", None)  # PEFT picks PeftModelFor<Task> by it
        self._autocast = autocast_adapter_dtype
        # PEFT's PeftModelFor<Task> classes add the task head to modules_to_save
        peft_config = targeting.with_task_defaults(peft_config)
        freeze = (lambda: self._freeze_adapters(adapter_name)) if getattr(peft_config, "inference_mode", False) else None
        tuner.inject(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, weights=_weights,
                     finish=freeze)  # any exception: the model is left as it was

    # ----- construction ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        revision: str | None = None, token=None, subfolder: str | None = None,
                        autocast_adapter_dtype: bool = True, **kwargs) -> PeftModel:
        """Load a saved adapter (PEFT format) from a folder or Hub repo id onto ``model``."""
        hub_kw = dict(subfolder=subfolder, revision=revision, token=token)
        if config is None:
            config = PeftConfig.from_pretrained(model_id, **hub_kw)
        weights = checkpoint.load_adapter_weights(model_id, **hub_kw)
        config.inference_mode = not is_trainable
        peft_model = cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                         _weights=weights)
        if not is_trainable:
            peft_model.eval()  # (the adapter was frozen inside the rolled-back injection)
        return peft_model

    # ----- the adapters ------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict:
        return self.base_model.peft_config

    # the adapter-management calls are the tuner's (AdapterModel above), as in PEFT
    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_adapter(self):
        return self.base_model.active_adapter

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     revision: str | None = None, token=None, subfolder: str | None = None,
                     hotswap: bool = False, **kwargs):
        """Load another saved adapter under ``adapter_name`` (not made active).

        ``hotswap=True``: replace the weights of the existing adapter ``adapter_name`` in place
        (fastpeft/hotswap.py)."""
        hub_kw = dict(subfolder=subfolder, revision=revision, token=token)
        if hotswap:
            from .hotswap import hotswap_adapter

            hotswap_adapter(self, model_id, adapter_name, **hub_kw, **kwargs)
            return self
        config = PeftConfig.from_pretrained(model_id, **hub_kw)
        weights = checkpoint.load_adapter_weights(model_id, **hub_kw)
        config.inference_mode = not is_trainable
        config = targeting.with_task_defaults(config)
        finish = None if is_trainable else (lambda: self._freeze_adapters(adapter_name))
        tuner.inject(self.base_model.model, config, adapter_name, autocast_adapter_dtype=self._autocast, weights=weights,
                     finish=finish)
        return self

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a fresh adapter (not made active; use :meth:`set_adapter`)."""
        peft_config = targeting.with_task_defaults(peft_config)
        tuner.inject(self.base_model.model, peft_config, adapter_name, autocast_adapter_dtype=self._autocast)

    def set_adapter(self, adapter_name) -> None:
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager: the base model alone inside the block (modules_to_save too)."""
        model = self.base_model.model
        was_enabled = tuner.adapters_enabled(model)
        tuner.enable_adapters(model, False)
        try:
            yield
        finally:
            tuner.enable_adapters(model, was_enabled)

    def _freeze_adapters(self, adapter_name: str) -> None:
        for layer in tuner.adapter_layers(self.base_model.model):
            if adapter_name in layer._adapters:
                for p in layer._params_of(adapter_name):
                    p.requires_grad_(False)

    # ----- merging -----------------------------------------------------------------------------
    def merge_adapter(self, adapter_names=None) -> None:
        self.base_model.merge_adapter(adapter_names)

    def add_weighted_adapter(self, adapters, weights, adapter_name, **kwargs) -> None:
        """A new adapter combined from existing ones, as PEFT's (reached there through the tuner)."""
        self.base_model.add_weighted_adapter(adapters, weights, adapter_name, **kwargs)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self, progressbar: bool = False) -> nn.Module:
        return self.base_model.unload(progressbar)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # ----- saving ------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, selected_adapters=None, **kwargs) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` per adapter, as PEFT:
        the default adapter in ``save_directory``, others in ``save_directory/<name>``."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; give a folder")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"save_pretrained: unknown adapter(s) {unknown}; the model has {list(self.peft_config)}")
        for name in names:
            out = save_directory if name == "default" else os.path.join(save_directory, name)
            os.makedirs(out, exist_ok=True)
            sd = checkpoint.add_peft_prefix(tuner.adapter_state_dict(self.base_model.model, name))
            checkpoint.save_adapter_weights(sd, out)
            cfg = self.peft_config[name]
            cfg.inference_mode = True
            cfg.save_pretrained(out)

    # ----- running -------------------------------------------------------------------------------
    def forward(self, *args, adapter_names=None, **kwargs):
        return reading(self.base_model.model, self._forward, args, adapter_names, kwargs)

    def _forward(self, args, adapter_names, kwargs):
        model = self.base_model.model
        # PEFT's PeftModelFor<Task> (a task_type was given) calls its tuner, which adds AdaLoRA's
        # regularisation to the loss; a plain PeftModel calls the base model directly
        run = self.base_model._forward if self._task_type is not None else (lambda a, kw: model(*a, **kw))
        if adapter_names is None:
            return run(args, kwargs)
        with tuner.mixed_batch(model, adapter_names, repeat=False):  # one name per row, as in PEFT
            return run(args, kwargs)

    def generate(self, *args, adapter_names=None, **kwargs):
        return reading(self.base_model.model, self._generate, args, adapter_names, kwargs)

    def _generate(self, args, adapter_names, kwargs):
        model = self.base_model.model
        if adapter_names is None:
            return model.generate(*args, **kwargs)
        with tuner.mixed_batch(model, adapter_names):  # a name per prompt row, repeated for beams / sequences
            return model.generate(*args, **kwargs)

    # ----- reporting -----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / max(a, 1):.4f}")

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model.model, name)


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True, **kwargs) -> PeftModel:
    """Wrap ``model`` with a fresh adapter (PEFT's ``get_peft_model``)."""
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
