"""Whether two peer libraries installed side by side agree with each other.

The tested set (constraints/tested.txt) always agrees; a newer release of one peer may not
(transformers 5.24.0 refuses every peft below 0.22.0, which did not exist yet). A test that
needs the pair to work together skips with the reason instead of failing for a reason that is
not fastpeft's: ``@needs_transformers_peft``.
"""
from __future__ import annotations

import pytest
from packaging.version import Version


def transformers_peft_skew() -> str | None:
    """Why the installed transformers refuses the installed peft for its PEFT integration
    (``PeftAdapterMixin.load_adapter`` & co.), or None when it accepts it."""
    try:
        import peft
        import transformers
        from transformers.integrations import peft as tf_peft
    except ImportError as e:
        return f"transformers or peft is not importable: {e}"
    needed = getattr(tf_peft, "MIN_PEFT_VERSION", None)
    if needed is not None and Version(peft.__version__) < Version(str(needed)):
        return (f"transformers {transformers.__version__} needs peft >= {needed} for its PEFT integration; "
                f"peft {peft.__version__} is installed")
    return None


_SKEW = transformers_peft_skew()

#: for tests that call Transformers' own PEFT integration (it checks peft's version itself)
needs_transformers_peft = pytest.mark.skipif(_SKEW is not None, reason=f"peer skew: {_SKEW}")
