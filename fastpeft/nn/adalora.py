"""AdaLoRA (SVD-form) adapters on a linear-like base: ``delta = B @ (A * E) * scaling / (ranknum + 1e-5)``.

PEFT's names: ``lora_A.<name>`` [r, K], ``lora_B.<name>`` [N, r], ``lora_E.<name>`` [r, 1] and
the non-trainable ``ranknum.<name>`` (not saved in checkpoints). The bank's stacks hold
``A * E`` (a derived copy, rebuilt when A, B, E or ranknum change: the bank watches all four).

Rank 0 is allowed, as in PEFT: a layer whose ranks the allocator pruned away holds zero-size
``lora_A`` [0, K], ``lora_E`` [0, 1] and ``lora_B`` [N, 0] (saved and loaded with those shapes)
and adds nothing; the bank holds one zero row for it. Training is in :mod:`fastpeft.adalora_train`.
"""
from __future__ import annotations

import torch
from torch import nn

from ._base_kinds import adapter_device
from .bank import Entry
from .lora import LoraLinear


def add_svd_triplet(layer, name, r, lora_alpha, lora_dropout, init_lora_weights, dtype, ranknum, inference_mode,
                    in_features: int, order: tuple) -> None:
    """Add AdaLoRA adapter ``name`` to ``layer`` (AdaLoraLinear or AdaLoraConv2d): ``lora_A`` [r,
    in_features], ``lora_E`` [r, 1], ``lora_B`` [N, r] drawn with ``torch.randn`` in ``order``
    (PEFT's order for that layer kind, so the random state afterwards is PEFT's), ``ranknum``
    [1] frozen, and PEFT's init (E = 0, A and B ~ N(0, 0.02)) unless ``init_lora_weights`` is
    False. ``r`` >= 0; ``ranknum`` defaults to ``r``; ``inference_mode`` is recorded when known."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        raise ValueError(f"r must be a non-negative int, got {r!r}")
    layer._register(name)
    if inference_mode is not None:
        layer.inference_mode[name] = bool(inference_mode)
    w = layer.base_layer.weight
    dtype = dtype or (w.dtype if w.is_floating_point() else torch.float32)
    layer._set_config(name, r, lora_alpha, False, False, False,
                      nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity(),
                      scaling=lora_alpha if lora_alpha > 0 else float(r))
    kw = dict(device=adapter_device(layer.base_layer), dtype=dtype)
    shapes = {"lora_A": (r, in_features), "lora_B": (layer.out_features, r), "lora_E": (r, 1)}
    for attr in order:
        getattr(layer, attr)[name] = nn.Parameter(torch.randn(*shapes[attr], **kw))
    layer.ranknum[name] = nn.Parameter(torch.full((1,), float(r if ranknum is None else ranknum), **kw),
                                       requires_grad=False)
    if init_lora_weights:
        with torch.no_grad():
            nn.init.zeros_(layer.lora_E[name])
            nn.init.normal_(layer.lora_A[name], mean=0.0, std=0.02)
            nn.init.normal_(layer.lora_B[name], mean=0.0, std=0.02)
    layer.set_adapter(layer._active)


class AdaLoraLinear(LoraLinear):
    """AdaLoRA adapters; forward routes, merging and the bank as :class:`LoraLinear`."""

    adapter_param_dicts = ("lora_A", "lora_B", "lora_E", "ranknum")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        # name -> the config's inference_mode when the adapter was added: PEFT's AdaLoraModel
        # picks its one trainable adapter from it at creation (fastpeft.adalora_train reads it)
        self.inference_mode: dict[str, bool] = {}

    def add_adapter(self, name, r, lora_alpha, lora_dropout=0.0, init_lora_weights=True, dtype=None, ranknum=None,
                    inference_mode=None, **_):
        """``r`` >= 0 (0: a layer pruned to no rank, as PEFT allows); ``ranknum``: the scaling
        divisor (PEFT keeps the initial rank there after pruning, 0 for a rank-0 layer);
        ``inference_mode``: the config's, recorded (None: not known)."""
        add_svd_triplet(self, name, r, lora_alpha, lora_dropout, init_lora_weights, dtype, ranknum, inference_mode,
                        self.in_features, order=("lora_A", "lora_B", "lora_E"))

    def _remove(self, name):
        super()._remove(name)
        self.inference_mode.pop(name, None)

    def resize_adapter(self, name: str, keep) -> None:
        """Keep only the ranks ``keep`` (bool mask [r], list or tensor) of adapter ``name``, as
        PEFT's ``resize_modules_by_rank_pattern`` does to one layer: ``lora_A``/``lora_E`` keep
        those rows, ``lora_B`` those columns, as new parameters (an optimizer holding the old
        ones no longer updates them); ``ranknum`` stays (PEFT copies it back), except at rank 0
        where it becomes 0 (PEFT's fresh ``update_layer(r=0)``). Gradient flags are kept."""
        keep = torch.as_tensor(keep, dtype=torch.bool, device=self.lora_E[name].device).view(-1)
        rank = int(keep.sum())
        if keep.numel() != self.lora_E[name].shape[0]:
            raise ValueError(f"adapter {name!r} has rank {self.lora_E[name].shape[0]}; got a mask of {keep.numel()}")
        with torch.no_grad():
            for attr, rows in (("lora_A", True), ("lora_E", True), ("lora_B", False)):
                old = getattr(self, attr)[name]
                new = old[keep] if rows else old[:, keep]
                getattr(self, attr)[name] = nn.Parameter(new.clone(), requires_grad=old.requires_grad)
            if rank == 0:
                self.ranknum[name].fill_(0.0)
        self.r[name] = rank
        self.bank.mark_stale()
        self._refresh_slots()

    def _frozen_param(self, name, p):
        return p is self.ranknum[name] if name in self.ranknum else False

    def _a_weight(self, name):
        return self.lora_A[name] * self.lora_E[name]

    def _b_weight(self, name):
        return self.lora_B[name]

    def _scale(self, name):
        return self.scaling[name] / (float(self.ranknum[name]) + 1e-5)

    def _watched(self, name):
        return (self.lora_A[name], self.lora_B[name], self.lora_E[name], self.ranknum[name])

    def _entry(self, name):
        a = self._a_weight(name)
        if a.shape[0] == 0:  # rank 0: one zero row (the stacks and page tables assume a rank >= 1)
            z = torch.zeros(1, self.in_features, dtype=a.dtype, device=a.device)
            return Entry(z, z.new_zeros(self.out_features, 1), 0.0, self._watched(name), alias=False)
        return Entry(a, self._b_weight(name), self._scale(name), self._watched(name), alias=False)

    def _lora_out(self, name, x):
        d = self.lora_dropout[name](x)
        return (d @ (self.lora_A[name] * self.lora_E[name]).T) @ self.lora_B[name].T

    def _adapter_delta(self, name, x, result):
        xl = x.to(self.lora_A[name].dtype)
        return self._lora_out(name, xl) * self.scaling[name] / (self.ranknum[name] + 1e-5)
