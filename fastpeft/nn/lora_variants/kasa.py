"""KaSA (``kasa_config``, Knowledge-aware Singular-value Adaptation), as PEFT 0.21 computes it.

Adding a KaSA adapter of rank ``r`` to a layer (new *or loaded*, as PEFT's ``update_layer``)
replaces the base weight ``W [N, K]`` by its rank ``min(N, K) - r`` truncation: ``U, S, Vh =
svd(float32(W))`` (reduced), ``W <- (U[:, :k-r] * S[:k-r]) @ Vh[:k-r]`` cast back to W's dtype.
The adapter adds a learnable ``lora_diag [r]`` (PEFT's ``ParameterDict`` ``lora_diag``: state
key ``<P>.lora_diag.<name>``, file key ``<P>.lora_diag``; ``randn`` for a new adapter) and
computes ``delta = s * B diag(lora_diag) A``: the fused operator and merging use the effective
factors ``A [r, K]`` and ``B * lora_diag [N, r]``; the unfused route runs PEFT's
``lora_B(lora_A(dropout(x)) * lora_diag) * s``.

As in PEFT: the truncation is not undone by disabling, deleting or unloading the adapter (a failed
injection is rolled back: tuner.inject keeps the weight until it succeeds); KaSA and non-KaSA
adapters cannot share a model; ``r`` must be below ``min(N, K)``; nn.Linear bases only (PEFT
refuses Conv1D and ignores KaSA on bitsandbytes layers; fastpeft refuses both).
:func:`kasa_loss` is PEFT's ``LoraModel._get_kasa_loss`` (the paper's regularizers, to add to
the training loss).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import LoraVariant, sub_config


def truncate(weight_nk: Tensor, r: int) -> Tensor:
    """``weight_nk [N, K]`` without its ``r`` smallest singular components (float32 SVD, result
    in the weight's dtype)."""
    U, S, Vh = torch.linalg.svd(weight_nk.detach().to(torch.float32), full_matrices=False)
    keep = min(weight_nk.shape) - r
    return ((U[:, :keep] * S[:keep]) @ Vh[:keep, :]).to(weight_nk.dtype)


class KasaVariant(LoraVariant):
    """KaSA on one nn.Linear layer (see the module docstring)."""

    option = "kasa_config"
    fused = True
    kinds = ("linear",)

    @classmethod
    def prepare(cls, layer, path, config, r):
        k = min(layer.in_features, layer.out_features)
        if r >= k:
            raise ValueError(
                f"KaSA requires `r` ({r}) to be smaller than min(in_features, out_features) ({k}) so that at least one "
                f"singular component of the base weight is preserved after truncation (module {path!r})."
            )
        return cls()

    def attach(self, layer, name, config, loading):
        if "lora_diag" not in layer.adapter_param_dicts:
            layer.lora_diag = nn.ParameterDict()
            layer.adapter_param_dicts = (*layer.adapter_param_dicts, "lora_diag")
        A = layer.lora_A[name].weight
        layer.lora_diag[name] = nn.Parameter(torch.randn(layer.r[name], device=A.device, dtype=A.dtype))
        W = layer.base_layer.weight
        # the weight before the truncation, for a rolled-back injection (fastpeft.nn.lora_init.restore_base)
        layer.__dict__.setdefault("_init_base_copies", {}).setdefault(name, W.detach().to("cpu", copy=True))
        layer._set_base_weight(truncate(W, layer.r[name]))
        layer.bank.mark_stale()
        layer.bank.dora = None

    def b_weight(self, layer, name):
        return layer.lora_B[name].weight * layer.lora_diag[name]

    def watched(self, layer, name):
        return (layer.lora_A[name].weight, layer.lora_B[name].weight, layer.lora_diag[name])

    def delta(self, layer, name, x, result, where=None):
        xl = x.to(layer.lora_A[name].weight.dtype)
        after_a = layer.lora_A[name](layer.lora_dropout[name](xl))
        return layer.lora_B[name](after_a * layer.lora_diag[name]) * layer._scale(name)


def layer_loss(layer, name: str, beta: float, gamma: float) -> Tensor:
    """``beta * sum(lora_diag**2) + gamma * (||B^T B - I||_F + ||A A^T - I||_F)`` in float32."""
    diag = layer.lora_diag[name].float()
    A, B = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
    eye = torch.eye(diag.shape[0], device=diag.device, dtype=torch.float32)
    l3 = torch.linalg.norm(B.transpose(-1, -2) @ B - eye) + torch.linalg.norm(A @ A.transpose(-1, -2) - eye)
    return beta * (diag**2).sum() + gamma * l3


def kasa_loss(model: nn.Module, adapter_names=None):
    """PEFT's ``LoraModel._get_kasa_loss``: the KaSA regularization summed over the layers of the
    named adapters (default: the active ones), with each adapter's ``beta`` / ``gamma``
    (defaults 1e-4 / 1e-3); ``0.0`` when no KaSA layer matches."""
    from ... import tuner

    inner = getattr(getattr(model, "base_model", None), "model", None)
    if inner is not None and getattr(inner, "peft_config", None) is not None:
        model = inner
    configs = tuner._configs(model)
    names = tuner.active_adapters(model) if adapter_names is None else (
        [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
    total = 0.0
    for layer in tuner.adapter_layers(model):
        diag = getattr(layer, "lora_diag", None)
        if diag is None:
            continue
        for n in names:
            if n in diag:
                sub = sub_config(configs[n].kasa_config)
                total = total + layer_loss(layer, n, sub.get("beta", 1e-4), sub.get("gamma", 1e-3))
    return total
