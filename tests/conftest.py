"""Shared test setup: run the Triton kernels in the interpreter when there is no GPU, and give
every test the list of devices that exist here.

``TRITON_INTERPRET`` must be set before anything imports fastpeft (Triton reads it when the
kernels are decorated), so it is set at the top of this file, which pytest imports first.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

# The devices the same tests run on: CUDA tensors on a GPU machine, CPU tensors (Triton
# interpreter) elsewhere.
DEVICES = ["cuda"] if HAS_CUDA else ["cpu"]


@pytest.fixture(params=DEVICES)
def device(request):
    """One device per test instance (parametrized over ``DEVICES``)."""
    return torch.device(request.param)


@pytest.fixture
def devices():
    """The list of device names the suite runs on here."""
    return list(DEVICES)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests skip where there is no CUDA device (the marker is the skip)."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def fake_hub(monkeypatch):
    """A loopback stand-in for the Hub's HTTP API (tests/fake_hub.py), with huggingface_hub
    pointed at it and offline mode lifted for the test."""
    from fake_hub import FakeHub
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    hub = FakeHub()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if hasattr(_http, "reset_sessions"):
        _http.reset_sessions()
    import transformers.utils.hub as tf_hub

    if hasattr(tf_hub, "_hf_api"):  # transformers keeps one HfApi, with the endpoint of its first use
        monkeypatch.setattr(tf_hub, "_hf_api", None)
    yield hub
    hub.close()
