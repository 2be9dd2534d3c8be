#!/usr/bin/env bash
# The whole test suite: install, then lint (ruff), types (mypy), tests (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
source scripts/env.sh 2>/dev/null
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m mypy
"$PY" -m pytest -q --durations=10 "$@"
