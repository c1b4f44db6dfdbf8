#!/usr/bin/env bash
# The scheduling benchmark: single-container pods onto hollow nodes with the real kube-scheduler,
# through vramslice-extender and without it (same cluster), release builds of our binaries.
# Prints per-verb extender latencies, scheduler retries, CPU per component, pods/second and the
# ratio, first at 50 nodes x 1,000 pods, then (unless SCALE=0) at a larger scale, so the change
# of the ratio with scale shows. NODES/PODS and SCALE_NODES/SCALE_PODS override the sizes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
make -C "$ROOT/e2e" rust-release go
cd "$ROOT"
# The hollow nodes' files (device-manager checkpoints, limit files, accounting directories) and
# etcd's data go to tmpfs when there is one: on a real cluster those writes cost each node its own
# CPU, and on this one shared disk their inode allocations were ~1 ms of plugin CPU per pod start.
if [[ -z "${TMPDIR:-}" && -d /dev/shm && -w /dev/shm ]]; then
  export TMPDIR=/dev/shm
fi
echo "cluster files under ${TMPDIR:-/tmp}"
BENCH=("$ROOT/e2e/bin/vramslice-bench" --bin-dir "$ROOT/target/release")
summary=()
run() {
  local nodes=$1 pods=$2 log
  shift 2
  log=$(mktemp)
  "${BENCH[@]}" --nodes "$nodes" --pods "$pods" "$@" | tee "$log"
  summary+=("$(printf '%4d nodes x %5d pods: %s' "$nodes" "$pods" \
    "$(grep -E 'ratio extender/plain' "$log" | sed 's/^ *ratio extender\/plain //' | paste -sd ' ' -)")")
  rm -f "$log"
}
run "${NODES:-50}" "${PODS:-1000}" "$@"
if [[ "${SCALE:-1}" != 0 ]]; then
  run "${SCALE_NODES:-500}" "${SCALE_PODS:-5000}" --timeout 20m "$@"
fi
echo
echo "ratio by scale:"
printf '  %s\n' "${summary[@]}"
