#!/usr/bin/env bash
# Build libvramslice_guard.so against an old glibc floor with cargo-zigbuild and check that no
# symbol it imports needs a newer GLIBC_ version (objdump -T). Real CUDA images (UBI 8, Ubuntu
# 20.04, Rocky 8) ship glibc 2.28..2.31; a guard linked against the build host's newer glibc would
# fail to load there, silently leaving the container unguarded.
#
# Tools: zig and cargo-zigbuild, pinned and installed once (scripts/zig-tools.sh).
# Env: GLIBC_FLOOR (default 2.28); VRAMSLICE_TOOLS_DIR (default .tools; e.g. a CI cache dir).
# Prints the highest GLIBC_ version found; exits 1 above the floor.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
floor="${GLIBC_FLOOR:-2.28}"
start=$(date +%s)
# shellcheck source=SCRIPTDIR/zig-tools.sh
. scripts/zig-tools.sh
zig_tools_setup
target="$ZIG_TARGET"
# A separate target dir: zig-linked artefacts must not replace the host build's cdylib.
target_dir="$root/target/glibc-floor"
build_start=$(date +%s)
cargo zigbuild --quiet --release -p vramslice-guard --lib \
  --target "$target.$floor" --target-dir "$target_dir"
lib="$target_dir/$target/release/libvramslice_guard.so"
[ -f "$lib" ] || { echo "FAIL: $lib was not built" >&2; exit 1; }

versions=$(objdump -T "$lib" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -u -V)
highest=$(glibc_highest "$lib")
end=$(date +%s)
echo "GLIBC versions needed: $(echo "$versions" | tr '\n' ' ')"
echo "highest GLIBC_ symbol version: $highest (floor $floor)"
echo "time: build $((end - build_start)) s, total $((end - start)) s"
if ! version_at_most "$highest" "$floor"; then
  echo "FAIL: $lib needs GLIBC_$highest, above the floor $floor:" >&2
  objdump -T "$lib" | grep "GLIBC_$highest" >&2
  exit 1
fi
echo "OK: $lib loads on glibc >= $floor"
