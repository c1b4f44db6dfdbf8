#!/usr/bin/env bash
# Build the `vramslice` Python package (PyO3 + maturin, crates/vramslice-sidecar-py) into the
# repository venv and run its pytest suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(scripts/install-python-deps.sh)"
export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
# The runtime reads VRAMSLICE_* from the environment; tests configure it explicitly.
unset VRAMSLICE_VRAM_LIMIT_BYTES VRAMSLICE_ACCOUNTING_DIR VRAMSLICE_PROFILE_DIR || true
started=$(date +%s)
maturin develop --quiet --manifest-path crates/vramslice-sidecar-py/Cargo.toml
echo "maturin develop: $(( $(date +%s) - started ))s"
python -m pytest -q crates/vramslice-sidecar-py/tests "$@"
