#!/usr/bin/env bash
# Compile-check the CUDA sources without a GPU and without a CUDA build of torch.
#
#   1. every csrc/cuda/*.cu with nvcc alone (no torch headers), for sm_80 and sm_90,
#      warnings as errors: a template, syntax or type error fails;
#   2. the launcher header csrc/cuda/lora_kernels.h as plain C++ (what the binding sees);
#   3. the .cu sources include no torch/ATen/c10 header (they must stay torch-free);
#   4. the torch binding csrc/cuda_ops.cpp with g++ -fsyntax-only against the installed
#      torch's headers (a CPU build of torch ships the c10/cuda and ATen headers it needs;
#      only the generated c10/cuda/impl/cuda_cmake_macros.h is missing, which
#      -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE skips). Skipped when torch is not importable.
#
# Exits 0 with a message when nvcc is absent (nothing to check here), non-zero on any failure.
# Environment: NVCC (nvcc to use), CUDA_HOME, PYTHON (a python with torch), CXX.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -n "${NVCC:-}" ]; then
  candidates=("$NVCC")  # given explicitly: only that one (NVCC=/nonexistent means "no nvcc")
else
  candidates=("$(command -v nvcc 2>/dev/null)" "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc)
fi
NVCC=""
for c in "${candidates[@]}"; do
  if [ -n "$c" ] && [ -x "$c" ]; then NVCC="$c"; break; fi
done
if [ -z "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found (set NVCC or CUDA_HOME); skipping the CUDA compile check"
  exit 0
fi
# the toolkit's include dir (nvcc may be a wrapper script elsewhere): ask nvcc itself
CUDA_INC="$("$NVCC" --dryrun -x cu -c /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)"
CUDA_INC="${CUDA_INC%/}"
for d in "$CUDA_INC" "${CUDA_HOME:-/nonexistent}/include" "$(dirname "$(readlink -f "$NVCC")")/../include" /usr/local/cuda/include; do
  if [ -n "$d" ] && [ -f "$d/cuda_runtime.h" ]; then CUDA_INC="$d"; break; fi
done
CXX="${CXX:-g++}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
fail=0
echo "check_cuda_compile: $("$NVCC" --version | tail -1)"

# 3. torch-free kernels
if grep -nE '#include *[<"](torch|ATen|c10)/' csrc/cuda/*.cu csrc/cuda/*.h; then
  echo "FAIL: csrc/cuda/ must not include torch headers (keep the torch binding in csrc/cuda_ops.cpp)"
  fail=1
fi

# 1. nvcc on every kernel file
for cu in csrc/cuda/*.cu; do
  t0=$(date +%s)
  if "$NVCC" -c -std=c++17 -O3 --threads 0 -Werror all-warnings \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
      -Icsrc -o "$TMP/$(basename "$cu").o" "$cu"; then
    echo "ok   nvcc sm_80+sm_90  $cu  ($(( $(date +%s) - t0 ))s)"
  else
    echo "FAIL nvcc  $cu"
    fail=1
  fi
done

# 2. the launcher header is plain C++
for h in csrc/cuda/*.h; do
  if echo "#include \"${h#csrc/}\"" | "$CXX" -fsyntax-only -std=c++17 -Wall -Wextra -Werror -x c++ -I"$CUDA_INC" -Icsrc -; then
    echo "ok   $CXX plain C++    $h"
  else
    echo "FAIL $CXX  $h"
    fail=1
  fi
done

# 4. the binding against torch's headers
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
TORCH_INC="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null)"
if [ -n "$TORCH_INC" ] && [ -d "$TORCH_INC/c10/cuda" ]; then
  if "$CXX" -fsyntax-only -std=c++20 -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DFASTPEFT_WITH_CUDA \
      -I"$TORCH_INC" -I"$TORCH_INC/torch/csrc/api/include" -I"$CUDA_INC" -Icsrc csrc/cuda_ops.cpp; then
    echo "ok   $CXX -fsyntax-only csrc/cuda_ops.cpp (torch headers: $TORCH_INC)"
  else
    echo "FAIL $CXX -fsyntax-only csrc/cuda_ops.cpp"
    fail=1
  fi
else
  echo "skip csrc/cuda_ops.cpp: no torch with c10/cuda headers importable by $PY"
fi

if [ "$fail" -ne 0 ]; then
  echo "check_cuda_compile: FAILED"
  exit 1
fi
echo "check_cuda_compile: all CUDA sources compile"
