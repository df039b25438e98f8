#!/usr/bin/env bash
# One script for a lent GPU (the device tool's `run`): build the extension with CUDA, run the
# tests on CUDA tensors, run the benchmarks, and leave every log and CSV under $OUT (they come
# back with the reply) as well as in bench/results/. No GPU has run fastpeft's kernels yet: the
# first GPU session should run all of it (docs/perf-notes.md lists what each number decides).
#
# From this machine (the GPU machine has torch, triton, transformers, peft and nvcc, but no
# bitsandbytes and no network):
#   ../shared/tools/gpu-pack                          # once: .gpupack/ with bitsandbytes
#   run  command="bash tools/gpu_session.sh build test"            carry=[".gpupack"]
#   run  command="bash tools/gpu_session.sh bench-linear bench-quant"
#   run  command="bash tools/gpu_session.sh bench-generate"
#   run  command="bash tools/gpu_session.sh bench-mixed-ranks"
# Each `run` may take at most 10 minutes, so the steps are split as above; the built extension
# stays on the machine between calls while it is held. Steps: build, test, bench-linear,
# bench-quant, bench-generate, bench-mixed-ranks, all. Every step is time-boxed and a failure does not stop the
# next one; the last lines printed are a summary. The CSVs (device name, date, commit in every
# row) come back under the reply's files: copy them to bench/results/ here and commit them.
#
# On a machine without a GPU, QUICK=1 runs the same steps on small shapes (checks the script).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-session-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && ! command -v nvidia-smi >/dev/null && PY=.venv/bin/python
export PYTHONPATH="$PWD/.gpupack/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
QUICK=${QUICK:-0}
quick_flag=()
[ "$QUICK" = "1" ] && quick_flag=(--quick)
summary=()

run_step() {  # name, timeout seconds, command...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  summary+=("$(printf '%-16s rc=%-3s %4ss  log: %s' "$name" "$rc" "$((SECONDS - t0))" "$OUT/$name.log")")
  return 0
}

step_build() {
  {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
    "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  } > "$OUT/device.txt" 2>&1
  cat "$OUT/device.txt"
  # only the arch of the card here: a shorter nvcc run than the default sm_80 + sm_90 + PTX
  local arch
  arch=$("$PY" -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f'{c[0]}.{c[1]}' if c else '')" 2>/dev/null)
  run_step build 540 env ${arch:+TORCH_CUDA_ARCH_LIST=$arch} "$PY" setup.py -q build_ext --inplace
  "$PY" - <<'EOF' 2>&1 | tee -a "$OUT/build.log"
from fastpeft import _ext
from fastpeft.ops import available_backends, fastpath
print("extension:", "ok" if _ext.available() else _ext.error, "| features:", sorted(_ext.features))
print("fastpath:", "ok" if fastpath.module is not None else fastpath.error)
print("backends:", available_backends(verbose=True))
EOF
}

step_test() {
  # the kernel, extension, compile (CUDA graphs) and fast-path tests run on CUDA tensors when a
  # GPU is present (tests/conftest.py); the rest of the suite is device-independent
  run_step test 560 "$PY" -m pytest -q -p no:cacheprovider --maxfail=30 --junitxml="$OUT/test.xml" \
    tests/test_triton_kernels.py tests/test_cpp_ext.py tests/test_quant_ops.py tests/test_quant_layers.py tests/test_compile.py \
    tests/test_fastpath.py tests/test_many_adapters.py tests/test_quant_adapters.py
}

# The benchmarks write bench/results/<kind>-<device>-<date>.csv (+ plot) themselves; what a step
# wrote is copied to $OUT so that it comes back with the reply.
collect() {
  find bench/results -type f -newer "$OUT/.stamp" -exec cp {} "$OUT/" \;
}

step_bench_linear() {
  touch "$OUT/.stamp"
  run_step bench-linear 420 "$PY" bench/bench_linear.py "${quick_flag[@]}"
  collect
}

step_bench_quant() {
  touch "$OUT/.stamp"
  run_step bench-quant 300 "$PY" bench/bench_quant.py "${quick_flag[@]}"
  collect
}

step_bench_generate() {
  touch "$OUT/.stamp"
  run_step bench-generate 330 "$PY" bench/bench_generate.py "${quick_flag[@]}"
  if command -v nvidia-smi >/dev/null; then
    # the compiled CUDA operator with the C++ plans, which skip Triton's Python launch path:
    # a candidate for batch-1 decode, to compare with the default (Triton) above
    local stem
    stem="bench/results/generate-gpu-$(date +%Y-%m-%d)-backend-cuda.csv"
    run_step bench-generate-cuda 240 env FASTPEFT_BACKEND=cuda "$PY" bench/bench_generate.py "${quick_flag[@]}" \
      --methods base,merged,peft,fastpeft --out "$stem"
  fi
  collect
}

step_bench_mixed_ranks() {
  # 32 adapters of ranks 16..1 (paged stacks, fastpeft/nn/paging.py): what the extra page
  # columns cost the GPU kernels, against the uniform-rank bench-generate run
  touch "$OUT/.stamp"
  local stem
  stem="bench/results/generate-$([ "$QUICK" = 1 ] && echo cpu-quick || echo gpu)-$(date +%Y-%m-%d)-mixed-ranks.csv"
  run_step bench-mixed-ranks 300 "$PY" bench/bench_generate.py "${quick_flag[@]}" --mixed-ranks \
    --methods base,merged,peft,fastpeft --out "$stem"
  collect
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(all)
for s in "${steps[@]}"; do
  case "$s" in
    build) step_build ;;
    test) step_test ;;
    bench-linear) step_bench_linear ;;
    bench-quant) step_bench_quant ;;
    bench-generate) step_bench_generate ;;
    bench-mixed-ranks) step_bench_mixed_ranks ;;
    all) step_build; step_test; step_bench_linear; step_bench_quant; step_bench_generate; step_bench_mixed_ranks ;;
    *) echo "unknown step: $s (build, test, bench-linear, bench-quant, bench-generate, bench-mixed-ranks, all)"; exit 2 ;;
  esac
done
echo
echo "=== summary ($(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD 2>/dev/null || echo no-git))"
for line in "${summary[@]}"; do echo "$line"; done
