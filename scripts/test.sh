#!/usr/bin/env bash
# Tests: set up, compile-check the CUDA sources (when nvcc is there), run the whole suite.
# Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ -x tools/check_cuda_compile.sh ] || [ -f tools/check_cuda_compile.sh ]; then
  bash tools/check_cuda_compile.sh
fi
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
