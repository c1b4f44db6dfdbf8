#!/usr/bin/env bash
# Runs probe scenarios with the guard preloaded under valgrind memcheck (--error-exitcode=1):
# every covered entry point through direct linking and cuGetProcAddress, contexts/modules, fork,
# and a multi-threaded race. Exits non-zero on any memory error or failed check.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
cargo build -q -p vramslice-guard --manifest-path "$root/Cargo.toml"
target="$(cargo metadata -q --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
guard="$target/debug/libvramslice_guard.so"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$here/build-c.sh" "$work/c"
export VRAMSLICE_REAL_LIBCUDA="$work/c/libcuda.so.1" VRAMSLICE_REAL_LIBNVML="$work/c/libcuda.so.1"
export FAKE_CUDA_DEVICE_BYTES=$((4096 << 20))
mib=$((1 << 20))
vg=(valgrind --error-exitcode=1 --leak-check=no --trace-children=yes --quiet
    --suppressions="$here/valgrind.supp")
run() {
  echo "== $*"
  env LD_PRELOAD="$guard" "${vg[@]}" "$work/c/probe" "$@" | tail -1
}
limit=$((100 * mib))
VRAMSLICE_VRAM_LIMIT_BYTES=$limit VRAMSLICE_CONTEXT_ESTIMATE_BYTES=0 run entrypoints direct limited $limit
VRAMSLICE_VRAM_LIMIT_BYTES=$limit VRAMSLICE_CONTEXT_ESTIMATE_BYTES=0 VRAMSLICE_ACCOUNTING_DIR="$work" \
  run entrypoints gpa_ptsz limited $limit
VRAMSLICE_VRAM_LIMIT_BYTES=$((1024 * mib)) VRAMSLICE_CONTEXT_ESTIMATE_BYTES=$((10 * mib)) \
  FAKE_CUDA_CTX_BYTES=$((64 * mib)) FAKE_CUDA_MODULE_BYTES=$mib run contexts $((10 * mib)) $((64 * mib)) $mib
VRAMSLICE_VRAM_LIMIT_BYTES=$limit VRAMSLICE_ACCOUNTING_DIR="$work" run fork $((30 * mib)) $limit
VRAMSLICE_VRAM_LIMIT_BYTES=$((16 * mib)) VRAMSLICE_ACCOUNTING_DIR="$work" run race 4 500 $((2 * mib))
run entrypoints dlsym unlimited $limit
VRAMSLICE_VRAM_LIMIT_BYTES=$((256 * mib)) VRAMSLICE_CONTEXT_ESTIMATE_BYTES=0 FAKE_CUDA_CTX_BYTES=0 \
  VRAMSLICE_ACCOUNTING_DIR="$work" run vmm gpa $((256 * mib))
echo "valgrind memcheck: all scenarios clean"
