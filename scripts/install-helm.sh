#!/usr/bin/env bash
# Install Helm from its Go module at a pinned version into .tools/bin (gitignored), or into
# $VRAMSLICE_TOOLS_DIR/bin when set (CI points it at a cache directory).
#
#   scripts/install-helm.sh          # prints the path of the helm binary on stdout
#
# Cache-friendly: when .tools/bin/helm already reports the pinned version, nothing is built.
# Needs only `go` (the Go module proxy); no prebuilt binary is downloaded.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.19.5}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="${VRAMSLICE_TOOLS_DIR:-$ROOT/.tools}/bin"
HELM="$BIN_DIR/helm"

if [[ -x "$HELM" ]] && "$HELM" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
  echo "$HELM"
  exit 0
fi

command -v go >/dev/null || { echo "install-helm: go is not on PATH; install Go 1.24+ first" >&2; exit 1; }
mkdir -p "$BIN_DIR"
echo "install-helm: building helm $HELM_VERSION from helm.sh/helm/v3 (one-off, a few minutes)" >&2
# -ldflags sets the version string helm reports (a go-installed helm otherwise says v3.x-unreleased);
# the same variable the Helm Makefile sets.
GOBIN="$BIN_DIR" GOFLAGS="${GOFLAGS:-} -mod=mod" go install \
  -ldflags "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
  "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
"$HELM" version --template '{{.Version}}' | grep -qx "$HELM_VERSION" \
  || { echo "install-helm: built helm does not report $HELM_VERSION" >&2; exit 1; }
echo "$HELM"
