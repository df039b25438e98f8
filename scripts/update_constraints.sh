#!/usr/bin/env bash
# Regenerates constraints/tested.txt (the pinned set CI installs) from a virtual environment
# whose suite passed, by default the one scripts/test_latest.sh made:
#   bash scripts/test_latest.sh && bash scripts/update_constraints.sh    # then commit the file
# torch's local build label (+cpu) is dropped, so the pin also matches the PyPI build elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-latest}
if [ ! -x "$VENV/bin/python" ]; then
  echo "no virtual environment at $VENV (run scripts/test_latest.sh first)" >&2
  exit 2
fi
OUT=constraints/tested.txt
TORCH=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
if [[ "$TORCH" != *+cpu ]]; then
  echo "torch $TORCH in $VENV is not the CPU build: the tested set pins the CPU build (rerun test_latest.sh without FASTPEFT_LATEST_TORCH)" >&2
  exit 2
fi
TMP=$(mktemp)
trap 'rm -f "$TMP"' EXIT
{
  echo "# The tested set: exact versions of everything CI installs (scripts/setup_env.sh -c's this file)."
  echo "# Regenerate: bash scripts/test_latest.sh && bash scripts/update_constraints.sh ($(date -u +%F), from $VENV)."
  echo "# Build tools, installed first (the extension compiles without build isolation):"
  "$VENV/bin/python" -m pip freeze --all --exclude-editable 2>/dev/null | grep -E '^(pip|setuptools|wheel)==' | sort -f
  echo "# Everything else ('pip install -e .[test,bench]' with its dependencies):"
  "$VENV/bin/python" -m pip freeze --exclude-editable 2>/dev/null \
    | grep -vE '^(pip|setuptools|wheel|fastpeft)==' | { grep -v '^#' || true; } | sed -E 's/^(torch==[^+]*)\+.*/\1/' | sort -f
} > "$TMP"
mv "$TMP" "$OUT"
echo "wrote $OUT ($(grep -vc '^#' "$OUT") pins)"
