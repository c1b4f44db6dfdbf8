#!/usr/bin/env bash
# Create (or reuse) the repository's Python virtual environment at .venv/ (gitignored) and install
# what the Python package, its tests and the Python example need: maturin, pytest, flask,
# gunicorn. Idempotent; prints the venv path. Override the interpreter with PYTHON=...
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VRAMSLICE_VENV:-$PWD/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.vramslice-deps-v1"
if [ ! -e "$stamp" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "maturin>=1.7,<2" "pytest>=7" "flask>=3,<4" "gunicorn>=22"
  touch "$stamp"
fi
echo "$venv"
