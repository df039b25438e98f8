"""Rank pages: how a layer with adapters of mixed ranks stores them without padding each one to
the largest rank.

The operators take the adapters of a layer as stacks ``lora_a [S, R, K]`` / ``lora_b [S, R, N]``
and, per row, ``J`` slot indices whose deltas add up (-1: none). A layer whose ranks differ
much stores its adapters in *pages* of ``c`` rank rows instead: an adapter of rank ``r`` takes
``ceil(r / c)`` consecutive pages, and a row that uses it lists those pages as its slots (each
page carries the adapter's scale). ``sum_p B_p (A_p x) = B (A x)``, so the operators compute
the same delta with no change of contract, and an adapter costs at most ``c - 1`` zero rows
instead of ``R - r``. Consecutive pages are consecutive memory, so each adapter's PEFT
parameters stay views of the stacks (``lora_a.view(P * c, K)[o : o + r]``).

``page_table [S + 1, P_max]`` int32 maps a slot to its pages (-1 after the last); its last row
is all -1, so a slot of -1 indexes it (Python's negative index) and maps to "no page".
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Paging is used when padding every adapter to the largest rank would cost more than this
# factor over the adapters' own rows (equal ranks: factor 1, never paged); the page size is then
# the largest power of two that brings the factor under it, or the one that comes closest.
PAGE_SLACK = 1.25
# ... and only when the rows it would save exceed this many adapters of the largest rank: a few
# adapters padded to the largest rank cost little memory, and paging costs the kernels one more
# slot column per extra page of a row (two adapters of ranks 4 and 8 stay unpaged).
MIN_SAVED_SLOTS = 4
# Smallest page: below 4 rows the per-page work of the kernels (one more column of slots per
# row) outweighs the bytes saved (ranks 1..16 mixed: 4 rows -> 1.18x of the adapters' bytes,
# 2 rows -> 1.06x for twice the pages).
MIN_PAGE_ROWS = 4


def padded_rows(ranks: Sequence[int], c: int) -> int:
    """Rows held for adapters of ``ranks`` in pages of ``c`` rows."""
    return c * sum(-(-r // c) for r in ranks)


def choose_page_rows(ranks: Sequence[int]) -> int:
    """Rows per page for a layer whose adapters have ``ranks``: ``max(ranks)`` (one page per
    adapter: the plain stacks) unless that pads by more than ``PAGE_SLACK`` and by more than
    ``MIN_SAVED_SLOTS`` adapters of the largest rank."""
    R, total = max(ranks), sum(ranks)
    waste = padded_rows(ranks, R) - total
    if waste <= (PAGE_SLACK - 1) * total or waste <= MIN_SAVED_SLOTS * R or R <= MIN_PAGE_ROWS:
        return R
    best = R
    c = 1 << ((R - 1).bit_length() - 1)  # the largest power of two below R
    while c >= MIN_PAGE_ROWS:
        if padded_rows(ranks, c) <= PAGE_SLACK * total:
            return c
        if padded_rows(ranks, c) < padded_rows(ranks, best):
            best = c
        c //= 2
    return best


def page_starts(ranks: Sequence[int], c: int) -> list[int]:
    """First page of each adapter (in order), plus the total number of pages at the end."""
    starts = [0]
    for r in ranks:
        starts.append(starts[-1] + -(-r // c))
    return starts


def build_page_table(ranks: Sequence[int], c: int, device) -> Tensor:
    """``[S + 1, P_max]`` int32: row s lists slot s's pages then -1; row S is all -1."""
    starts = page_starts(ranks, c)
    p_max = max(-(-r // c) for r in ranks)
    table = torch.full((len(ranks) + 1, p_max), -1, dtype=torch.int32)
    for s in range(len(ranks)):
        n = starts[s + 1] - starts[s]
        table[s, :n] = torch.arange(starts[s], starts[s] + n, dtype=torch.int32)
    return table.to(device)


def slots_to_pages(table: Tensor | None, slots: Tensor) -> Tensor:
    """Slot indices ``[M, J]`` (-1: none) -> page indices ``[M, J * P_max]``; unchanged
    without a table. Traceable (one gather), so compiled and CUDA-graph-captured forwards
    follow in-place updates of ``slots``."""
    if table is None:
        return slots
    return table[slots.long()].reshape(slots.shape[0], -1)
