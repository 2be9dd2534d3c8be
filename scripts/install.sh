#!/usr/bin/env bash
# Install phema in editable mode with the given extra (e.g. `test`) into the Python that
# scripts/env.sh chooses (the active environment, else the project's .venv). Where no
# torch is installed, take a CPU build first so that resolving `torch` never pulls the
# multi-GB CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
source scripts/env.sh
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "phema: no torch found; installing a CPU build" >&2
  "$PY" -m pip install --quiet "torch==2.13.0+cpu" \
    || "$PY" -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
fi
# This tree was once installed under the distribution name `phema`: drop that install so
# that only torch-phema owns the package and the `phema` command.
old_install="$("$PY" -m pip show phema 2>/dev/null || true)"
if grep -qx "Editable project location: $PWD" <<<"$old_install"; then
  echo "phema: replacing the old editable install named 'phema' by torch-phema" >&2
  "$PY" -m pip uninstall --quiet --yes phema
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".${extra:+[$extra]}"
