"""LoRA initializations that read the base weight or draw orthogonal factors, as PEFT 0.21's
``LoraLayer.update_layer`` computes them (``peft/tuners/lora/layer.py``): ``"pissa"``,
``"pissa_niter_<n>"``, ``"olora"`` and ``"orthogonal"``.

The maths (:func:`pissa`, :func:`olora`, :func:`orthogonal`) takes the base weight as ``[N, K]``
(out, in) in float32 and returns ``A [r, K]``, ``B [N, r]`` and, for the first two, the new base
weight ``[N, K]`` in float32, with PEFT's torch calls in PEFT's order, so the same torch seed
gives the same tensors, bit for bit. :func:`init_factors` is the layer glue (dtype and device
handling, refusals); :class:`fastpeft.nn.lora.LoraLinear` calls it from ``add_adapter``.

What PEFT does and fastpeft does the same way:

* ``pissa``: ``W = V diag(S) Uh`` (``torch.linalg.svd``, reduced); with ``Sr = S[:r] / scaling``:
  ``A = diag(sqrt(Sr)) @ Uh[:r]``, ``B = V[:, :r] @ diag(sqrt(Sr))`` and the base becomes the
  residual ``W - scaling * B @ A``. ``pissa_niter_<n>``: the same from
  ``torch.svd_lowrank(W, r, niter=n)`` (random: it draws from the generator of W's device).
  Float32/16/bf16 bases only (TypeError otherwise, as PEFT); Conv1D's ``[K, N]`` weight is
  transposed first (``fan_in_fan_out``).
* ``olora``: ``W = Q R`` (``torch.linalg.qr``, reduced), ``A = R[:r]``, ``B = Q[:, :r]`` and the
  base becomes ``W - scaling * B @ A``.
* ``orthogonal``: ``Q`` = QR of a ``[r, r]`` normal draw; ``A = (randn(K, r/2) @ Q[0::2]).T / 10``,
  ``B = randn(r/2, N).T @ Q[1::2] / 10`` (CPU generator); ``Q[1::2] @ Q[0::2].T = 0``, so
  ``B @ A = 0`` (up to rounding): a no-op with both factors non-zero; the base is unchanged;
  ``r`` even.

The weights are computed in float32, the new base weight is cast back to the base dtype, and A
and B pass through the base dtype (PEFT moves the new adapter to the base layer's dtype, then
``autocast_adapter_dtype`` upcasts bf16/fp16 adapters to float32). PEFT builds the adapter's
``nn.Linear`` modules on the CPU in the default dtype before initializing them (their default
init draws from the CPU generator); fastpeft builds them the same way so that the random draws
of ``pissa_niter_<n>`` and ``orthogonal`` (and of every later layer) see the same generator state.

Where fastpeft refuses what PEFT would do wrong or cannot be reproduced: ``olora`` on Conv1D
(PEFT factors the stored ``[K, N]`` weight without transposing, so A and B get each other's
shapes: a shape error at the first forward, or wrong outputs for a square layer), any of these on
a bitsandbytes base (PEFT refuses PiSSA, fails for orthogonal, and re-quantizes for OLoRA),
``lora_bias`` (PEFT's config refuses it too) and ``r`` above ``min(N, K)`` for pissa / olora
(PEFT silently keeps fewer rows than ``r``).

Embedding layers: PEFT's ``Embedding.update_layer`` has no branch for these values and gives the
adapter its default initialization (A = 0, B normal); :class:`fastpeft.nn.lora_embedding.LoraEmbedding`
does the same.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

# the values handled here, by PEFT's own tests (tuners/lora/layer.py update_layer): "pissa" and
# "pissa_niter_<n>" by prefix (case-sensitive), "olora" in any case, "orthogonal" exactly
_NITER = re.compile(r"pissa_niter_([0-9]+)")
_FLOAT_BASES = (torch.float32, torch.float16, torch.bfloat16)


def parse(value) -> tuple[str, int | None] | None:
    """``("pissa", None)``, ``("pissa", n)``, ``("olora", None)`` or ``("orthogonal", None)``
    for the ``init_lora_weights`` values this module implements; None for any other value
    (True, False, "gaussian", data-driven inits, unknown strings). Raises ValueError for a
    ``"pissa..."`` value that is neither ``"pissa"`` nor ``"pissa_niter_<digits>"`` (PEFT
    raises when it builds the layer)."""
    if not isinstance(value, str):
        return None
    if value.startswith("pissa"):
        if value == "pissa":
            return ("pissa", None)
        m = _NITER.fullmatch(value)
        if m is None:
            raise ValueError(
                f"init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]', got {value} instead."
            )
        return ("pissa", int(m.group(1)))
    if value.lower() == "olora":
        return ("olora", None)
    if value == "orthogonal":
        return ("orthogonal", None)
    return None


def changes_base(value) -> bool:
    """Whether ``init_lora_weights=value`` (one this module implements) rewrites the base weight."""
    method = parse(value)
    return method is not None and method[0] != "orthogonal"


# ----- the maths --------------------------------------------------------------------------------
def pissa(weight_nk: Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA from ``weight_nk [N, K]`` float32: ``(A [r, K], B [N, r], residual [N, K])``, all
    float32. ``niter=None``: the exact SVD (``torch.linalg.svd``); else the randomized one
    (``torch.svd_lowrank(weight_nk, r, niter=niter)``). ``scaling * B @ A`` is the top-r part of
    W, so ``residual + scaling * B @ A == W`` up to rounding."""
    if niter is None:
        V, S, Uh = torch.linalg.svd(weight_nk, full_matrices=False)
        Vr, Sr, Uhr = V[:, :r], S[:r] / scaling, Uh[:r]
    else:
        Vr, Sr, Ur = torch.svd_lowrank(weight_nk, r, niter=niter)
        Sr, Uhr = Sr / scaling, Ur.t()
    A = torch.diag(torch.sqrt(Sr)) @ Uhr
    B = Vr @ torch.diag(torch.sqrt(Sr))
    return A, B, weight_nk - scaling * B @ A


def olora(weight_nk: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """OLoRA from ``weight_nk [N, K]`` float32 (``W = Q R``): ``(A = R[:r] [r, K], B = Q[:, :r]
    [N, r], residual = W - scaling * B @ A [N, K])``, all float32."""
    Q, R = torch.linalg.qr(weight_nk)
    A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    return A, B, weight_nk - scaling * B @ A


def orthogonal(in_features: int, out_features: int, r: int) -> tuple[Tensor, Tensor]:
    """Random ``A [r, K]`` and ``B [N, r]`` (default dtype, CPU generator) built on the rows of a
    random orthogonal ``[r, r]`` basis (A on rows 0, 2, ..., B on rows 1, 3, ...), divided by 10;
    the two sets of rows are orthogonal, so ``B @ A = 0`` up to rounding (the adapter starts as
    a no-op, as with True, but both factors get gradients). ``r`` must be even (ValueError)."""
    if r % 2 != 0:
        raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    q_odd, q_even = Q[0::2, :], Q[1::2, :]
    A = torch.randn(in_features, r // 2).mm(q_odd).T / 10.0
    B = torch.randn(r // 2, out_features).T.mm(q_even) / 10.0
    return A.contiguous(), B.contiguous()


# ----- the layer glue -----------------------------------------------------------------------------
def check_layer(layer, method: str, r: int, lora_bias: bool) -> None:
    """Raise (before anything changes) when ``layer`` (a :class:`LoraLinear`) cannot take
    ``method`` as PEFT computes it; see the module docstring."""
    where = f"init_lora_weights={method!r} on {type(layer.base_layer).__name__}"
    if lora_bias:
        raise ValueError(f"{where}: lora_bias=True is only supported with init_lora_weights=True or False (as in PEFT)")
    if layer.kind == "quant":
        raise TypeError(f"{where}: not supported on a bitsandbytes (quantized) base; initialize on the float32, "
                        "float16 or bfloat16 model, then quantize the residual model (PEFT's PiSSA advice)")
    if layer.kind not in ("linear", "conv1d"):
        raise ValueError(f"Unknown initialization init_lora_weights={method!r} for a {layer.kind} base layer")
    dtype = layer.base_layer.weight.dtype
    if method == "pissa" and dtype not in _FLOAT_BASES:
        raise TypeError("Please initialize PiSSA under float32, float16, or bfloat16. "
                        "Subsequently, re-quantize the residual model to help minimize quantization errors.")
    if method == "olora":
        if dtype not in _FLOAT_BASES:
            raise TypeError(f"Unsupported data type for the base layer. Got {dtype}.")
        if layer.fan_in_fan_out:
            raise ValueError(f"{where}: PEFT's OLoRA factors Conv1D's stored [in, out] weight without transposing "
                             "it, so its A and B get the wrong shapes (a shape error, or wrong outputs for a square "
                             "layer); fastpeft refuses it. Use 'pissa' or target nn.Linear layers")
    if method == "orthogonal":
        if r % 2 != 0:
            raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")
        if not dtype.is_floating_point:
            raise TypeError(f"{where}: the base weight is {dtype}, not floating point")
    elif r > min(layer.in_features, layer.out_features):
        raise ValueError(f"{where}: r={r} is larger than min(in_features, out_features) = "
                         f"{min(layer.in_features, layer.out_features)}; PEFT would keep fewer rows than r")


def _weight_f32_nk(layer) -> Tensor:
    """The base weight as PEFT hands it to the SVD / QR: float32 (a copy unless it is float32
    already), ``[N, K]`` (a transposed view for Conv1D)."""
    W = layer.base_layer.weight.detach().to(torch.float32)
    return W.t() if layer.fan_in_fan_out else W


def init_factors(layer, method: str, niter: int | None, r: int, scaling: float, dtype: torch.dtype):
    """The ``lora_A`` / ``lora_B`` modules of a new adapter of ``layer`` initialized by
    ``method`` (call :func:`check_layer` first), on the base weight's device in ``dtype``; for
    pissa / olora the base weight is replaced by the residual (``layer._set_base_weight``).

    As PEFT: the modules are built on the CPU in the default dtype (the generator draws of their
    default init), the factors are computed in float32, then pass through the base dtype."""
    K, N = layer.in_features, layer.out_features
    lora_A = nn.Linear(K, r, bias=False)
    lora_B = nn.Linear(r, N, bias=False)
    W = layer.base_layer.weight
    with torch.no_grad():
        if method == "orthogonal":
            A, B = orthogonal(K, N, r)
        else:
            Wf = _weight_f32_nk(layer)
            A, B, residual = pissa(Wf, r, scaling, niter) if method == "pissa" else olora(Wf, r, scaling)
            layer._set_base_weight(residual.to(W.dtype))
        for module, value in ((lora_A, A), (lora_B, B)):
            module.to(device=W.device, dtype=dtype)
            module.weight.copy_(value.to(device=W.device, dtype=W.dtype))
    return lora_A, lora_B


# ----- undo of a base rewrite (tuner.inject's all-or-nothing) ------------------------------------------
def remember_base(layer, name: str, init, r: int, lora_bias: bool = False) -> None:
    """Before ``layer.add_adapter(name, ..., init_lora_weights=init)`` inside an injection: when
    ``init`` rewrites the base weight, check the layer (:func:`check_layer`, so a refusal comes
    before any copy) and keep a copy of its base weight in CPU memory, so that a failed injection
    puts it back (:func:`restore_base`, run when the rollback deletes the adapter). Released by
    :func:`forget_base_copies` once the injection succeeded (:func:`after_success`)."""
    if not changes_base(init):
        return
    check_layer(layer, parse(init)[0], r, lora_bias)
    copies = layer.__dict__.setdefault("_init_base_copies", {})
    copies[name] = layer.base_layer.weight.detach().to("cpu", copy=True)


def restore_base(layer, name: str) -> None:
    """Write back the base weight kept by :func:`remember_base` for ``name`` (if any)."""
    kept = layer.__dict__.get("_init_base_copies", {}).pop(name, None)
    if kept is not None:
        W = layer.base_layer.weight
        with torch.no_grad():
            W.copy_(kept.to(W.device))
        layer.bank.drop_plans()


def forget_base_copies(model: nn.Module, name: str) -> None:
    """Drop the copies :func:`remember_base` kept for adapter ``name`` (the injection succeeded)."""
    for m in model.modules():
        copies = m.__dict__.get("_init_base_copies")
        if copies:
            copies.pop(name, None)


def after_success(model: nn.Module, name: str, finish):
    """``finish`` (tuner.inject's last step, or None) followed by :func:`forget_base_copies`:
    the copies live exactly as long as the injection can still be rolled back."""

    def run():
        if finish is not None:
            finish()
        forget_base_copies(model, name)

    return run
