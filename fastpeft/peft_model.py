"""``PeftModel``: PEFT's wrapper class, same attributes (``base_model.model``) and methods."""
from __future__ import annotations

import contextlib
import os

from torch import nn

from . import _peft_api as peft_api
from . import checkpoint, saving, status, targeting, tuner
from ._locks import reading
from .config import PeftConfig, as_fastpeft_config
from .nn.lora_variants import alora


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

    @property
    def rankallocator(self):
        """AdaLoRA's rank allocator (PEFT's ``AdaLoraModel.rankallocator``), made on first use."""
        from . import adalora_train

        return adalora_train.rank_allocator(self.model)

    def resize_modules_by_rank_pattern(self, rank_pattern: dict, adapter_name: str) -> None:
        """Shrink AdaLoRA layers to the ranks ``rank_pattern`` keeps (PEFT's method of that name)."""
        from . import adalora_train

        adalora_train.resize_modules_by_rank_pattern(self.model, rank_pattern, adapter_name)

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

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters' parameters on or off (modules_to_save copies too)."""
        tuner.set_requires_grad(self.model, adapter_names, requires_grad)

    @property
    def prefix(self) -> str:
        """The prefix of the adapter parameters' names (``lora_`` / ``ia3_``), as PEFT's tuners."""
        kinds = {tuner._method(c) for c in self.peft_config.values()} or {"lora"}
        return "ia3_" if kinds == {"ia3"} else "lora_"

    @staticmethod
    def get_model_config(model: nn.Module) -> dict:
        """The model's config as a dict (PEFT's ``BaseTuner.get_model_config``; ``{"model_type":
        "custom"}`` for a model without one)."""
        import dataclasses

        config = getattr(model, "config", None)
        if config is None:
            return {"model_type": "custom"}
        if hasattr(config, "to_dict"):
            return config.to_dict()
        return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            peft_api.refuse_unsupported(self, name, "LoraModel")
            return getattr(self.model, name)


class PeftModel(nn.Module):
    """A model with adapters, as ``peft.PeftModel``.

    Build it with :func:`fastpeft.get_peft_model` (fresh adapter) or
    :meth:`PeftModel.from_pretrained` (saved adapter, local folder or Hub repo id).
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False, _weights=None):
        super().__init__()
        peft_config = as_fastpeft_config(peft_config)  # a peft.LoraConfig & co. too
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
                        autocast_adapter_dtype: bool = True, *, revision: str | None = None, token=None,
                        subfolder: str | None = None, **kwargs) -> PeftModel:
        """Load a saved adapter (PEFT format) from a folder or Hub repo id onto ``model``.

        Keyword arguments as PEFT's: ``cache_dir`` / ``local_files_only`` go to the Hub;
        ``low_cpu_mem_usage`` and ``torch_device`` change nothing in what is computed (the
        weights are copied into the layers on their device); options fastpeft does not
        implement (``ephemeral_gpu_offload=True``, ``key_mapping``, ``ignore_mismatched_sizes``,
        accelerate placement arguments) raise, and so does any unknown keyword."""
        hub_kw = dict(subfolder=subfolder, revision=revision, token=token,
                      **_load_kwargs(kwargs, "from_pretrained", model))
        config = PeftConfig.from_pretrained(model_id, **hub_kw) if config is None else as_fastpeft_config(config)
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

    @property
    def active_peft_config(self) -> PeftConfig:
        """The config of the active adapter (PEFT's property; peft's own ``hotswap_adapter`` reads it)."""
        return self.peft_config[self.active_adapters[0]]

    # the adapter-management calls are the tuner's (AdapterModel above), as in PEFT
    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_adapter(self):
        return self.base_model.active_adapter

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, torch_device=None,
                     autocast_adapter_dtype: bool = True, *, revision: str | None = None, token=None,
                     subfolder: str | None = None, hotswap: bool = False, **kwargs):
        """Load a saved adapter under ``adapter_name`` (not made active), as PEFT's.

        A name the model already has gets the file's weights in place (PEFT's behaviour, which
        ``Trainer(resume_from_checkpoint=...)`` relies on); its config and trainability stay.
        ``hotswap=True``: replace the weights of the existing adapter ``adapter_name`` in place,
        rank and scaling included (fastpeft/hotswap.py). Positional order as PEFT's;
        ``torch_device`` changes nothing computed (the weights are copied into the layers on
        their device). Keyword arguments as :meth:`from_pretrained`."""
        del torch_device
        hub_kw = dict(subfolder=subfolder, revision=revision, token=token,
                      **_load_kwargs(kwargs, "load_adapter", self.base_model.model))
        if hotswap:
            from .hotswap import hotswap_adapter

            if is_trainable:
                raise NotImplementedError("load_adapter(hotswap=True, is_trainable=True): a hot-swapped adapter "
                                          "keeps its trainability; swap it, then set requires_grad yourself")

            hotswap_adapter(self, model_id, adapter_name, **hub_kw)
            return self
        weights = checkpoint.load_adapter_weights(model_id, **hub_kw)
        if adapter_name in self.peft_config:
            tuner.load_weights(self.base_model.model, weights, adapter_name, self.peft_config[adapter_name])
            return self
        config = PeftConfig.from_pretrained(model_id, **hub_kw)
        config.inference_mode = not is_trainable
        config = targeting.with_task_defaults(config)
        finish = None if is_trainable else (lambda: self._freeze_adapters(adapter_name))
        tuner.inject(self.base_model.model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                     weights=weights, finish=finish)
        return self

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a fresh adapter (not made active; use :meth:`set_adapter`)."""
        peft_config = targeting.with_task_defaults(as_fastpeft_config(peft_config))
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
        self._adapters_disabled = True
        try:
            yield
        finally:
            tuner.enable_adapters(model, was_enabled)
            self._adapters_disabled = False

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

    # ----- saving and sharing ----------------------------------------------------------------
    def save_pretrained(self, save_directory: str, safe_serialization: bool = True, selected_adapters=None,
                        save_embedding_layers: bool | str = "auto", is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: str | None = None, **kwargs) -> None:
        """Write the adapters as PEFT does (fastpeft/saving.py): ``adapter_config.json`` and
        ``adapter_model.safetensors`` (``.bin`` with ``safe_serialization=False``) per adapter,
        ``default`` in ``save_directory`` and every other one in ``save_directory/<name>``, and a
        ``README.md`` model card. ``state_dict=``: take the weights from this state dict of the
        whole model (Trainer passes it) instead of the live model. ``is_main_process=False``
        writes nothing. The live configs keep their ``inference_mode``.
        ``path_initial_model_for_weight_conversion``: the folder where the PiSSA / OLoRA adapter
        was saved right after its initialization; the adapter is then saved as the plain LoRA
        adapter (rank 2r) that gives the same outputs on the original base weights, and that
        folder's config is rewritten with ``init_lora_weights=True``, as PEFT does."""
        state_dict = kwargs.pop("state_dict", None)
        kwargs.pop("max_shard_size", None)  # transformers' push_to_hub passes it; PEFT never shards adapter files
        if kwargs:
            raise TypeError(f"save_pretrained() got unexpected keyword argument(s) {sorted(kwargs)}")
        if save_embedding_layers not in (True, False, "auto"):
            raise ValueError(f"save_embedding_layers must be True, False or 'auto', got {save_embedding_layers!r}")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; give a folder")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"save_pretrained: unknown adapter(s) {unknown}; the model has {list(self.peft_config)}")
        for name in names:
            if name != "default":
                saving.check_adapter_name_is_path_safe(name)
        if state_dict is not None:
            state_dict = {k.removeprefix("base_model.model."): v for k, v in state_dict.items()}
        model = self.base_model.model
        files = [(name, saving.adapter_file_state_dict(model, name, self.peft_config[name], state_dict,
                                                       save_embedding_layers)) for name in names]
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        self.create_or_update_model_card(save_directory)
        for name, sd in files:
            config, auto_mapping = saving.config_to_save(self.peft_config[name], model, name)
            if path_initial_model_for_weight_conversion is not None:  # PiSSA / OLoRA -> plain LoRA, as PEFT
                sd, config = saving.as_plain_lora(sd, config, path_initial_model_for_weight_conversion,
                                                  self.peft_config[name].inference_mode)
            out = save_directory if name == "default" else os.path.join(save_directory, name)
            saving.write_adapter_folder(out, sd, config, safe_serialization, auto_mapping)

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Create or update ``<output_dir>/README.md`` with what PEFT's model card holds."""
        saving.update_model_card(output_dir, self.base_model.model, self.peft_config, self.active_adapters,
                                 self._task_type)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token=None, revision: str | None = None, create_pr: bool = False,
                    tags: list[str] | None = None, safe_serialization: bool = True, selected_adapters=None,
                    max_shard_size=None) -> str:
        """Upload the adapter folder that :meth:`save_pretrained` writes (adapter configs,
        weights and model card; not the base model) to the Hub repo ``repo_id`` in one commit,
        creating the repo when missing. Returns the commit (or pull request) URL."""
        del max_shard_size  # accepted as PEFT (through transformers' PushToHubMixin); adapter files are not sharded

        def save(folder):
            self.save_pretrained(folder, safe_serialization=safe_serialization, selected_adapters=selected_adapters)

        return saving.push_folder_to_hub(save, repo_id, commit_message=commit_message,
                                         commit_description=commit_description, private=private, token=token,
                                         revision=revision, create_pr=create_pr, tags=tags)

    # ----- running -------------------------------------------------------------------------------
    def forward(self, *args, adapter_names=None, **kwargs):
        return reading(self.base_model.model, self._forward, args, adapter_names, kwargs)

    def _forward(self, args, adapter_names, kwargs):
        model = self.base_model.model
        # PEFT's PeftModelFor<Task> (a task_type was given) calls its tuner, which adds AdaLoRA's
        # regularisation to the loss; a plain PeftModel calls the base model directly
        run = self.base_model._forward if self._task_type is not None else (lambda a, kw: model(*a, **kw))
        with alora.call_context(model, args, kwargs, adapter_names):  # aLoRA offsets from input_ids; pops alora_offsets=
            if adapter_names is None:
                return run(args, kwargs)
            with tuner.mixed_batch(model, adapter_names, repeat=False):  # one name per row, as in PEFT
                return run(args, kwargs)

    def generate(self, *args, adapter_names=None, **kwargs):
        return reading(self.base_model.model, self._generate, args, adapter_names, kwargs)

    def _generate(self, args, adapter_names, kwargs):
        model = self.base_model.model
        with alora.call_context(model, args, kwargs, adapter_names):
            if adapter_names is None:
                return model.generate(*args, **kwargs)
            with tuner.mixed_batch(model, adapter_names):  # a name per prompt row, repeated for beams / sequences
                return model.generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """The base model's (PEFT's PeftModelForCausalLM changes it only for prompt learning)."""
        return self.base_model.model.prepare_inputs_for_generation(*args, **kwargs)

    # ----- reporting -----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT's (bitsandbytes 4-bit values counted unpacked)."""
        return status.count_parameters(self)

    def get_layer_status(self) -> list:
        """PEFT's ``get_layer_status``: one ``TunerLayerStatus`` per adapter layer (fastpeft/status.py)."""
        return status.get_layer_status(self)

    def get_model_status(self):
        """PEFT's ``get_model_status``: the model's ``TunerModelStatus`` (fastpeft/status.py)."""
        return status.get_model_status(self)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters' parameters on or off, as PEFT's; an unknown name raises."""
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    @property
    def modules_to_save(self) -> set[str] | None:
        """The union of the adapters' ``modules_to_save`` (None when there are none), as PEFT's."""
        found = set()
        for config in self.peft_config.values():
            found.update(getattr(config, "modules_to_save", None) or ())
        return found or None

    @property
    def base_model_torch_dtype(self):
        return getattr(self.base_model.model, "dtype", None)

    @property
    def has_active_enabled_adapter(self) -> bool:
        """PEFT's (literal) rule: False only inside ``disable_adapter()`` with adapters active."""
        return not self._adapters_disabled or not self.active_adapters

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """As PEFT's: make the input embeddings' outputs require grad (so checkpointed blocks get
        gradients through frozen bases), except on quantized models."""
        if not any(getattr(model, f, False) for f in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            elif hasattr(model, "get_input_embeddings"):
                model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
        return model

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / max(a, 1):.4f}")

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_adapters_disabled"):
                if name == "_adapters_disabled":
                    return False
                raise
            # as PEFT: PeftModel -> its tuner (AdapterModel: LoraModel's methods) -> the model;
            # PEFT names fastpeft does not implement raise instead of reaching the model
            peft_api.refuse_unsupported(self, name, "PeftModel")
            return getattr(self.base_model, name)


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap ``model`` with a fresh adapter (PEFT's ``get_peft_model``, same parameters).

    ``revision``: recorded in the config (the base model's revision, saved with the adapter), as
    PEFT does. ``low_cpu_mem_usage`` changes nothing computed here. ``mixed=True`` (PEFT's
    ``PeftMixedModel``, adapters of different methods together) is not implemented: it raises."""
    if mixed:
        raise NotImplementedError("get_peft_model(mixed=True) (PEFT's PeftMixedModel) is not supported by fastpeft; "
                                  "one model holds adapters of one method")
    del low_cpu_mem_usage
    peft_config = as_fastpeft_config(peft_config)
    if revision is not None:
        peft_config.revision = revision
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)


# ``from_pretrained`` / ``load_adapter`` keywords: Hub ones pass on; these change nothing that is
# computed (the weights are copied into the layers, on their device); the rest are refused
_HUB_LOAD_KWARGS = ("cache_dir", "local_files_only")
_NO_EFFECT_KWARGS = ("low_cpu_mem_usage", "torch_device")
_REFUSED_UNLESS_DEFAULT = {"ephemeral_gpu_offload": False, "key_mapping": None, "ignore_mismatched_sizes": False,
                           "max_memory": None, "offload_folder": None, "offload_dir": None, "offload_index": None}


def _load_kwargs(kwargs: dict, where: str, model: nn.Module | None = None) -> dict:
    """The Hub keywords of ``kwargs``; raises for an option fastpeft does not implement or an
    unknown keyword (PEFT forwards unknown ones to the Hub, which rejects them there).

    ``device_map``: PEFT re-dispatches an accelerate-placed model with it so the new adapter is
    placed too. fastpeft's adapters live on their base layer's execution device
    (``nn._base_kinds.adapter_device``), so the model's placement stays as it is: accepted are
    ``"auto"`` and the model's own ``hf_device_map``; any other map (a new placement) raises."""
    hub = {k: kwargs.pop(k) for k in _HUB_LOAD_KWARGS if k in kwargs}
    for k in _NO_EFFECT_KWARGS:
        kwargs.pop(k, None)
    device_map = kwargs.pop("device_map", None)
    current = getattr(model, "hf_device_map", None)
    if device_map is not None and not (current is not None and (device_map == "auto" or device_map == current)):
        raise NotImplementedError(
            f"{where}(device_map={device_map!r}): fastpeft does not re-place models; place the base model first "
            "(accelerate / from_pretrained(device_map=...)): each adapter lives on its base layer's execution device"
        )
    for k, default in _REFUSED_UNLESS_DEFAULT.items():
        if k in kwargs and kwargs.pop(k) != default:
            raise NotImplementedError(f"{where}({k}=...) is not supported by fastpeft yet")
    if kwargs:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {sorted(kwargs)}")
    return hub
