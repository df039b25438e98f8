#!/usr/bin/env bash
# Tests: set up, compile-check the CUDA sources (when nvcc is there), run the whole suite.
# Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ -x tools/check_cuda_compile.sh ] || [ -f tools/check_cuda_compile.sh ]; then
  bash tools/check_cuda_compile.sh
fi
# the compiled modules must have built (pip only warns when they fail): their tests would
# otherwise be skipped silently. FASTPEFT_SKIP_EXT=1 tests the pure-Python package instead.
if [ "${FASTPEFT_SKIP_EXT:-0}" = "0" ]; then
  .venv/bin/python - <<'EOF'
import sys
from fastpeft import _ext
from fastpeft.ops import fastpath
if not _ext.available() or fastpath.module is None:
    sys.exit(f"compiled extension missing: _C: {_ext.error or 'ok'}; _fastpath: {fastpath.error or 'ok'}")
print("compiled extension: fastpeft._C and fastpeft._fastpath load")
EOF
fi
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
