"""``AdapterMixin``: Transformers' ``PeftAdapterMixin`` methods for any ``nn.Module``.

Use it as a base class, or give an existing model object the methods with
:func:`with_adapters` (a Transformers model keeps its class behaviour; the adapter methods
become fastpeft's). Adapters are stored in ``model.peft_config`` as in Transformers.
"""
from __future__ import annotations

import contextlib
import functools

from torch import nn

from . import checkpoint, saving, tuner
from ._locks import model_lock, reading
from .config import PeftConfig, as_fastpeft_config


class AdapterMixin:
    """Adapter methods with the names and meanings of Transformers' ``PeftAdapterMixin``."""

    def load_adapter(self, peft_model_id: str | None = None, adapter_name: str | None = None,
                     peft_config: PeftConfig | None = None, adapter_state_dict: dict | None = None,
                     low_cpu_mem_usage: bool = False, is_trainable: bool = False, hotswap: bool | str = "auto",
                     local_files_only: bool = False, adapter_kwargs: dict | None = None, *,
                     revision: str | None = None, token=None, device_map=None, **kwargs) -> None:
        """Load an adapter from a folder / Hub id, or from ``peft_config`` + ``adapter_state_dict``
        (Transformers' signature and positional order). ``hotswap``: True replaces the weights of
        the existing adapter ``adapter_name`` in place; ``"auto"`` (Transformers' default) is
        False here (Transformers' ``enable_peft_hotswap`` is not implemented)."""
        adapter_name = adapter_name if adapter_name is not None else "default"
        if kwargs.pop("load_config", None) is not None:
            raise NotImplementedError("load_adapter(load_config=...) is not supported by fastpeft")
        if local_files_only:
            kwargs["local_files_only"] = True
        hub_kw = _hub_kwargs(self, revision, token, adapter_kwargs, kwargs, device_map)
        if hotswap == "auto":
            hotswap = False
        if not isinstance(hotswap, bool):
            raise ValueError(f"load_adapter(hotswap=...) takes True, False or 'auto', got {hotswap!r}")
        if hotswap:  # Transformers' hotswap=True: new weights for an existing adapter
            from .hotswap import hotswap_adapter

            if peft_model_id is None:
                raise ValueError("load_adapter(hotswap=True) needs peft_model_id")
            if is_trainable:
                raise NotImplementedError("load_adapter(hotswap=True, is_trainable=True): a hot-swapped adapter "
                                          "keeps its trainability; swap it, then set requires_grad yourself")
            hotswap_adapter(self, peft_model_id, adapter_name, **hub_kw)
            return
        if kwargs:
            raise TypeError(f"load_adapter() got unexpected keyword argument(s) {sorted(kwargs)}")
        if adapter_name in getattr(self, "peft_config", {}):
            raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
        if peft_model_id is None and (peft_config is None or adapter_state_dict is None):
            raise ValueError("load_adapter needs peft_model_id, or both peft_config and adapter_state_dict")
        if peft_config is None:
            peft_config = PeftConfig.from_pretrained(peft_model_id, **hub_kw)
        else:
            peft_config = as_fastpeft_config(peft_config)  # a peft.LoraConfig & co. too
        if adapter_state_dict is None:
            adapter_state_dict = checkpoint.load_adapter_weights(peft_model_id, **hub_kw)
        peft_config.inference_mode = not is_trainable
        def freeze():
            for layer in tuner.adapter_layers(self):
                if adapter_name in layer._adapters:
                    for p in layer._params_of(adapter_name):
                        p.requires_grad_(False)

        with model_lock(self).writing():  # loaded and made active in one step for other threads
            tuner.inject(self, peft_config, adapter_name, weights=adapter_state_dict,
                         finish=None if is_trainable else freeze)
            tuner.set_adapter(self, adapter_name)  # Transformers 5 makes the adapter it loads the active one
        self._hf_peft_config_loaded = True

    def add_adapter(self, adapter_config: PeftConfig, adapter_name: str | None = None) -> None:
        """Add a fresh adapter for training and make it the active one (as Transformers)."""
        adapter_name = adapter_name or "default"
        adapter_config = as_fastpeft_config(adapter_config)  # a peft.LoraConfig & co. too
        with model_lock(self).writing():  # added and made active in one step for other threads
            tuner.inject(self, adapter_config, adapter_name)
            tuner.set_adapter(self, adapter_name)
        self._hf_peft_config_loaded = True

    def _require_adapters(self):
        if not getattr(self, "peft_config", None):
            raise ValueError("No adapter loaded. Please load an adapter first.")

    def set_adapter(self, adapter_name) -> None:
        self._require_adapters()
        tuner.set_adapter(self, adapter_name)

    def enable_adapters(self) -> None:
        self._require_adapters()
        tuner.enable_adapters(self, True)

    def disable_adapters(self) -> None:
        self._require_adapters()
        tuner.enable_adapters(self, False)

    def active_adapters(self) -> list[str]:
        self._require_adapters()
        return tuner.active_adapters(self)

    def get_adapter_state_dict(self, adapter_name: str | None = None, state_dict: dict | None = None) -> dict:
        """Adapter ``adapter_name`` (default: the first active one) in file format, keys relative to
        the model and without the adapter name (Transformers' ``save_pretrained`` adds the
        ``base_model.model.`` prefix). ``state_dict``: the model's state dict to read it from
        (Transformers passes it; default: the live model's)."""
        self._require_adapters()
        adapter_name = adapter_name or self.active_adapters()[0]
        if state_dict is None:
            return tuner.adapter_state_dict(self, adapter_name)
        tuner._check_names(self, [adapter_name], "get_adapter_state_dict")
        return checkpoint.get_adapter_state_dict(state_dict, adapter_name, self.peft_config[adapter_name])

    def save_pretrained(self, save_directory: str, *args, **kwargs):
        """On a Transformers model: Transformers' ``save_pretrained`` (with adapters it writes the
        active adapter's files only). On any other module: the active adapter as PEFT files
        (``adapter_config.json``, ``adapter_model.safetensors``, ``.bin`` with
        ``safe_serialization=False``) in ``save_directory``, as Transformers does."""
        parent = getattr(super(), "save_pretrained", None)
        if parent is not None:
            return parent(save_directory, *args, **kwargs)
        safe = kwargs.pop("safe_serialization", True)
        if args or kwargs:
            raise TypeError(f"save_pretrained() takes save_directory and safe_serialization here; got "
                            f"{len(args)} more positional and {sorted(kwargs)}")
        self._require_adapters()
        active = self.active_adapters()
        if len(active) != 1:
            raise ValueError(f"save_pretrained saves the one active adapter, as Transformers; {active} are active: "
                             "set_adapter(name) first")
        config, auto_mapping = saving.config_to_save(self.peft_config[active[0]], self, active[0])
        sd = saving.adapter_file_state_dict(self, active[0], self.peft_config[active[0]])
        saving.write_adapter_folder(save_directory, sd, config, safe, auto_mapping)

    def push_to_hub(self, repo_id: str, *args, **kwargs):
        """On a Transformers model: Transformers' ``push_to_hub`` (the files of its
        ``save_pretrained``: the active adapter's). On any other module: the folder
        :meth:`save_pretrained` writes, in one commit (``commit_message``, ``private``, ``token``,
        ``revision``, ``create_pr``, ``commit_description``, ``tags`` as Transformers')."""
        parent = getattr(super(), "push_to_hub", None)
        if parent is not None:
            return parent(repo_id, *args, **kwargs)
        if args:
            raise TypeError("push_to_hub() takes repo_id and keyword arguments")
        safe = kwargs.pop("safe_serialization", True)
        kwargs.pop("max_shard_size", None)  # adapter files are not sharded
        return saving.push_folder_to_hub(lambda folder: self.save_pretrained(folder, safe_serialization=safe),
                                         repo_id, **kwargs)

    def delete_adapter(self, adapter_names) -> None:
        self._require_adapters()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        tuner._check_names(self, names, "delete_adapter")
        with model_lock(self).writing():  # all of them, or none, for other threads' forwards
            for n in names:
                tuner.delete_adapter(self, n)
        if not self.peft_config:
            self._hf_peft_config_loaded = False


# adapter_kwargs / keywords of Transformers' load_adapter that reach the Hub resolution
_HUB_KEYS = ("subfolder", "revision", "token", "cache_dir", "local_files_only")


def _hub_kwargs(model, revision, token, adapter_kwargs, kwargs, device_map) -> dict:
    """The Hub keywords of a mixin ``load_adapter`` call (``kwargs`` loses the ones used).
    ``device_map``: ``"auto"`` or the model's own ``hf_device_map`` keep its placement (each
    adapter lives on its base layer's execution device); a new placement raises."""
    current = getattr(model, "hf_device_map", None)
    if device_map is not None and not (current is not None and (device_map == "auto" or device_map == current)):
        raise NotImplementedError("load_adapter(device_map=...): fastpeft does not re-place models; place the "
                                  "model first (its adapters follow their base layers' execution devices)")
    hub = {"revision": revision, "token": token}
    if "local_files_only" in kwargs:
        hub["local_files_only"] = kwargs.pop("local_files_only")
    unknown = sorted(set(adapter_kwargs or {}) - set(_HUB_KEYS))
    if unknown:
        raise TypeError(f"load_adapter(adapter_kwargs=...): unsupported key(s) {unknown}; fastpeft takes {_HUB_KEYS}")
    hub.update(adapter_kwargs or {})
    return hub


_mixin_classes: dict[type, type] = {}


def _locked_forward(forward):
    """``forward`` run with the model's lock held shared (adapter changes from other threads
    wait: fastpeft/_locks.py); its signature stays (Transformers' generate and Trainer read it)."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        return reading(self, forward, self, *args, **kwargs)

    return wrapper


def with_adapters(model: nn.Module) -> nn.Module:
    """Give ``model`` (any nn.Module, e.g. a Transformers model) the mixin's methods in place."""
    cls = type(model)
    if isinstance(model, AdapterMixin):
        return model
    new_cls = _mixin_classes.get(cls)
    if new_cls is None:
        attrs = {"__module__": cls.__module__, "forward": _locked_forward(cls.forward)}
        if callable(getattr(cls, "generate", None)):  # a whole generation sees one set of adapters
            attrs["generate"] = _locked_forward(cls.generate)
        new_cls = type(cls.__name__, (AdapterMixin, cls), attrs)
        _mixin_classes[cls] = new_cls
    model.__class__ = new_cls
    return model


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names):
    """Context manager: row ``i`` of each batch uses ``adapter_names[i]`` (``"__base__"``/None: none)."""
    from .peft_model import PeftModel

    inner = model.base_model.model if isinstance(model, PeftModel) else model
    with tuner.mixed_batch(inner, adapter_names):
        yield
