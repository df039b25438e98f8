#!/usr/bin/env bash
# Creates .venv (if missing) and installs fastpeft with everything the demo and the tests need,
# at the versions CI tested: pyproject.toml's [test] and [bench] extras, pinned by constraints/tested.txt
# (README, "Versions and upgrades"). torch comes first, pinned to the CPU build 2.13.0 (without
# the pin pip picks a multi-GB CUDA build), so nothing later pulls in another build.
# The compiled extension builds in place; FASTPEFT_SKIP_EXT=1 skips it, FASTPEFT_REQUIRE_EXT=1
# makes a failed build fail this script (scripts/test.sh sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=${FASTPEFT_CONSTRAINTS:-constraints/tested.txt}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install -q -c "$CONSTRAINTS" "$@"; }
pip_install --upgrade pip setuptools wheel  # setuptools >= 77 (pyproject.toml's license field)
pip_install torch
pip_install --no-build-isolation -e ".[test,bench]"
