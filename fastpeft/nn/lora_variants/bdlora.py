"""BD-LoRA (``use_bdlora``, block-diagonal LoRA), as PEFT 0.21 computes and saves it.

``use_bdlora = {"target_modules_bd_a": [...], "target_modules_bd_b": [...], "nblocks": n,
"match_strict": True}``: a target whose module path *contains* one of the ``bd_a`` patterns
gets a block-diagonal ``lora_A`` (``n`` blocks ``[r/n, K/n]`` on the diagonal of ``A [r, K]``),
one containing a ``bd_b`` pattern a block-diagonal ``lora_B`` (``n`` blocks ``[N/n, r/n]``);
both is an error, neither is an error when ``match_strict`` (else that layer is plain LoRA).

Saved as PEFT saves it: the block-diagonal factor's parameter is ``lora_A.<name>.weight`` of shape
``[r, K/n]`` (the ``n`` blocks stacked along dim 0; ``lora_B``: ``[N, r/n]``), the same keys as
plain LoRA with smaller shapes. The unfused route runs PEFT's block product; the fused operator
and merging use the dense block-diagonal factor (a copy, rebuilt when the parameter changes).
A new block-diagonal A is ``kaiming_uniform_`` (a = 0) and B zeros, as in PEFT.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import LoraVariant, sub_config


class BlockDiagonalLinear(nn.Module):
    """``y = x @ blockdiag(W_1..W_n)^T`` with ``weight [out, in/n]`` (block ``i`` = rows
    ``i*out/n .. (i+1)*out/n``): PEFT's ``BlockDiagonalLinear`` (same parameter and forward)."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, init_zero: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if in_features % nblocks or out_features % nblocks:
            raise ValueError(f"in_features={in_features} or out_features={out_features} not divisible by {nblocks}")
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks, dtype=dtype, device=device))
        if init_zero:
            nn.init.zeros_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        first = x.shape[:-1]
        if x.dim() != 2:
            x = x.reshape(-1, x.shape[-1])
        nb = self.nblocks
        m, n = x.shape[-1] // nb, self.out_features // nb
        out = torch.einsum("bim,inm->bin", x.reshape(x.shape[0], nb, m), self.weight.view(nb, n, m))
        return out.reshape(*first, -1)

    def dense(self) -> Tensor:
        """The block-diagonal matrix ``[out, in]``."""
        return torch.block_diag(*torch.chunk(self.weight, self.nblocks, dim=0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}"


class BdLoraVariant(LoraVariant):
    """BD-LoRA on one nn.Linear layer: ``side`` "A" or "B" is block-diagonal."""

    option = "use_bdlora"
    fused = True
    kinds = ("linear",)

    def __init__(self, side: str, nblocks: int):
        self.side, self.nblocks = side, nblocks

    @classmethod
    def prepare(cls, layer, path, config, r):
        cfg = sub_config(config.use_bdlora)
        on_a = any(p in path for p in cfg.get("target_modules_bd_a") or [])
        on_b = any(p in path for p in cfg.get("target_modules_bd_b") or [])
        nb = int(cfg.get("nblocks", 1))
        if on_a and on_b:
            raise ValueError(f"Target {path} matches both A and B block-diagonal patterns")
        if not (on_a or on_b):
            if cfg.get("match_strict", True):
                raise ValueError(f"Target {path} matches neither A nor B block-diagonal patterns. If this is "
                                 "intentional, set match_strict=False in BdLoraConfig during initialization.")
            return None  # plain LoRA on this layer (PEFT's variant computes the same)
        if getattr(config, "lora_bias", False):
            raise ValueError("`use_bdlora` with `lora_bias=True` is not supported (PEFT's block-diagonal factors "
                             "have no bias, so the bias would be dropped or fail to merge)")
        dims = (layer.in_features, r) if on_a else (r, layer.out_features)
        if dims[0] % nb or dims[1] % nb:
            raise ValueError(f"use_bdlora on {path!r}: in_features={dims[0]} or out_features={dims[1]} of the "
                             f"block-diagonal lora_{'A' if on_a else 'B'} not divisible by nblocks={nb}")
        return cls("A" if on_a else "B", nb)

    def attach(self, layer, name, config, loading):
        old = (layer.lora_A if self.side == "A" else layer.lora_B)[name]
        w = old.weight
        new = BlockDiagonalLinear(old.in_features, old.out_features, self.nblocks, init_zero=self.side == "B",
                                  dtype=w.dtype, device=w.device)
        (layer.lora_A if self.side == "A" else layer.lora_B)[name] = new

    def a_weight(self, layer, name):
        m = layer.lora_A[name]
        return m.dense() if self.side == "A" else m.weight

    def b_weight(self, layer, name):
        m = layer.lora_B[name]
        return m.dense() if self.side == "B" else m.weight
