"""Let ``transformers.Trainer`` treat a ``fastpeft.PeftModel`` as it treats a ``peft.PeftModel``.

Trainer has no registry for adapter models: it recognises PEFT models with
``isinstance(model, (peft.PeftModel, peft.PeftMixedModel))`` (``trainer_utils._is_peft_model``,
imported by name into ``trainer`` and ``integrations.neftune``) and saves them when
``isinstance(model, (PreTrainedModel, PeftModel))`` in ``Trainer._save``. Only then does it

* read the dataset columns from the *base* model's ``forward`` signature (otherwise
  ``PeftModel.forward(*args, **kwargs)`` hides them and every column is dropped: "The batch
  received was empty"),
* write checkpoints with ``model.save_pretrained`` (the adapter files; otherwise the whole
  model's state dict goes to ``model.safetensors``),
* resume with ``model.load_adapter(checkpoint, name, is_trainable=True)``.

:func:`register` makes those checks accept ``fastpeft.PeftModel`` too: it wraps
``_is_peft_model`` where Transformers defined and imported it, and adds fastpeft's class to the
``PeftModel`` name that ``Trainer._save`` reads (without peft installed, it makes that check see
fastpeft's class alone), and ``Trainer._load_from_checkpoint`` resumes models with
fastpeft's mixin from their adapter files (below). Nothing else in Transformers changes, and
peft's own models behave as before. ``import fastpeft`` installs it: at once when ``transformers.trainer`` is already
imported, else when it is (an import hook, so Transformers is never imported by fastpeft).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

# the Transformers modules that define or import ``_is_peft_model`` / read ``PeftModel``
_MODULES = ("transformers.trainer_utils", "transformers.trainer", "transformers.integrations.neftune")


def _is_fastpeft_model(model) -> bool:
    from ..peft_model import PeftModel

    return isinstance(model, PeftModel)


def _wrap_is_peft_model(original):
    if getattr(original, "_fastpeft_wrapped", False):
        return original

    def _is_peft_model(model):
        return _is_fastpeft_model(model) or original(model)

    _is_peft_model._fastpeft_wrapped = True
    _is_peft_model.__doc__ = original.__doc__
    return _is_peft_model


def _patch(module) -> None:
    """Patch one of :data:`_MODULES` after it has run."""
    from ..peft_model import PeftModel

    if hasattr(module, "_is_peft_model"):
        module._is_peft_model = _wrap_is_peft_model(module._is_peft_model)
    if module.__name__ == "transformers.trainer":
        peft_cls = module.__dict__.get("PeftModel")
        if peft_cls is None:  # peft is not installed: Trainer._save checks PeftModel only if it thinks it is
            module.PeftModel = PeftModel
            original = module.is_peft_available
            if not getattr(original, "_fastpeft_wrapped", False):
                def is_peft_available():
                    return True  # read by Trainer._save and _save_checkpoint only, after import
                is_peft_available._fastpeft_wrapped = True
                module.is_peft_available = is_peft_available
        elif not isinstance(peft_cls, tuple):  # isinstance(x, (A, (B, C))) works: nested tuples are allowed
            module.PeftModel = (peft_cls, PeftModel)
        trainer_cls = module.Trainer
        if not getattr(trainer_cls._load_from_checkpoint, "_fastpeft_wrapped", False):
            trainer_cls._load_from_checkpoint = _resuming_mixin_models(trainer_cls._load_from_checkpoint)


def _resuming_mixin_models(original):
    """``Trainer._load_from_checkpoint`` that also resumes a model with fastpeft's adapter mixin
    (``fastpeft.with_adapters``): Transformers' own path looks for the whole model's weights
    there and fails ("Can't find a checkpoint index"), with Transformers' PEFT mixin as well. The
    checkpoint's adapter files (the active adapter, as Transformers' ``save_pretrained`` writes
    them) are loaded into the active adapter in place."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        import os

        from .. import checkpoint, tuner
        from ..mixin import AdapterMixin

        target = self.model if model is None else model
        full = any(os.path.isfile(os.path.join(resume_from_checkpoint, f)) for f in
                   ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json"))
        has_adapter = any(os.path.isfile(os.path.join(resume_from_checkpoint, f)) for f in
                          (checkpoint.SAFETENSORS_WEIGHTS_NAME, checkpoint.WEIGHTS_NAME))
        if isinstance(target, AdapterMixin) and getattr(target, "peft_config", None) and has_adapter and not full:
            active = target.active_adapters()
            weights = checkpoint.load_adapter_weights(resume_from_checkpoint)
            tuner.load_weights(target, weights, active[0], target.peft_config[active[0]])
            return None
        return original(self, resume_from_checkpoint, model)

    _load_from_checkpoint._fastpeft_wrapped = True
    _load_from_checkpoint.__doc__ = original.__doc__
    return _load_from_checkpoint


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of :data:`_MODULES` so they are patched
    right after they execute."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch(module)

    def __getattr__(self, name):  # get_source, is_package, ... of the real loader
        return getattr(self._loader, name)


_finder = _PatchAfterImport()


def register() -> None:
    """Patch the :data:`_MODULES` already imported and those imported later (idempotent)."""
    for name in _MODULES:
        module = sys.modules.get(name)
        if module is not None:
            _patch(module)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
