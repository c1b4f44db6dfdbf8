#!/usr/bin/env bash
# The real-GPU check (docs/gpu-check.md). Three ways to call it:
#
#   scripts/gpu-check.sh --build     HERE (cargo, zig): build the bundle .gpu-check/ (gitignored):
#                                    stripped release binaries and the guard linked against a
#                                    glibc 2.28 floor, the Python sidecar package (abi3), the fake
#                                    drivers for the dry run, a manifest
#   scripts/gpu-check.sh             ON THE GPU MACHINE: run every check from the bundle (no cargo,
#                                    no network; <= 8 minutes); table on stdout, JSON in $OUT
#   scripts/gpu-check.sh --dry-run   anywhere: the same checks on the fake CUDA driver and fake
#                                    NVML; those that need PyTorch or a GPU show as NOT-RUN
#   ... --only guard,infer           (either of the last two) run only these groups (plugin, guard,
#                                    vllm, infer): a rerun of what failed in the device time left;
#                                    the summary says "partial run"
#
# Env: OUT (results directory; default .gpu-check/out, or .gpu-check/out-dry-run), PYTHON (the
# interpreter with torch; default python3), GPU_CHECK_BUNDLE (default .gpu-check), GLIBC_FLOOR.
# Exits non-zero when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
bundle="${GPU_CHECK_BUNDLE:-$root/.gpu-check}"
floor="${GLIBC_FLOOR:-2.28}"
max_bundle_mib=60

build() {
  local started; started=$(date +%s)
  # shellcheck source=SCRIPTDIR/zig-tools.sh
  . scripts/zig-tools.sh
  zig_tools_setup
  local target_dir="$root/target/glibc-floor" out="$root/target/glibc-floor/$ZIG_TARGET/release"
  # The same target dir and profile as check-glibc-floor.sh, so each build reuses the other's.
  cargo zigbuild --quiet --release --target "$ZIG_TARGET.$floor" --target-dir "$target_dir" \
    -p vramslice-device-plugin --bin vramslice-device-plugin
  cargo zigbuild --quiet --release --target "$ZIG_TARGET.$floor" --target-dir "$target_dir" \
    -p vramslice-gpu-check --bin vramslice-gpu-check
  cargo zigbuild --quiet --release --target "$ZIG_TARGET.$floor" --target-dir "$target_dir" \
    -p vramslice-guard --lib
  # abi3-py39: one extension module for any CPython >= 3.9 (the GPU machine's is unknown).
  PYO3_PYTHON="${PYO3_PYTHON:-python3}" cargo zigbuild --quiet --release --target "$ZIG_TARGET.$floor" \
    --target-dir "$target_dir" -p vramslice-sidecar-py --lib

  rm -rf "$bundle"
  mkdir -p "$bundle/bin" "$bundle/lib" "$bundle/python/vramslice" "$bundle/fake" "$bundle/fake-nvml"
  strip -o "$bundle/bin/vramslice-device-plugin" "$out/vramslice-device-plugin"
  strip -o "$bundle/bin/vramslice-gpu-check" "$out/vramslice-gpu-check"
  strip --strip-unneeded -o "$bundle/lib/libvramslice_guard.so" "$out/libvramslice_guard.so"
  cp crates/vramslice-sidecar-py/python/vramslice/*.py "$bundle/python/vramslice/"
  strip --strip-unneeded -o "$bundle/python/vramslice/_native.abi3.so" "$out/lib_native.so"
  # The fake drivers, for --dry-run only (the real run uses the machine's libcuda and NVML). The
  # fake NVML reads a state file next to itself, so the dry run copies it into its work dir.
  "${CC:-cc}" -O2 -fPIC -shared -Wl,-Bsymbolic -Wl,-soname,libcuda.so.1 \
    -o "$bundle/fake/libcuda.so.1" crates/vramslice-guard/fake-cuda/fake_cuda.c
  "${CC:-cc}" -O1 -Wall -Werror -fPIC -shared -o "$bundle/fake-nvml/libnvidia-ml.so.1" \
    crates/vramslice-gpu/tests/fake_nvml/fake_nvml.c -ldl

  local f highest bad=0
  for f in "$bundle/bin/"* "$bundle/lib/"*.so "$bundle/python/vramslice/"*.so; do
    highest=$(glibc_highest "$f")
    if ! version_at_most "${highest:-0}" "$floor"; then
      echo "FAIL: $f needs GLIBC_$highest, above the floor $floor" >&2
      bad=1
    fi
    printf '  %-48s %6s KiB  GLIBC <= %s\n' "${f#"$bundle"/}" "$(( $(stat -c %s "$f") / 1024 ))" "$highest"
  done
  local size_mib=$(( $(du -sb "$bundle" | cut -f1) / 1048576 ))
  python3 - "$bundle" "$floor" "$size_mib" <<'PY'
import json, subprocess, sys, time
bundle, floor, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
json.dump({"commit": commit + ("-dirty" if dirty else ""), "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "glibc_floor": floor, "size_mib": size}, open(f"{bundle}/manifest.json", "w"), indent=2)
PY
  echo "bundle $bundle: ${size_mib} MiB (limit ${max_bundle_mib}), built in $(( $(date +%s) - started )) s"
  [ "$size_mib" -le "$max_bundle_mib" ] || { echo "FAIL: the bundle is over ${max_bundle_mib} MiB" >&2; bad=1; }
  return $bad
}

case "${1:-}" in
  --build)
    [ $# -eq 1 ] || { echo "usage: scripts/gpu-check.sh --build" >&2; exit 2; }
    build ;;
  --dry-run)
    shift
    [ -d "$bundle" ] || { echo "no bundle at $bundle: run scripts/gpu-check.sh --build first" >&2; exit 2; }
    out="${OUT:-$bundle/out-dry-run}"
    "${PYTHON:-python3}" -m unittest discover -q -s scripts/gpu-check -p 'test_*.py'
    exec "${PYTHON:-python3}" scripts/gpu-check/gpucheck.py --bundle "$bundle" --out "$out" --dry-run "$@" ;;
  "" | --only | --only=*)
    [ -d "$bundle" ] || { echo "no bundle at $bundle: run scripts/gpu-check.sh --build where cargo is, and carry it" >&2; exit 2; }
    out="${OUT:-$bundle/out}"
    exec "${PYTHON:-python3}" scripts/gpu-check/gpucheck.py --bundle "$bundle" --out "$out" "$@" ;;
  *) echo "usage: scripts/gpu-check.sh [--build | [--dry-run] [--only GROUP,...]]" >&2; exit 2 ;;
esac
