# Sourced by the other scripts: choose the Python they install into and run, as $PY,
# and put its bin/ first on PATH (so `phema` and `torchrun` are that environment's).
#   - $PYTHON, if set, is used as it is.
#   - Inside an active virtual or conda environment, its python.
#   - Otherwise the project's own virtual environment, .venv, created on first use:
#     many system Pythons are marked externally managed (PEP 668) and refuse pip
#     installs, and a project environment never touches the system's packages.
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
  PY="python3"
else
  if [ ! -x .venv/bin/python ]; then
    echo "phema: no virtual environment is active; creating the project's own in .venv" >&2
    base="$(command -v python3 || true)"
    if [ -z "$base" ] || ! "$base" -m venv .venv; then
      rm -rf .venv
      echo "phema: could not create .venv: install Python >= 3.11 with its venv module" \
        "(Debian/Ubuntu: apt install python3-venv), or activate an environment, or set" \
        "PYTHON=/path/to/python" >&2
      exit 1
    fi
  fi
  echo "phema: using the project's virtual environment .venv" \
    "(source .venv/bin/activate to use phema outside these scripts)" >&2
  export VIRTUAL_ENV="$PWD/.venv"
  PY="$VIRTUAL_ENV/bin/python"
fi
PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"
export PATH
