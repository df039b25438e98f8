"""Markers whose meaning depends on the machine."""
import pytest
import torch

#: Triton-kernel tests: without a GPU they run in Triton's interpreter (slow, deselected by
#: ``-m "not slow"``); on a GPU they are compiled, fast, and part of the quick run.
interpreted = pytest.mark.slow if not torch.cuda.is_available() else pytest.mark.usefixtures()
