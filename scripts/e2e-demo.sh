#!/usr/bin/env bash
# Build everything, start the local cluster with two hollow nodes of fake GPUs
# (gpu-node-a: 2 x A100 80 GiB, gpu-node-b: 1 x L4 24 GiB), apply examples/pods/*.yaml, print
# `kubectl get gpunodes -o wide` and where each pod landed with its limit, then keep the cluster
# up (the kubeconfig path is printed) until Ctrl-C, which stops and cleans up everything. Before
# that, --story shows live usage at work (LIVE USED per GPU and per pod; a process outside
# Kubernetes steering the next pod away; a pod past its limit drawing the watchdog's Event).
# Extra arguments go to the launcher (e2e/bin/vramslice-cluster -h lists them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command -v go >/dev/null || { echo "e2e-demo: Go >= 1.26 is required (https://go.dev/dl/)" >&2; exit 1; }
make -C "$ROOT/e2e" build
cd "$ROOT"
exec "$ROOT/e2e/bin/vramslice-cluster" --apply examples/pods --story "$@"
