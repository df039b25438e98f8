"""``LoraConfig`` (LoRA, DoRA, rsLoRA, lora_bias) and ``AdaLoraConfig``: PEFT's fields and checks."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from ._base import PeftConfig, PeftType
from ._checks import (
    _check_bool,
    _check_finite,
    _check_non_negative_int,
    _check_positive_int,
    _is_int,
    _is_number,
    _module_names,
    _plain,
)
from ._fields import ADALORA_FIELDS, LORA_FIELDS

_LORA_BIAS_VALUES = ("none", "all", "lora_only")


@dataclass
class LoraConfig(PeftConfig):
    """LoRA (and DoRA, rsLoRA, lora_bias) config; fields, defaults and JSON keys as PEFT's.

    Main fields: ``r`` (rank), ``lora_alpha`` (scaling is ``lora_alpha / r``, or
    ``lora_alpha / sqrt(r)`` with ``use_rslora``), ``target_modules`` (names matched exactly or as
    a ``.name`` suffix, a regex str matched with ``re.fullmatch``, or ``"all-linear"``),
    ``exclude_modules``, ``bias`` (``"none"``, ``"all"``, ``"lora_only"``), ``rank_pattern`` /
    ``alpha_pattern`` (regex key -> per-module r / alpha), ``layers_to_transform`` +
    ``layers_pattern``, ``modules_to_save``, ``target_parameters`` (LoRA on ``nn.Parameter``
    tensors such as MoE expert stacks: :mod:`fastpeft.targeting_params`).

    Every PEFT field is accepted by name; what fastpeft does with each is in
    ``fastpeft.config._fields.LORA_FIELDS``; the LoRA variants aLoRA, Arrow, BD-LoRA and KaSA are
    in :mod:`fastpeft.nn.lora_variants`. Options fastpeft does not implement (VeLoRA, MonteCLoRA,
    ``ensure_weight_tying``, ...) raise ``UnsupportedConfigError`` naming the field.
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
    _FIELD_TABLE = LORA_FIELDS

    def _validate(self) -> None:
        super()._validate()
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
        _check_finite("lora_alpha", self.lora_alpha)
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
        negative = [i for i in ([idx] if _is_int(idx) else (idx or [])) if i < 0]
        if negative:
            raise ValueError(
                f"`layers_to_transform` holds negative indices {negative}: layer indices are matched as "
                "written (PEFT's rule), so a negative one would adapt no layer; give indices >= 0."
            )
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
            _check_finite(f"alpha_pattern[{key!r}]", value)
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
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.", stacklevel=5)
            self.loftq_config = {}
        if self.lora_bias:
            if self.init_lora_weights not in (True, False):
                raise ValueError(
                    "`lora_bias=True` is only supported with init_lora_weights=True or False, got "
                    f"init_lora_weights={self.init_lora_weights!r}."
                )
            if self.use_dora:
                raise ValueError("`lora_bias=True` is not supported for DoRA, please pass use_dora=False.")
        init = self.init_lora_weights
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and isinstance(init, str) and (
                init.startswith("pissa") or init in ("olora", "corda", "lora_ga")):  # PEFT's warning, as PEFT tests it
            warnings.warn("Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of "
                          "modified base weights PiSSA/CorDA/OLoRA/LoRA-GA means that you won't be able to pass "
                          "`path_initial_model_for_weight_conversion` to `save_pretrained` to restore the initial "
                          "values of the base weights", stacklevel=5)


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
    _FIELD_TABLE = ADALORA_FIELDS

    def _validate(self) -> None:
        super()._validate()
        if self.use_dora:
            raise ValueError("ADALORA does not support DoRA; set `use_dora=False`.")
        if self.loftq_config:
            raise ValueError("ADALORA does not support LoftQ; remove `loftq_config`.")
        if self.r != 8:
            warnings.warn("`r` is not used by AdaLoRA and is ignored; set the initial rank with `init_r`.", stacklevel=4)
        _check_positive_int("init_r", self.init_r)
        _check_positive_int("target_r", self.target_r)
        for name in ("tinit", "tfinal"):
            _check_non_negative_int(name, getattr(self, name))
        _check_positive_int("deltaT", self.deltaT)
        for name in ("beta1", "beta2", "orth_reg_weight"):
            if not _is_number(getattr(self, name)):
                raise TypeError(f"`{name}` must be a number, got {getattr(self, name)!r}.")
            _check_finite(name, getattr(self, name))
        for name in ("beta1", "beta2"):  # the allocator's moving averages: weights in [0, 1)
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"AdaLoRA `{name}` must be in [0, 1), got {getattr(self, name)!r}.")
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
