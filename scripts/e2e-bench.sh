#!/usr/bin/env bash
# Schedule 1,000 single-container pods onto 50 hollow nodes with the real kube-scheduler, with
# vramslice-extender and without it (same cluster), and print pods/second and the ratio.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
make -C "$ROOT/e2e" build
cd "$ROOT"
exec "$ROOT/e2e/bin/vramslice-bench" --pods "${PODS:-1000}" --nodes "${NODES:-50}" "$@"
