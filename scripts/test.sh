#!/usr/bin/env bash
# Tests: set up (the tested set of versions), lint, compile-check the CUDA sources (when nvcc is
# there), run the whole suite. Arguments go to pytest, e.g. -m "not slow" for the quick run.
# Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
# the compiled modules must build: a failed build fails the install here (a user's plain pip
# install only warns). FASTPEFT_SKIP_EXT=1 tests the pure-Python package instead.
if [ "${FASTPEFT_SKIP_EXT:-0}" = "0" ]; then
  export FASTPEFT_REQUIRE_EXT=1
else
  unset FASTPEFT_REQUIRE_EXT
fi
bash scripts/setup_env.sh
.venv/bin/ruff check .
if [ -f tools/check_cuda_compile.sh ]; then
  bash tools/check_cuda_compile.sh
fi
# built is not loaded: check that both compiled modules import against this torch
if [ "${FASTPEFT_SKIP_EXT:-0}" = "0" ]; then
  .venv/bin/python - <<'PY'
import sys
from fastpeft import _ext
from fastpeft.ops import fastpath
if not _ext.available() or fastpath.module is None:
    sys.exit(f"compiled extension missing: _C: {_ext.error or 'ok'}; _fastpath: {fastpath.error or 'ok'}")
print("compiled extension: fastpeft._C and fastpeft._fastpath load")
PY
fi
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
