"""fastpeft: PEFT-compatible adapters (LoRA, DoRA, IA3, AdaLoRA) with fused kernels.

The public names mirror ``peft`` and Transformers' ``PeftAdapterMixin`` (see docs/usage.md).
Importing never fails for a missing GPU, Triton or compiled extension:
``available_backends(verbose=True)`` says which backends run here and why not.
"""
from __future__ import annotations

from . import ops  # noqa: F401  (defines torch.ops.fastpeft.* and loads the backends)
from ._version import __version__ as __version__  # one source, read by pyproject.toml too
from .api import inject_adapter_in_model, load_adapters
from .config import AdaLoraConfig, IA3Config, LoraConfig, PeftConfig, PeftType, TaskType
from .integrations import transformers_trainer as _trainer  # noqa: E402
from .mixin import AdapterMixin, mixed_batch, with_adapters
from .ops import BackendUnavailableError, available_backends, get_backend, set_backend

# Bound after their submodules are imported, so ``fastpeft.optimize`` / ``fastpeft.quantize``
# are the functions, not the modules of the same name (both import only torch at load time).
from .optimize import optimize  # noqa: E402
from .peft_model import PeftModel, get_peft_model
from .quantize import quantize  # noqa: E402

_trainer.register()  # transformers.Trainer treats fastpeft.PeftModel as a PEFT model (see the module)

__all__ = [
    "AdaLoraConfig",
    "AdapterMixin",
    "BackendUnavailableError",
    "IA3Config",
    "LoraConfig",
    "PeftConfig",
    "PeftModel",
    "PeftType",
    "TaskType",
    "available_backends",
    "get_backend",
    "get_peft_model",
    "inject_adapter_in_model",
    "load_adapters",
    "mixed_batch",
    "optimize",
    "quantize",
    "set_backend",
    "with_adapters",
]


def __getattr__(name):
    # optional pieces, imported on first use so a missing dependency never breaks `import fastpeft`
    if name == "nn":
        import importlib

        return importlib.import_module(".nn", __name__)
    if name in ("hotswap_adapter", "prepare_model_for_compiled_hotswap", "hotswap_adapter_from_state_dict"):
        from . import hotswap

        return getattr(hotswap, name)
    if name.startswith("AutoPeftModel"):
        from . import auto

        return getattr(auto, name)
    raise AttributeError(f"module 'fastpeft' has no attribute {name!r}")
