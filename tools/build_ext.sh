#!/usr/bin/env bash
# Build the compiled extension fastpeft._C in place (editable install) and check it loads.
#
#   tools/build_ext.sh                 # CPU kernels (+ CUDA kernels if torch has CUDA and nvcc is found)
#   FASTPEFT_NO_CUDA=1 tools/build_ext.sh   # CPU kernels only
#   TORCH_CUDA_ARCH_LIST="9.0" tools/build_ext.sh   # CUDA archs (default: sm_80 + sm_90 + PTX)
#
# The same as `pip install --no-build-isolation -e .` (torch must be installed already: the
# extension compiles against it), plus the build time and a load check. pip itself never
# fails on a broken extension build (it warns and installs the pure-Python package); this
# script does, so CI notices.
# Environment: PYTHON (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
t0=$(date +%s)
"$PY" -m pip install --no-build-isolation -e . "$@"
echo "build_ext: pip install took $(( $(date +%s) - t0 ))s"
"$PY" - <<'EOF'
import sys
from fastpeft import _ext
if not _ext.available():
    print(f"build_ext: FAILED, fastpeft._C does not load: {_ext.error}")
    sys.exit(1)
print(f"build_ext: ok, {_ext.library_path()} (features: {', '.join(sorted(_ext.features))})")
EOF
