"""``PeftConfig`` (the fields every adapter config has, loading and saving) and the enums."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

from ..hub import AdapterFormatError, resolve_file
from ._checks import _check_bool, _json_ready, _plain
from ._fields import COMMON_FIELDS, UnsupportedConfigError, refuse_unsupported

CONFIG_NAME = "adapter_config.json"
# The PEFT release whose files fastpeft writes and is tested against (tests/test_config.py checks
# files both ways with it); saved as ``peft_version``, which PEFT fills with its own version.
PEFT_FORMAT_VERSION = "0.21.2"


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


# The concrete config classes by ``peft_type`` value (filled by ``fastpeft.config``).
_CONFIG_CLASSES: dict[str, type] = {}


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

    # what fastpeft does with each field (``fastpeft.config._fields``); subclasses set theirs
    _FIELD_TABLE = COMMON_FIELDS

    def __post_init__(self) -> None:
        if self.peft_version is None:  # as PEFT: the version of the file format written
            self.peft_version = PEFT_FORMAT_VERSION
        self._validate()
        # options fastpeft does not implement raise, after PEFT's own checks (same errors first)
        refuse_unsupported(self)
        object.__setattr__(self, "_fields_checked", True)

    def __setattr__(self, name: str, value) -> None:
        # an assignment after construction cannot switch on an option fastpeft does not implement
        if self.__dict__.get("_fields_checked"):
            refuse_unsupported(self, {name: value})
        object.__setattr__(self, name, value)

    def _validate(self) -> None:
        """Check and normalise the fields (each subclass adds its own, calling super first)."""
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
        text = self.to_json_text(kwargs.pop("auto_mapping_dict", None))
        _atomic_write_text(os.path.join(save_directory, CONFIG_NAME), text)

    def to_json_text(self, auto_mapping_dict: dict | None = None) -> str:
        """The text of ``adapter_config.json`` (sorted keys, sets as sorted lists, as PEFT);
        ``auto_mapping_dict`` replaces the saved ``auto_mapping``."""
        output = _json_ready(self.to_dict())
        if auto_mapping_dict is not None:
            output["auto_mapping"] = auto_mapping_dict
        return json.dumps(output, indent=2, sort_keys=True)

    def save_pretrained_to(self, path: str, auto_mapping_dict: dict | None = None) -> None:
        """Write the config's JSON to the file ``path`` (fastpeft/saving.py stages it there)."""
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_text(auto_mapping_dict))
            fh.flush()
            os.fsync(fh.fileno())

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
        except UnsupportedConfigError as exc:  # a valid file, for an option fastpeft does not implement
            raise UnsupportedConfigError(f"Adapter config '{path}': {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise AdapterFormatError(f"Invalid adapter config '{path}': {exc}") from exc


def as_fastpeft_config(config) -> PeftConfig:
    """``config`` itself when it is a fastpeft config; a PEFT config object (``peft.LoraConfig``,
    ``IA3Config``, ``AdaLoraConfig``) converted field by field to fastpeft's class of its
    ``peft_type``, with the same checks as a config read from a file (options fastpeft does not
    implement raise ``UnsupportedConfigError``). Anything else raises ``TypeError``."""
    if isinstance(config, PeftConfig):
        return config
    to_dict = getattr(config, "to_dict", None)
    if type(config).__module__.split(".")[0] == "peft" and callable(to_dict) and hasattr(config, "peft_type"):
        data = {k: v for k, v in to_dict().items() if k not in _RUNTIME_ONLY_KEYS}
        return PeftConfig.from_dict(data)
    raise TypeError(
        f"unsupported config type {type(config).__name__}; expected a LoraConfig, IA3Config or AdaLoraConfig "
        "(fastpeft's or peft's)"
    )


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


def _read_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: done once, at import (one thread then)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def ordinary_permissions(path: str) -> None:
    """Give a file made by ``tempfile.mkstemp`` (mode 0600) the mode ``open()`` would have given
    it: 0666 less the umask (0644 usually), as PEFT's files have. (The umask is read once, at
    import: reading it changes it for a moment, which another thread's new file would see.)"""
    os.chmod(path, 0o666 & ~_UMASK)


def _atomic_write_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        ordinary_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
