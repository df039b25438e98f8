"""Progress bars for long model-wide operations, through huggingface_hub's ``tqdm``.

huggingface_hub's ``tqdm`` honours ``HF_HUB_DISABLE_PROGRESS_BARS=1`` (and
``huggingface_hub.utils.disable_progress_bars()``), which then hides every bar, whatever the
call asked for. ``enabled``: True shows a bar, False never does, None (the default of the calls
that PEFT does not have: ``quantize``, ``optimize``, ``load_adapters``) shows one only for more
than :data:`AUTO_MIN_ITEMS` items, so small models stay quiet.
"""
from __future__ import annotations

from collections.abc import Iterable

# above this many items (layers, adapters) a call with progressbar=None shows a bar: converting
# 64 small layers takes well under a second here, a 7B model's 224 linear layers several seconds
AUTO_MIN_ITEMS = 64


def progress(items: Iterable, desc: str, enabled: bool | None = None, total: int | None = None):
    """``items`` wrapped in a progress bar when ``enabled`` (see the module docstring), else as they are."""
    if total is None:
        if not hasattr(items, "__len__"):
            items = list(items)
        total = len(items)
    show = enabled if enabled is not None else total > AUTO_MIN_ITEMS
    if not show:
        return items
    from huggingface_hub.utils import tqdm

    return tqdm(items, desc=desc, total=total)
