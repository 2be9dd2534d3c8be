# Sourced by the other scripts: choose the Python they install into and run, as $PY,
# and put its bin/ first on PATH (so `phema` and `torchrun` are that environment's).
#   - $PYTHON, if set, is used as it is.
#   - Inside an active virtual or conda environment, its python.
#   - Otherwise the project's own virtual environment, .venv, created on first use:
#     many system Pythons are marked externally managed (PEP 668) and refuse pip
#     installs, and a project environment never touches the system's packages.
_phema_fail() {
  echo "phema: $*" >&2
  exit 1
}
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
  [ -x "$PY" ] || _phema_fail "the active virtual environment $VIRTUAL_ENV has no" \
    "bin/python (removed?): deactivate it, or recreate it"
elif [ -n "${CONDA_PREFIX:-}" ]; then
  PY="$CONDA_PREFIX/bin/python"
  [ -x "$PY" ] || _phema_fail "the active conda environment $CONDA_PREFIX has no bin/python"
else
  if [ ! -x .venv/bin/python ]; then
    echo "phema: no virtual environment is active; creating the project's own in .venv" >&2
    base="$(command -v python3 || true)"
    if [ -z "$base" ] || ! "$base" -m venv .venv; then
      rm -rf .venv
      _phema_fail "could not create .venv: install Python >= 3.11 with its venv module" \
        "(Debian/Ubuntu: apt install python3-venv), or activate an environment, or set" \
        "PYTHON=/path/to/python"
    fi
  fi
  echo "phema: using the project's virtual environment .venv" \
    "(source .venv/bin/activate to use phema outside these scripts)" >&2
  export VIRTUAL_ENV="$PWD/.venv"
  PY="$VIRTUAL_ENV/bin/python"
fi
_phema_exe="$("$PY" -c 'import sys; print(sys.executable)' 2>/dev/null)" \
  || _phema_fail "$PY does not run: set PYTHON to a Python >= 3.11, or unset it"
PATH="$(dirname "$_phema_exe"):$PATH"
export PATH
