#!/usr/bin/env bash
# Build our binaries and the e2e harness, then run the e2e scenarios against a real
# kube-apiserver + kube-scheduler (in-process, Kubernetes v1.37.2 from its Go modules) and
# hollow GPU nodes running the kubelet's device manager. Prints each scenario as it runs.
#   scripts/e2e-run.sh            # all scenarios
#   scripts/e2e-run.sh -run 'TestScenario3'   # extra `go test` arguments
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command -v go >/dev/null || { echo "e2e-run: Go >= 1.26 is required (https://go.dev/dl/)" >&2; exit 1; }
started=$(date +%s)
step() { printf '\n==> %s (+%ss)\n' "$*" "$(( $(date +%s) - started ))"; }
step "go mod download (e2e/)"
(cd "$ROOT/e2e" && go mod download)
step "build vramslice-device-plugin, vramslice-extender and the e2e launcher"
make -C "$ROOT/e2e" build
step "e2e scenarios"
cd "$ROOT/e2e"
# -json through the summariser: the same -v text, then each failure's reason once more at the
# very end, after the component logs a failed scenario dumps.
go test -count=1 -json -timeout "${GO_TEST_TIMEOUT:-30m}" ./cluster/ ./cmd/vramslice-cluster/ ./scenarios/ "$@" \
  | python3 "$ROOT/scripts/e2e-summary.py"
step "the demo's story (make demo, printing once and exiting)"
demo_log=$(mktemp)
if ! "$ROOT/e2e/bin/vramslice-cluster" --apply "$ROOT/examples/pods" --story --exit >"$demo_log" 2>&1; then
  cat "$demo_log"
  echo "e2e-run: the demo's story failed (output above)" >&2
  rm -f "$demo_log"
  exit 1
fi
grep -E '^[①②③]' "$demo_log"
rm -f "$demo_log"
step "e2e done in $(( $(date +%s) - started ))s"
