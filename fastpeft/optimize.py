"""``fastpeft.optimize(model)``: PEFT's adapter layers replaced in place by fastpeft's fused ones.

Takes a model adapted by the ``peft`` library itself (a ``peft.PeftModel``, or a Transformers
model whose adapters came through its ``load_adapter`` / ``add_adapter``) and swaps each
supported PEFT layer for a fastpeft layer that

* wraps the **same** base module (no copy of the base weights: ``data_ptr`` is unchanged);
* holds the **same** adapter modules and ``nn.Parameter`` objects (``lora_A.<name>`` etc.): an
  optimizer or any other reference to them stays valid; their storage moves into the layer's
  per-slot stacks (``param.data`` becomes a view of the stack, so adapter memory is held once);
* keeps the adapter names, their order, the active adapters, the scaling (also after
  ``set_scale``), the disabled state, dropout modules, ``requires_grad`` flags and forward hooks;
* gives the same outputs (fp32: equal to PEFT's unfused computation up to rounding).

The new layers (:mod:`fastpeft.nn.peft_layers`: ``OptimizedLoraLinear``,
``OptimizedLoraEmbedding``, ``OptimizedAdaLoraLinear``, ``OptimizedIA3Linear``, each made by
``from_peft(peft_layer)``) are registered as (virtual) subclasses of PEFT's layer classes
(``peft.tuners.lora.LoraLayer``, ``AdaLoraLayer``, ``IA3Layer``; ``abc.ABCMeta.register``) and
implement PEFT's layer methods with PEFT's signatures, so PEFT's and Transformers' model-level
code keeps driving them: ``set_adapter``, ``disable_adapter()``, ``enable/disable_adapters``,
``active_adapters``, ``forward/generate(adapter_names=...)`` (PEFT's forward hooks pass
``adapter_names`` to each layer), ``merge_adapter`` / ``unmerge_adapter`` /
``merge_and_unload``, ``delete_adapter``, ``save_pretrained`` (same state-dict keys), and
adapters added later through PEFT's ``add_adapter`` / ``load_adapter`` (PEFT's injection finds
an existing layer and calls its ``update_layer``, which adds the adapter to the fastpeft layer).

What is replaced (PEFT 0.21): ``peft.tuners.lora.layer.Linear`` (LoRA, rsLoRA, DoRA,
``lora_bias``) and ``peft.tuners.lora.layer.Embedding`` (LoRA) on ``nn.Linear``, Transformers
``Conv1D`` and ``nn.Embedding`` bases; ``peft.tuners.adalora.layer.SVDLinear``;
``peft.tuners.ia3.layer.Linear``. PEFT's ``ModulesToSaveWrapper`` is **kept**: it runs a full
copy of a module, there is nothing to fuse, and PEFT's saving/loading code recognises it by its
class (``fastpeft.mixed_batch`` passes it the per-row names). Any other PEFT layer (other LoRA
variants, quantized-base PEFT classes, convolutions, other tuners) is left as it is and still
works through PEFT; ``strict=True`` turns that into an error.

Merged layers are refused (``ValueError`` naming them): unmerge first (``unmerge_adapter()``),
or call ``merge_and_unload()`` if you do not need the adapters any more. The check runs on every
layer before anything is replaced, so a failed call leaves the model untouched.
"""
from __future__ import annotations

import warnings

from torch import nn

from ._progress import progress
from .nn.base import AdapterLayer
from .nn.lora import LoraLinear
from .nn.peft_layers import peft_classes, register_with_peft, unsupported_reason

__all__ = ["optimize", "prepare"]


def _replace_everywhere(model: nn.Module, mapping: dict) -> None:
    """Put ``mapping[id(old)]`` wherever ``old`` is a child (shared modules included)."""
    for parent in list(model.modules()):
        for cname, child in list(parent._modules.items()):
            if child is not None and id(child) in mapping:
                setattr(parent, cname, mapping[id(child)])


def prepare(model: nn.Module) -> nn.Module:
    """Pack the adapter stacks of every fastpeft layer now (and DoRA's scales), so that the
    next call does not pay for it and ``torch.compile`` finds them ready (a compiled forward
    cannot repack: with stale stacks it runs the unfused path). Returns ``model``."""
    for m in model.modules():
        if isinstance(m, AdapterLayer) and m._adapters and hasattr(m, "_pack") and not m.merged:
            if not m.bank.stale:
                continue
            m._pack()
            if isinstance(m, LoraLinear) and m._has_dora():
                m._dora_scale()
    return model


def optimize(model: nn.Module, *, strict: bool = False, pack: bool = True, progressbar: bool | None = None) -> nn.Module:
    """Replace PEFT's adapter layers of ``model`` by fastpeft's fused layers, in place.

    ``model``: a ``peft.PeftModel``, a Transformers model with PEFT adapters (``load_adapter``),
    or any module containing PEFT tuner layers. Returns ``model`` (the same object).

    ``strict``: raise instead of warning when a PEFT layer cannot be replaced (it is then left
    as it is and keeps working through PEFT). ``pack``: build the fused stacks now
    (:func:`prepare`) rather than on the first forward. ``progressbar``: a bar over the layers
    (None: only for more than 64 of them; ``HF_HUB_DISABLE_PROGRESS_BARS=1`` hides it).

    Raises ``ValueError`` (before changing anything) for merged layers.
    """
    try:
        import peft  # noqa: F401
    except ImportError:  # nothing made by peft can be in the model
        return model
    register_with_peft()
    classes = peft_classes()
    from peft.tuners.tuners_utils import BaseTunerLayer

    plan, merged, skipped = [], [], []
    seen = set()
    for path, m in model.named_modules():
        if id(m) in seen or isinstance(m, AdapterLayer):
            continue
        seen.add(id(m))
        cls = classes.get(type(m))
        if cls is None:
            if isinstance(m, BaseTunerLayer):
                skipped.append((path, f"{type(m).__module__}.{type(m).__name__} has no fastpeft counterpart"))
            continue
        if m.merged:
            merged.append(path)
            continue
        reason = unsupported_reason(cls, m)
        if reason is not None:
            skipped.append((path, reason))
            continue
        plan.append((path, cls, m))
    if merged:
        raise ValueError(
            f"fastpeft.optimize: {len(merged)} layer(s) have adapters merged into the base weights, e.g. "
            f"{merged[:3]}; call unmerge_adapter() first (or merge_and_unload() if the adapters are no longer needed)"
        )
    if skipped:
        msg = "; ".join(f"{p}: {r}" for p, r in skipped[:5]) + (f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else "")
        if strict:
            raise ValueError(f"fastpeft.optimize(strict=True): {len(skipped)} PEFT layer(s) cannot be replaced: {msg}")
        warnings.warn(f"fastpeft.optimize: {len(skipped)} PEFT layer(s) left as they are (they still work): {msg}", stacklevel=2)
    mapping = {id(m): cls.from_peft(m) for _, cls, m in progress(plan, "Optimizing PEFT layers", enabled=progressbar)}
    _replace_everywhere(model, mapping)
    if pack:
        prepare(model)
    _reoptimize_after_adding(model, strict)
    return model


_reoptimizing_classes: dict = {}


def _reoptimize_after_adding(model: nn.Module, strict: bool) -> None:
    """Give ``model`` (a ``peft.PeftModel`` or a Transformers model) ``add_adapter`` and
    ``load_adapter`` methods that call the originals, then :func:`optimize` again: an adapter on
    a layer that is already fastpeft's goes in through ``update_layer``; one on a module that had
    no adapter yet gets a PEFT layer from PEFT's injection, which this turns into fastpeft's."""
    model._fastpeft_strict = strict
    cls = type(model)
    if getattr(cls, "_fastpeft_reoptimizes", False):
        return
    names = [n for n in ("add_adapter", "load_adapter") if callable(getattr(cls, n, None))]
    if not names:
        return
    new_cls = _reoptimizing_classes.get(cls)
    if new_cls is None:
        attrs = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_fastpeft_reoptimizes": True,
                 "__reduce_ex__": _reduce_reoptimizing}
        for n in names:
            attrs[n] = _reoptimizing(getattr(cls, n))
        new_cls = type(cls.__name__, (cls,), attrs)
        _reoptimizing_classes[cls] = new_cls
    model.__class__ = new_cls


def _reduce_reoptimizing(self, protocol):
    """Pickle support: the class made by :func:`_reoptimize_after_adding` cannot be pickled by
    reference (it carries its base's name), so the model is pickled as its base class and
    turned back into the re-optimizing class when unpickled."""
    base = type(self).__mro__[1]
    return _unpickle_reoptimizing, (base, self.__getstate__())


def _unpickle_reoptimizing(base: type, state: dict) -> nn.Module:
    model = base.__new__(base)
    model.__setstate__(state)
    _reoptimize_after_adding(model, getattr(model, "_fastpeft_strict", False))
    return model


def _reoptimizing(original):
    def method(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        # pack=False: adding many adapters one by one must not repack every layer each time;
        # the stacks are packed on the next forward (or by prepare(), before torch.compile)
        optimize(self, strict=getattr(self, "_fastpeft_strict", False), pack=False)
        return out

    method.__name__ = original.__name__
    method.__doc__ = original.__doc__
    return method


# ``fastpeft/__init__.py`` binds ``fastpeft.optimize`` to the function above; this makes
# ``fastpeft.optimize.prepare(model)`` reach the helper too.
optimize.prepare = prepare
