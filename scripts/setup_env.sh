#!/usr/bin/env bash
# Creates .venv (if missing) and installs fastpeft with everything the demo and the tests need.
# torch is pinned to the CPU build (2.13.0); without the pin pip picks a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q "torch==${FASTPEFT_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q triton peft transformers accelerate bitsandbytes safetensors huggingface_hub pytest packaging
# builds the C++ CPU extension in place when a compiler is there (FASTPEFT_SKIP_EXT=1 skips it)
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
