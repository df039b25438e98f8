"""PEFT 0.21's LoRA variants on fastpeft's :class:`~fastpeft.nn.lora.LoraLinear`, one file each:

* :mod:`.alora` (``alora_invocation_tokens``, Activated LoRA): the adapter acts only on the tokens
  from the last occurrence of its invocation tokens on; the per-row offsets come from
  :func:`.alora.offsets_context` around the model call;
* :mod:`.arrow` (``arrow_config``): a router adapter mixing the layer's other LoRA adapters per
  token (top-k by prototype similarity), with General Knowledge Subtraction;
* :mod:`.bdlora` (``use_bdlora``): block-diagonal ``lora_A`` or ``lora_B``;
* :mod:`.kasa` (``kasa_config``): the base weight loses its ``r`` smallest singular components and
  ``delta = s * B diag(lora_diag) A``.

A variant is an object per (layer, adapter) in ``layer._lora_variants[name]`` (not PEFT's
``lora_variant`` attribute: fastpeft.optimize's layers keep PEFT's objects there). The layer asks
it for the effective factors (``a_weight [r, K]``, ``b_weight [N, r]``: what the fused operator
and merging use when ``fused``), the unfused delta of a call (``delta``) and whether merging is
allowed. ``fastpeft.tuner`` calls :func:`before_inject` (model-level checks), :func:`prepare`
(per layer, before anything changes) and :func:`attach` (after ``add_adapter``).
"""
from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from ..bank import Entry

# the LoraConfig fields that select a variant, in PEFT's lora_variants order
OPTIONS = ("arrow_config", "use_bdlora", "alora_invocation_tokens", "kasa_config")


def sub_config(value) -> dict:
    """A variant's sub-config as a plain dict (fastpeft configs hold dicts; a PEFT dataclass
    assigned after construction is converted here)."""
    if value is None:
        return {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return dict(value) if isinstance(value, dict) else value


def requested(config) -> list[str]:
    """The variant options ``config`` switches on (PEFT's test: the tokens list is truthy; a
    sub-config, even ``{}``, becomes a dataclass instance in PEFT, so any non-None value)."""
    out = []
    for name in OPTIONS:
        value = getattr(config, name, None)
        if (bool(value) if name == "alora_invocation_tokens" else value is not None):
            out.append(name)
    return out


class LoraVariant:
    """Base of the variants: plain LoRA behaviour, overridden per variant.

    ``option``: the LoraConfig field; ``fused``: the fused operator may compute it from
    :meth:`a_weight` / :meth:`b_weight` (else the layer always runs the unfused route);
    ``kinds``: the base kinds it supports (``fastpeft.nn._base_kinds.base_kind``)."""

    option = ""
    fused = True
    kinds: tuple = ("linear",)

    def attach(self, layer, name: str, config, loading: bool) -> None:
        """Build the variant's parameters on ``layer`` (after plain ``add_adapter``)."""

    def a_weight(self, layer, name: str) -> Tensor:
        return layer.lora_A[name].weight

    def b_weight(self, layer, name: str) -> Tensor:
        return layer.lora_B[name].weight

    def watched(self, layer, name: str) -> tuple:
        """The parameters the effective factors are computed from."""
        return (layer.lora_A[name].weight, layer.lora_B[name].weight)

    def entry(self, layer, name: str) -> Entry:
        """The bank's row: effective factors as a copy (never views of the stacks)."""
        return Entry(self.a_weight(layer, name), self.b_weight(layer, name), layer._scale(name),
                     self.watched(layer, name), alias=False)

    def delta(self, layer, name: str, x: Tensor, result: Tensor, where=None) -> Tensor:
        """The adapter's contribution to ``result`` (the base output, or the running sum) on
        input ``x [..., K]``; ``where``: None when ``x`` is the call's whole batch, else
        ``(row indices, batch size)`` of the mixed batch rows ``x`` holds."""
        xl = x.to(layer.lora_A[name].weight.dtype)
        return layer._lora_out(name, xl) * layer._scale(name)

    def check_merge(self, name: str) -> None:
        """Raise when the adapter cannot be merged (PEFT's error)."""

    def detach(self, layer, name: str) -> None:
        """The adapter is being removed from ``layer``."""

    def on_adapter_added(self, layer, name: str) -> None:
        """Adapter ``name`` (any) was just added to ``layer``."""


def _variant_class(option: str):
    if option == "alora_invocation_tokens":
        from .alora import ALoraVariant
        return ALoraVariant
    if option == "kasa_config":
        from .kasa import KasaVariant
        return KasaVariant
    if option == "use_bdlora":
        from .bdlora import BdLoraVariant
        return BdLoraVariant
    from .arrow import ArrowVariant
    return ArrowVariant


def before_inject(model: nn.Module, configs: dict, adapter_name: str, config, finish):
    """Model-level checks of a new LoRA adapter with a variant (before anything changes), as
    PEFT: one variant per adapter (DoRA counts), no ``target_parameters`` with a variant, KaSA
    adapters not next to non-KaSA ones. Returns ``finish`` (tuner.inject's last step), wrapped
    for KaSA so that the base weight copies kept for a rollback are dropped on success."""
    wanted = requested(config)
    if getattr(config, "use_dora", False) and wanted:
        wanted = ["use_dora", *wanted]
    if len(wanted) > 1:
        raise ValueError(f"Invalid or unsupported variant combination: {tuple(sorted(wanted))} (PEFT refuses it "
                         "too: one LoRA variant per adapter)")
    if wanted and getattr(config, "target_parameters", None) and wanted[0] != "use_dora":
        raise ValueError(f"`{wanted[0]}` cannot be used with `target_parameters` (PEFT's ParamWrapper layers do not "
                         "work with LoRA variants)")
    uses_kasa = getattr(config, "kasa_config", None) is not None
    for other_name, other in configs.items():
        if (getattr(other, "kasa_config", None) is not None) is not uses_kasa:
            raise ValueError(
                "KaSA cannot be combined with adapters that don't use KaSA, since KaSA modifies the base "
                f"weights: the new adapter {'uses' if uses_kasa else 'does not use'} KaSA but adapter "
                f"'{other_name}' {'does not' if uses_kasa else 'does'}."
            )
    if uses_kasa:
        from .. import lora_init

        return lora_init.after_success(model, adapter_name, finish)
    return finish


def prepare(layer, path: str, config, r: int):
    """The variant object adapter ``config`` needs on ``layer`` (at module ``path``, rank ``r``),
    or None for plain LoRA; raises (nothing changed yet) where PEFT refuses or fastpeft does
    not implement the variant on this kind of layer."""
    wanted = requested(config)
    if not wanted:
        return None
    option = wanted[0]
    from ..lora import LoraLinear

    kind = getattr(layer, "kind", None)
    cls = _variant_class(option)
    if not isinstance(layer, LoraLinear) or kind not in cls.kinds or getattr(layer, "_tp", None) is not None:
        raise ValueError(
            f"`{option}` on module {path!r} ({type(layer.base_layer).__name__}): this LoRA variant is not supported "
            f"by fastpeft on this kind of layer yet (it is on: {', '.join(cls.kinds)} bases, not tensor-parallel "
            "ones); exclude the module from target_modules"
        )
    return cls.prepare(layer, path, config, r)


def attach(layer, variant, name: str, config, loading: bool) -> None:
    """Install ``variant`` (from :func:`prepare`, or None) for adapter ``name`` just added to
    ``layer``, then tell the layer's other variants (Arrow follows the set of adapters)."""
    variants = layer.__dict__.get("_lora_variants")
    if variant is not None:
        variants[name] = variant
        variant.attach(layer, name, config, loading)
        layer.bank.mark_stale()
        layer.set_adapter(layer._active)  # the variant's parameters get the adapter's trainability
    for v in list(variants.values()):
        v.on_adapter_added(layer, name)


def check_merge(layer, names) -> None:
    """Raise (before anything merges) when one of ``names`` has a variant that cannot merge."""
    variants = layer.__dict__.get("_lora_variants") or {}
    for n in names:
        if n in variants:
            variants[n].check_merge(n)


def detach(layer, name: str) -> None:
    v = (layer.__dict__.get("_lora_variants") or {}).pop(name, None)
    if v is not None:
        v.detach(layer, name)
