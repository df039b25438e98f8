"""Adapter configs with PEFT's field names, defaults and JSON format.

``LoraConfig``, ``IA3Config`` and ``AdaLoraConfig`` accept every field that PEFT 0.21's
dataclasses have, so any ``adapter_config.json`` written by PEFT loads here and every file
written here loads in PEFT. Fields whose behaviour fastpeft does not implement (LoftQ, EVA,
CorDA, Megatron, ...) are accepted, kept and written back unchanged.

Validation happens in ``__post_init__``; errors name the field, the bad value and what would
be accepted.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import numbers
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

from .hub import AdapterFormatError, resolve_file

__all__ = [
    "CONFIG_NAME",
    "PeftType",
    "TaskType",
    "PeftConfig",
    "LoraConfig",
    "IA3Config",
    "AdaLoraConfig",
    "peft_type_name",
]

CONFIG_NAME = "adapter_config.json"


class PeftType(str, enum.Enum):
    """The adapter methods fastpeft implements (values as in PEFT's ``PeftType``)."""

    LORA = "LORA"
    IA3 = "IA3"
    ADALORA = "ADALORA"

    def __str__(self) -> str:
        return self.value


class TaskType(str, enum.Enum):
    """The task a model is adapted for (values as in PEFT's ``TaskType``)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


def peft_type_name(config) -> str:
    """``"LORA"``, ``"IA3"``, ``"ADALORA"``... for a fastpeft or a PEFT config (or a dict)."""
    value = config.get("peft_type") if isinstance(config, dict) else getattr(config, "peft_type", None)
    return str(getattr(value, "value", value))


# Keys PEFT writes that only matter at runtime; dropped with a warning when found in a file.
_RUNTIME_ONLY_KEYS = ("runtime_config",)
# Arguments of ``from_pretrained`` forwarded to the Hub resolution.
_HUB_KWARGS = ("cache_dir", "local_files_only")


# ----------------------------------------------------------------------------- validation helpers


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r} ({type(value).__name__}).")


def _check_positive_int(name: str, value) -> None:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_non_negative_int(name: str, value) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")


def _module_names(name: str, value) -> None | str | set[str]:
    """PEFT's normalisation of ``target_modules``-like fields: a list becomes a set, a str (a
    regex, or ``"all-linear"``) stays a str."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise TypeError(f"`{name}` must hold module names (str), got {bad[:3]!r}.")
        return set(value)
    raise TypeError(f"`{name}` must be None, a regex str or a list of module names, got {value!r}.")


def _plain(value):
    """A JSON-friendly deep copy: enums become their value, dataclasses become dicts."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, set):
        return {_plain(v) for v in value}
    return copy.deepcopy(value)


def _json_ready(value):
    """Sets become sorted lists (PEFT writes lists; sorting keeps files deterministic)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


# ----------------------------------------------------------------------------- base class


@dataclass
class PeftConfig:
    """Fields every adapter config has, plus loading and saving.

    ``PeftConfig.from_pretrained`` / ``from_dict`` return the subclass named by the file's
    ``peft_type``. ``to_dict()`` mirrors PEFT's (``target_modules`` etc. may be sets);
    ``save_pretrained`` writes ``adapter_config.json`` with sets as sorted lists.
    """

    task_type: str | TaskType | None = None
    peft_type: str | PeftType | None = None
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                raise ValueError(
                    f"Invalid `task_type` {self.task_type!r}; must be one of {[t.value for t in TaskType]}."
                ) from None
        _check_bool("inference_mode", self.inference_mode)
        for name in ("base_model_name_or_path", "revision", "peft_version"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"`{name}` must be a str or None, got {value!r}.")
        if self.auto_mapping is not None and not isinstance(self.auto_mapping, dict):
            raise TypeError(f"`auto_mapping` must be a dict or None, got {self.auto_mapping!r}.")

    # PEFT exposes these two on every config.
    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """All saved fields as a dict of plain values (enums as str); list-like module fields
        stay sets, as in PEFT. Runtime-only fields are left out."""
        return {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in _RUNTIME_ONLY_KEYS
        }

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write ``<save_directory>/adapter_config.json`` atomically (temp file + ``os.replace``).

        ``auto_mapping_dict=`` (as in PEFT) overrides the saved ``auto_mapping``.
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` must be a directory, but '{save_directory}' is a file.")
        os.makedirs(save_directory, exist_ok=True)
        output = _json_ready(self.to_dict())
        auto_mapping = kwargs.pop("auto_mapping_dict", None)
        if auto_mapping is not None:
            output["auto_mapping"] = auto_mapping
        text = json.dumps(output, indent=2, sort_keys=True)
        _atomic_write_text(os.path.join(save_directory, CONFIG_NAME), text)

    @classmethod
    def from_json_file(cls, path_json_file: str) -> dict[str, Any]:
        """Read a config JSON file and return its dict (as PEFT does).

        Raises ``AdapterFormatError`` (a ``ValueError``) naming the file when it is not valid
        JSON or not a JSON object. A ``runtime_config`` key is dropped with a warning.
        """
        try:
            with open(path_json_file, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterFormatError(f"'{path_json_file}' is not a valid JSON file: {exc}") from exc
        if not isinstance(data, dict):
            raise AdapterFormatError(
                f"'{path_json_file}' must hold a JSON object of config fields, got {type(data).__name__}."
            )
        for key in _RUNTIME_ONLY_KEYS:
            if key in data:
                warnings.warn(f"'{path_json_file}' contains `{key}`; it is ignored (runtime-only).", stacklevel=2)
                del data[key]
        return data

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **defaults) -> PeftConfig:
        """Build the config class named by ``config_dict["peft_type"]`` (or ``cls`` when the key is
        missing and ``cls`` is a concrete config class).

        Unknown keys are ignored with a warning that names them (PEFT does the same, for files
        from newer versions). ``defaults`` fill fields the dict lacks.
        """
        if not isinstance(config_dict, dict):
            raise TypeError(f"`config_dict` must be a dict, got {type(config_dict).__name__}.")
        data = {**defaults, **config_dict}
        config_cls = _config_class(data.get("peft_type"), cls)
        names = {f.name for f in dataclasses.fields(config_cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(
                f"Ignoring unknown keys {unknown} for {config_cls.__name__}; they were probably written by a "
                "newer version of PEFT.", stacklevel=2
            )
        return config_cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        **kwargs,
    ) -> PeftConfig:
        """Load ``adapter_config.json`` from a local folder or a Hub repo (see ``fastpeft.hub``).

        ``cache_dir`` and ``local_files_only`` go to the Hub resolution. Other keyword arguments
        that are config fields only fill fields missing from the file (as in PEFT); any other
        keyword argument is ignored.
        """
        hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        path = resolve_file(path_or_repo_id, CONFIG_NAME, subfolder=subfolder, revision=revision,
                            token=token, **hub_kwargs)
        data = cls.from_json_file(path)
        try:
            config_cls = _config_class(data.get("peft_type"), cls)
            known = {f.name for f in dataclasses.fields(config_cls) if f.init}
            return cls.from_dict(data, **{k: v for k, v in kwargs.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise AdapterFormatError(f"Invalid adapter config '{path}': {exc}") from exc


def _is_concrete(cls) -> bool:
    return cls in _CONFIG_CLASSES.values()


def _config_class(peft_type, fallback):
    if peft_type is None:
        if _is_concrete(fallback):
            return fallback
        raise ValueError(
            f"The config has no `peft_type`; expected one of {[t.value for t in PeftType]}."
        )
    key = peft_type.value if isinstance(peft_type, enum.Enum) else peft_type
    if key not in _CONFIG_CLASSES:
        raise ValueError(
            f"Unknown or unsupported `peft_type` {key!r}; fastpeft supports {[t.value for t in PeftType]}."
        )
    return _CONFIG_CLASSES[key]


def _atomic_write_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------- LoRA

_LORA_BIAS_VALUES = ("none", "all", "lora_only")


@dataclass
class LoraConfig(PeftConfig):
    """LoRA (and DoRA, rsLoRA, lora_bias) config; fields, defaults and JSON keys as PEFT's.

    Main fields: ``r`` (rank), ``lora_alpha`` (scaling is ``lora_alpha / r``, or
    ``lora_alpha / sqrt(r)`` with ``use_rslora``), ``target_modules`` (names matched exactly or as
    a ``.name`` suffix, a regex str matched with ``re.fullmatch``, or ``"all-linear"``),
    ``exclude_modules``, ``bias`` (``"none"``, ``"all"``, ``"lora_only"``), ``rank_pattern`` /
    ``alpha_pattern`` (regex key -> per-module r / alpha), ``layers_to_transform`` +
    ``layers_pattern``, ``modules_to_save``.
    """

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict | None = field(default_factory=dict)
    alpha_pattern: dict | None = field(default_factory=dict)
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    loftq_config: dict | Any = field(default_factory=dict)
    eva_config: dict | None = None
    corda_config: dict | None = None
    lora_ga_config: dict | None = None
    use_dora: bool = False
    velora_config: dict | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: dict | None = None
    layer_replication: list[tuple[int, int]] | None = None
    runtime_config: dict | None = None
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    use_bdlora: dict | None = None
    arrow_config: dict | None = None
    kasa_config: dict | None = None
    ensure_weight_tying: bool = False

    _PEFT_TYPE = PeftType.LORA

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = self._PEFT_TYPE
        self._check_lora_fields()
        self._check_lora_combinations()

    def _check_lora_fields(self) -> None:
        if self._PEFT_TYPE is PeftType.LORA:
            _check_positive_int("r", self.r)
        elif not _is_int(self.r):
            raise ValueError(f"`r` must be an integer, got {self.r!r}.")
        if not _is_number(self.lora_alpha):
            raise TypeError(f"`lora_alpha` must be a number, got {self.lora_alpha!r}.")
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"`lora_dropout` must be a number in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in _LORA_BIAS_VALUES:
            raise ValueError(f"`bias` must be one of {list(_LORA_BIAS_VALUES)}, got {self.bias!r}.")
        for name in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "use_qalora", "ensure_weight_tying"):
            _check_bool(name, getattr(self, name))
        if not isinstance(self.init_lora_weights, (bool, str)):
            raise TypeError(
                f"`init_lora_weights` must be True, False or the name of an init method, got {self.init_lora_weights!r}."
            )
        self.target_modules = _module_names("target_modules", self.target_modules)
        self.exclude_modules = _module_names("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise TypeError(f"`modules_to_save` must be a list of module names, got {self.modules_to_save!r}.")
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.target_parameters, str):
            raise TypeError("`target_parameters` must be a list of strings or None.")
        self._check_layers()
        self._check_patterns()
        for name in ("loftq_config", "eva_config", "corda_config", "lora_ga_config", "velora_config",
                     "monteclora_config", "use_bdlora", "arrow_config", "kasa_config", "runtime_config"):
            value = getattr(self, name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                setattr(self, name, _plain(value))  # e.g. a peft.LoftQConfig instance
            elif value is not None and not isinstance(value, dict):
                raise TypeError(f"`{name}` must be a dict or None, got {value!r}.")

    def _check_layers(self) -> None:
        idx = self.layers_to_transform
        if idx is not None and not _is_int(idx):
            if not isinstance(idx, (list, tuple)) or not all(_is_int(i) for i in idx):
                raise TypeError(f"`layers_to_transform` must be an int or a list of ints, got {idx!r}.")
            self.layers_to_transform = list(idx)
        pattern = self.layers_pattern
        if pattern is not None and not isinstance(pattern, str):
            if not isinstance(pattern, (list, tuple)) or not all(isinstance(p, str) for p in pattern):
                raise TypeError(f"`layers_pattern` must be a str or a list of str, got {pattern!r}.")
            self.layers_pattern = list(pattern)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")

    def _check_patterns(self) -> None:
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise TypeError(f"`{name}` must be a dict from module-name regex to value, got {value!r}.")
        for key, value in (self.alpha_pattern or {}).items():
            if not _is_number(value):
                raise TypeError(f"`alpha_pattern[{key!r}]` must be a number, got {value!r}.")
        if self._PEFT_TYPE is PeftType.LORA:
            for key, value in (self.rank_pattern or {}).items():
                _check_positive_int(f"rank_pattern[{key!r}]", value)

    def _check_lora_combinations(self) -> None:
        if self.use_dora and self.megatron_config:
            raise ValueError("DoRA does not support megatron_core, please set `use_dora=False`.")
        if self.init_lora_weights == "loftq":
            if not self.loftq_config:
                raise ValueError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
        elif self.loftq_config:
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.", stacklevel=3)
            self.loftq_config = {}
        if self.lora_bias:
            if self.init_lora_weights not in (True, False):
                raise ValueError(
                    "`lora_bias=True` is only supported with init_lora_weights=True or False, got "
                    f"init_lora_weights={self.init_lora_weights!r}."
                )
            if self.use_dora:
                raise ValueError("`lora_bias=True` is not supported for DoRA, please pass use_dora=False.")
        if self.alora_invocation_tokens is not None and self.task_type != TaskType.CAUSAL_LM:
            warnings.warn("aLoRA is currently only supported for CAUSAL_LM task.", stacklevel=3)


# ----------------------------------------------------------------------------- AdaLoRA


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA config (PEFT's fields). Layers start at rank ``init_r`` and the budget is pruned
    towards an average of ``target_r`` over ``total_step`` steps (``tinit`` warmup steps, ``tfinal``
    final steps, reallocation every ``deltaT`` steps). ``r`` is unused. After training,
    ``rank_pattern`` maps ``"<module path>.lora_E"`` to a boolean mask of kept ranks; the
    saved tensors hold only the kept ranks.
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict | None = None

    _PEFT_TYPE = PeftType.ADALORA

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora:
            raise ValueError("ADALORA does not support DoRA; set `use_dora=False`.")
        if self.loftq_config:
            raise ValueError("ADALORA does not support LoftQ; remove `loftq_config`.")
        if self.r != 8:
            warnings.warn("`r` is not used by AdaLoRA and is ignored; set the initial rank with `init_r`.", stacklevel=3)
        _check_positive_int("init_r", self.init_r)
        _check_positive_int("target_r", self.target_r)
        for name in ("tinit", "tfinal"):
            _check_non_negative_int(name, getattr(self, name))
        _check_positive_int("deltaT", self.deltaT)
        for name in ("beta1", "beta2", "orth_reg_weight"):
            if not _is_number(getattr(self, name)):
                raise TypeError(f"`{name}` must be a number, got {getattr(self, name)!r}.")
        if self.total_step is None or not _is_int(self.total_step) or self.total_step <= 0:
            raise ValueError(f"AdaLoRA needs `total_step` > 0 (the number of training steps), got {self.total_step!r}.")
        if self.orth_reg_weight < 0:
            raise ValueError(f"`orth_reg_weight` must be >= 0, got {self.orth_reg_weight!r}.")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"The schedule tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} leaves no "
                "budgeting phase; decrease `tfinal`/`tinit` or increase `total_step`."
            )
        for key, mask in (self.rank_pattern or {}).items():
            if not isinstance(mask, (list, tuple)) or not all(isinstance(m, (bool, int)) for m in mask):
                raise TypeError(f"AdaLoRA `rank_pattern[{key!r}]` must be a list of booleans (kept ranks), got {mask!r}.")


# ----------------------------------------------------------------------------- IA3


@dataclass
class IA3Config(PeftConfig):
    """(IA)^3 config (PEFT's fields). Each target module gets a learned scale vector: on its
    input for ``feedforward_modules`` (which must be among ``target_modules``), else on its
    output."""

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.IA3
        _check_bool("fan_in_fan_out", self.fan_in_fan_out)
        _check_bool("init_ia3_weights", self.init_ia3_weights)
        self.target_modules = _module_names("target_modules", self.target_modules)
        self.exclude_modules = _module_names("exclude_modules", self.exclude_modules)
        self.feedforward_modules = _module_names("feedforward_modules", self.feedforward_modules)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise TypeError(f"`modules_to_save` must be a list of module names, got {self.modules_to_save!r}.")
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set):
            extra = self.feedforward_modules - self.target_modules
            if extra:
                raise ValueError(
                    f"`feedforward_modules` should be a subset of `target_modules`; {sorted(extra)} are not in "
                    f"target_modules={sorted(self.target_modules)}."
                )


_CONFIG_CLASSES: dict[str, type] = {
    PeftType.LORA.value: LoraConfig,
    PeftType.IA3.value: IA3Config,
    PeftType.ADALORA.value: AdaLoraConfig,
}
