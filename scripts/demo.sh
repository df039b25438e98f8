#!/usr/bin/env bash
# Main job: set up, then the demo on the built-in default model (no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m fastpeft.demo "$@"
