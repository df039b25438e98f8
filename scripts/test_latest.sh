#!/usr/bin/env bash
# The suite on the newest releases of every dependency, in its own .venv-latest, without
# constraints/tested.txt: the early warning that a new upstream release breaks us or breaks a
# pair of peers (e.g. transformers and peft). Not blocking: .ci/run does not call it.
# Tests that need two peer libraries to agree skip with the reason when they do not (-rs lists them).
# It runs in a copy of the tree (.venv-latest/src: tracked and untracked files, not ignored
# ones), so its build of the compiled extension never replaces the one .venv uses.
# torch stays the CPU build 2.13.0 unless FASTPEFT_LATEST_TORCH=1 (the newest torch pip may take
# here is a multi-GB CUDA build). If it passes: bash scripts/update_constraints.sh to move the pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=$PWD/.venv-latest
SRC=$VENV/src
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
rm -rf "$SRC" && mkdir -p "$SRC"
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$SRC"
# torch is held by a one-line constraints file (an eager upgrade of the other packages would
# otherwise upgrade it too); FASTPEFT_LATEST_TORCH=1 lets it move.
HOLD=$(mktemp)
trap 'rm -f "$HOLD"' EXIT
if [ "${FASTPEFT_LATEST_TORCH:-0}" = "1" ]; then : > "$HOLD"; else echo "torch==2.13.0" > "$HOLD"; fi
pip_install() { "$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -c "$HOLD" "$@"; }
pip_install pip setuptools wheel
pip_install torch
cd "$SRC"
FASTPEFT_REQUIRE_EXT=1 pip_install --no-build-isolation -e ".[test,bench]"
echo "newest releases:"
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|peft|bitsandbytes|accelerate|huggingface.hub|safetensors|pytest|ruff) '
"$VENV/bin/python" -c "from fastpeft import _ext; from fastpeft.ops import fastpath; assert _ext.available() and fastpath.module, (_ext.error, fastpath.error)"
"$VENV/bin/python" -m ruff check . || echo "ruff: findings above (newer ruff release?)"
export HF_HUB_OFFLINE=1
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs "$@"
