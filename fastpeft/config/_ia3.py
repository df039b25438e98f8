"""``IA3Config``: (IA)^3, PEFT's fields and checks."""

from __future__ import annotations

from dataclasses import dataclass

from ._base import PeftConfig, PeftType
from ._checks import _check_bool, _module_names
from ._fields import IA3_FIELDS


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

    _FIELD_TABLE = IA3_FIELDS

    def _validate(self) -> None:
        super()._validate()
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
