#!/usr/bin/env bash
# Download the e2e module's dependencies (Kubernetes v1.37.2 and its staging modules, etcd)
# through the Go module proxy, verified against go.sum. Go >= 1.26 must be installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command -v go >/dev/null || { echo "install-go-deps: Go >= 1.26 is required (https://go.dev/dl/)" >&2; exit 1; }
cd "$ROOT/e2e" && go mod download && go mod verify
