#!/usr/bin/env bash
# The whole test suite: `make test` runs this, and CI runs it through .ci/run.
# Every step installs what it needs from the package registries (Go modules, PyPI, Debian).
set -euo pipefail
cd "$(dirname "$0")/.."

# Cache builds outside the checkout where the machine lets us: CI clones afresh every time, so
# keep cargo's target directory in the user's cache and link it in.
if [ "${CI:-}" = "true" ] && [ ! -e target ]; then
  cache="${VRAMSLICE_CACHE_DIR:-$HOME/.cache/vramslice}/target"
  mkdir -p "$cache"
  ln -s "$cache" target
fi

started=$(date +%s)
step() { printf '\n==> %s (+%ss)\n' "$*" "$(( $(date +%s) - started ))"; }

step "rustfmt"
cargo fmt --all -- --check

step "clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test (unit, property, integration, doc tests)"
cargo test --workspace

step "done in $(( $(date +%s) - started ))s"
