#!/usr/bin/env bash
# Install phema and run its demo: train a small model with PowerFunctionEMA, then
# reconstruct other EMA lengths from the tracked profiles and print a table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/env.sh 2>/dev/null
"$PY" -m phema_cli demo "$@"
