#!/usr/bin/env bash
# CI for the real-GPU check (docs/gpu-check.md), so it cannot rot between GPU sessions:
#   1. build the bundle (.gpu-check/) exactly as a GPU session would carry it;
#   2. run `scripts/gpu-check.sh --dry-run` from it on the fake CUDA driver and fake NVML, with a
#      PATH that has no cargo (the bundle must be self-contained);
#   3. rerun one group (--only guard), which must run that group alone and say it was partial;
#   4. rerun plugin and guard with the fake NVML listing other PIDs (a host PID namespace, as in a
#      gVisor sandbox): the per-process checks must match by size and still pass;
#   5. run it again with a guard that does nothing, and require that the dry run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
scripts/gpu-check.sh --build

python_dir="$(dirname "$(command -v python3)")"
bare_path="$python_dir:/usr/bin:/bin"
if PATH="$bare_path" command -v cargo >/dev/null; then
  echo "note: cargo is on the bare PATH ($bare_path); the no-cargo part proves less here"
fi
OUT="$PWD/.gpu-check/out-dry-run" PATH="$bare_path" scripts/gpu-check.sh --dry-run

# A rerun of one group (what a GPU session does with the device time left) runs only that group
# and says it was partial.
only_out="$PWD/.gpu-check/out-dry-run-only"
OUT="$only_out" PATH="$bare_path" scripts/gpu-check.sh --dry-run --only guard >/dev/null
grep -q '(partial run: only guard;' "$only_out/gpu-check.txt" \
  || { echo "FAIL: --only guard did not report a partial run" >&2; exit 1; }
if grep -q '^plugin ' "$only_out/gpu-check.txt"; then
  echo "FAIL: --only guard ran the plugin group" >&2; exit 1
fi
echo "partial run: --only guard ran the guard group alone and said so"

# NVML from another PID namespace (gVisor lists host PIDs): the holder, the plain context and the
# filled slice are matched by their memory use, said so in the JSON, and the checks still pass.
pids_out="$PWD/.gpu-check/out-dry-run-host-pids"
GPUCHECK_FAKE_HOST_PID_OFFSET=1000000 OUT="$pids_out" PATH="$bare_path" \
  scripts/gpu-check.sh --dry-run --only plugin,guard >/dev/null
by_size=$(grep -c '"matched_by": "size"' "$pids_out/gpu-check.json" || true)
if [ "$by_size" -lt 3 ] || ! grep -q '"nvml_pid_namespace"' "$pids_out/gpu-check.json"; then
  echo "FAIL: with host PIDs in NVML, $by_size results were matched by size (expected >= 3)" >&2; exit 1
fi
echo "host PID namespace: $by_size processes matched by size, checks passed"

# The same dry run over a bundle whose guard is an empty library must fail: the checks can fail.
broken="$(mktemp -d)"
trap 'rm -rf "$broken"' EXIT
cp -r .gpu-check/. "$broken/"
rm -rf "$broken/out-dry-run"
echo 'int vramslice_guard_removed_for_the_negative_check;' >"$broken/empty.c"
"${CC:-cc}" -shared -fPIC -o "$broken/lib/libvramslice_guard.so" "$broken/empty.c"
if GPU_CHECK_BUNDLE="$broken" OUT="$broken/out" PATH="$bare_path" scripts/gpu-check.sh --dry-run >"$broken/log" 2>&1; then
  cat "$broken/log"
  echo "FAIL: the dry run passed with a guard that does nothing" >&2
  exit 1
fi
failed=$(grep -c '  FAIL$' "$broken/out/gpu-check.txt" || true)
echo "negative check: with an empty guard the dry run fails ($failed checks failed), as it must"
[ "$failed" -ge 5 ] || { echo "FAIL: expected the slice checks to fail, got $failed failures" >&2; exit 1; }
echo "gpu-check dry run: $(( $(date +%s) - started )) s in all"
