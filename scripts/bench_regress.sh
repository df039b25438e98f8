#!/usr/bin/env bash
# Per-layer eager overhead benchmarks (tests/benchmarks, pytest-benchmark), compared with the
# saved baseline of this CPU model in bench/baselines/<cpu>/ (absolute medians: a baseline only
# means something on the machine kind that saved it; on a shared machine expect a few % noise). Not part of CI's timing: the normal
# test run executes each benchmark once (--benchmark-disable in pyproject.toml).
#   bash scripts/bench_regress.sh          # time them; fail if a median is >25% slower than the baseline
#   bash scripts/bench_regress.sh --save   # time them and save them as the new baseline (commit it)
# Uses .venv (scripts/setup_env.sh makes it). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup_env.sh
# one baseline per CPU model (pytest-benchmark's own machine id would match any Linux CPython 3.11)
CPU=$(.venv/bin/python -c "
import re
name = next((l.split(':', 1)[1] for l in open('/proc/cpuinfo') if l.startswith('model name')), 'unknown')
print(re.sub('[^a-z0-9]+', '-', name.strip().lower()).strip('-'))")
STORE="file://$PWD/bench/baselines/$CPU"
COMMON=(-q -p no:cacheprovider tests/benchmarks --benchmark-enable --benchmark-only
        --benchmark-storage="$STORE" --benchmark-columns=min,median,iqr,rounds --benchmark-sort=name)
export HF_HUB_OFFLINE=1
if [ "${1:-}" = "--save" ]; then
  shift
  exec .venv/bin/python -m pytest "${COMMON[@]}" --benchmark-save=baseline "$@"
fi
if ! ls "bench/baselines/$CPU"/*/*baseline.json > /dev/null 2>&1; then
  echo "no baseline for this CPU ($CPU) in bench/baselines/: run 'bash scripts/bench_regress.sh --save' first" >&2
  exit 2
fi
exec .venv/bin/python -m pytest "${COMMON[@]}" --benchmark-compare --benchmark-compare-fail=median:25% "$@"
