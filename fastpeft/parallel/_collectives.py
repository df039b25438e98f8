"""The collectives of fastpeft's tensor-parallel layers, and a counter of the bytes they move.

Two autograd-aware collectives (Megatron-LM's "f" and "g" operators) over a process group:

* :func:`all_reduce_sum` ``y -> sum over ranks of y``, backward identity: the end of a
  row-parallel layer, whose output (and so its gradient) is replicated;
* :func:`reduce_grad` ``x -> x``, backward all-reduce of the gradient: a replicated tensor
  that each rank uses with its own shard of a weight (the input of a column-parallel layer, or
  LoRA's low-rank activation ``A x`` before the column-parallel ``B``), so each rank's
  gradient is only its shard's part.

Without a gradient to compute both run no autograd machinery (``all_reduce_sum`` reduces its
argument in place; ``reduce_grad`` returns it). :class:`CommCounter` records every collective
(c10d and functional) run inside it, with its payload bytes per rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group):
        y = y.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ReduceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(y: Tensor, group) -> Tensor:
    """Sum of ``y`` over the ranks of ``group`` (any shape). In place (``y`` is returned) when
    no gradient flows; else a new tensor whose gradient is passed through unchanged."""
    if torch.is_grad_enabled() and y.requires_grad:
        return _AllReduceSum.apply(y, group)
    dist.all_reduce(y, group=group)
    return y


def reduce_grad(x: Tensor, group) -> Tensor:
    """``x`` itself forward; its gradient summed over the ranks of ``group`` backward."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _ReduceGrad.apply(x, group)
    return x


# ----- counting ---------------------------------------------------------------------------------
# op name (c10d's in-place ops and the functional ones DTensor uses) -> the collective's kind
_KINDS = {
    "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce", "reduce_": "reduce", "broadcast_": "broadcast", "broadcast": "broadcast",
    "allgather_": "all_gather", "_allgather_base_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
    "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_": "reduce_scatter", "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter", "alltoall_": "all_to_all", "alltoall_base_": "all_to_all",
    "all_to_all_single": "all_to_all",
}


def _payload(args) -> int:
    """Bytes of the tensors a collective sends from this rank (its first argument: a tensor or
    a list of tensors)."""
    first = args[0] if args else None
    ts = first if isinstance(first, (list, tuple)) else [first]
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, Tensor))


class CommCounter(TorchDispatchMode):
    """Context manager recording the collectives run inside it on this rank.

    ``events``: ``[(kind, payload bytes)]`` in call order, e.g. ``("all_reduce", 1792)`` for
    an all-reduce of a ``[14, 32]`` float32 tensor (kinds: all_reduce, reduce, broadcast,
    all_gather, reduce_scatter, all_to_all; c10d's and the functional ops alike). ``bytes`` / ``count``: their totals.
    The payload is the tensor a rank contributes (an all-reduce of ``B`` bytes moves about
    ``2 (w - 1) / w * B`` bytes per rank over a ring of ``w`` ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional") and func._opname in _KINDS:
            self.events.append((_KINDS[func._opname], _payload(args)))
        return func(*args, **(kwargs or {}))

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.events)

    @property
    def count(self) -> int:
        return len(self.events)
