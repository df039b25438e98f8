"""Loader of ``fastpeft._fastpath``: the eager decode fast path of the LoRA layers in C++.

``LoraLinear`` keeps, after a forward through its general path, a *plan*: the arguments of its
fused operator and the conditions under which they stay valid. Calling the plan runs the
layer. When the compiled module is there and the layer's backend is the compiled operator
(``native_adapter_linear``, CPU and CUDA kernels of ``fastpeft._C``), the plan is a C++
``LinearPlan`` (``csrc/fastpath.cpp``): no Python body and no boxed ``torch.ops`` call per
forward. Otherwise it is :class:`PyPlan`, the same checks in Python around whatever backend
:func:`fastpeft.ops.backends.resolve` picks.

Both kinds return the layer's output, or None when the plan no longer applies (a gradient is
needed; a parameter or module of the layer was replaced, e.g. ``lora_B["a"].weight =
nn.Parameter(...)`` or ``load_state_dict(assign=True)``, seen by identity checks
``container[key] is object`` on the modules' ``_parameters``/``_modules`` dicts; a tensor's
storage was swapped (``.data = ...``); a tensor the plan holds a copy of was written to; or
the backend choice changed); the layer then drops the plan and takes its general path.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
from torch import Tensor

from . import backends

log = logging.getLogger("fastpeft")

#: the compiled module, or None
module = None
#: why the compiled fast path is not used (None when it loaded)
error: str | None = None

# Below the autograd keys: the compiled backends register their autograd from Python
# (torch.library.register_autograd), which costs ~7 us a call on a 2-core CPU even when no
# gradient is needed (measured at a 512-wide decode step: 37.2 -> 30.4 us). Plans use it only
# when no input or parameter needs a gradient.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
if _below_autograd is None:  # pragma: no cover - torch without the guard
    import contextlib as _contextlib

    _below_autograd = _contextlib.nullcontext


_epoch = 0  # plans made before the last retire_all_plans() decline


def retire_all_plans() -> None:
    """Make every existing plan decline (called when the backend choice changes)."""
    global _epoch
    _epoch += 1
    if module is not None:
        module.bump_epoch()


def _load() -> None:
    global module, error
    from .. import _ext

    if not _ext.available():
        error = f"fastpeft._C is not available: {_ext.error}"
        return
    if importlib.util.find_spec("fastpeft._fastpath") is None:  # its build failed or was skipped
        error = f"fastpeft._fastpath is not built; {_ext.BUILD_HINT}"
        log.info("fastpeft: compiled fast path unavailable: %s", error)
        return
    try:
        from .. import _fastpath  # type: ignore[attr-defined]
    except Exception as e:  # noqa: BLE001  (built against another torch, or broken)
        error = f"fastpeft._fastpath does not load ({type(e).__name__}: {e}); {_ext.BUILD_HINT}"
        log.info("fastpeft: compiled fast path unavailable: %s", error)
        return
    module = _fastpath


class PyPlan:
    """The fast path in Python: same checks and result as the C++ ``LinearPlan``."""

    __slots__ = ("grad_params", "ptr_ts", "ptrs", "ver_ts", "vers", "checks", "K", "N", "devtype", "args", "epoch")

    def __init__(self, grad_params, ptr_tensors, version_tensors, identity_checks, in_features, out_features,
                 weight, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale):
        self.grad_params = grad_params
        self.checks = identity_checks
        self.ptr_ts = ptr_tensors
        self.ptrs = [t.data_ptr() for t in ptr_tensors]
        self.ver_ts = version_tensors
        self.vers = [t._version for t in version_tensors]
        self.K, self.N = in_features, out_features
        self.devtype = weight.device.type
        self.args = (weight, bias, lora_a, lora_b, slot_scales, token_slots, dora_scale)
        self.epoch = _epoch

    def __call__(self, x: Tensor, token_slots: Tensor | None = None) -> Tensor | None:
        if (
            self.epoch != _epoch
            or x.dim() == 0 or x.shape[-1] != self.K
            or (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.grad_params)))
            or [t.data_ptr() for t in self.ptr_ts] != self.ptrs
            or [t._version for t in self.ver_ts] != self.vers
            or not all(d.get(k) is v for d, k, v in self.checks)
        ):
            return None
        W, bias, a, bt, scales, ts, dora = self.args
        ts = token_slots if token_slots is not None else ts
        if ts is None:
            return None
        fn = backends.resolve("adapter_linear", self.devtype)
        x2 = x.reshape(-1, self.K)
        with _below_autograd():  # nothing needs a gradient (checked above)
            y = fn(x2, W, bias, a, bt, scales, ts, dora, None, None)
        return y.view(*x.shape[:-1], self.N)


def make_plan(grad_params, ptr_tensors, version_tensors, identity_checks, in_features, out_features, weight,
              bias, lora_a, lora_b, slot_scales, token_slots, dora_scale):
    """A plan for a LoRA linear layer: the C++ ``LinearPlan`` when the compiled fast path is
    loaded and the backend for the weight's device is the compiled operator, else a
    :class:`PyPlan`. Arguments: what a gradient could flow to; tensors whose storage must not
    move; tensors that must not be written (copies in the stacks); ``(dict, key, object)``
    identity checks; then the operator's arguments (``token_slots`` None for mixed batches,
    whose slots come with each call)."""
    args = (grad_params, ptr_tensors, version_tensors, identity_checks, in_features, out_features, weight, bias,
            lora_a, lora_b, slot_scales, token_slots, dora_scale)
    if module is not None:
        from . import cpp

        if backends.resolve("adapter_linear", weight.device.type) is cpp.native_op("native_adapter_linear"):
            return module.LinearPlan(*args)
    return PyPlan(*args)


_load()
backends.add_listener(retire_all_plans)
