"""Which adapters one call applies: mixed batches as a property of the call, not of the model.

A mixed batch (``fastpeft.mixed_batch(model, names)``, ``model(..., adapter_names=names)``,
``generate(..., adapter_names=names)``, PEFT's layer-level ``forward(x, adapter_names=...)``)
gives each batch row its adapter. The names live in a :class:`contextvars.ContextVar`, as a
tuple of the *open* mixed batches of this context, each mapping layers to their names. So:

* threads each have their own context, and an asyncio task runs in a copy of its creator's
  context: concurrent callers each get exactly their own adapters;
* a block removes *its own* entry when it ends (not "restore what was there before"), so blocks
  that end in any order leave nothing behind;
* nothing of one call is stored on the layers for eager forwards.

Compiled graphs cannot read a ContextVar: under ``torch.compile`` a layer reads the selection
the model-level blocks also record on it (``AdapterLayer.set_mixed_names``, the slot buffers a
compiled or CUDA graph reads), so a compiled model serves one mixed batch at a time.

``repeat``: whether a name may cover ``k`` consecutive rows when the batch has ``k`` times more
rows than names (generation with beams or ``num_return_sequences`` repeats each prompt row ``k``
times: ``mixed_batch`` blocks and ``generate``); a forward's own ``adapter_names`` must have one
name per row, as in PEFT.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple


class Selection(NamedTuple):
    """A call's mixed batch for one layer: the adapter name of each batch row."""

    names: tuple
    repeat: bool = False


class _Block:
    """One open mixed batch: ``layers`` maps each layer it covers to its :class:`Selection`."""

    __slots__ = ("layers",)

    def __init__(self, layers: dict):
        self.layers = layers


_open: contextvars.ContextVar[tuple] = contextvars.ContextVar("fastpeft_mixed_batches", default=())


def current(layer) -> Selection | None:
    """``layer``'s selection in this call (the innermost open block that covers it), or None:
    the layer's active adapters."""
    blocks = _open.get()
    for block in reversed(blocks):
        sel = block.layers.get(layer)
        if sel is not None:
            return sel
    return None


def inside(block: _Block) -> bool:
    """Whether this context is inside ``block`` (a hook registered by a block asks this)."""
    return any(b is block for b in _open.get())


@contextlib.contextmanager
def selecting(layers: dict):
    """Open a mixed batch for this context: ``layers`` maps a layer to its :class:`Selection`.
    Yields the block (hooks can ask :func:`inside` about it). Removes its own entry at the end."""
    block = _Block(layers)
    _open.set(_open.get() + (block,))
    try:
        yield block
    finally:
        _open.set(tuple(b for b in _open.get() if b is not block))
