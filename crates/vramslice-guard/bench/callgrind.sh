#!/usr/bin/env bash
# Instruction count per cuMemAlloc_v2 + cuMemFree_v2 pair against the fake driver, with and
# without the guard, measured with valgrind --tool=callgrind (repeatable, unlike wall time).
# Two run lengths are measured and subtracted, so start-up cost drops out.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
cargo build -q --release -p vramslice-guard --manifest-path "$root/Cargo.toml"
target="$(cargo metadata -q --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
guard="$target/release/libvramslice_guard.so"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$here/../scripts/build-c.sh" "$work/c"
export VRAMSLICE_REAL_LIBCUDA="$work/c/libcuda.so.1"
n1=20000 n2=120000

instructions() { # preload-or-empty pairs -> total instructions executed
  local out="$work/cg.out.$RANDOM"
  env ${1:+LD_PRELOAD="$1"} valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$work/c/probe" bench "$2" 256 >/dev/null 2>&1
  awk '/^summary:/ {print $2}' "$out"
}
per_pair() { # preload-or-empty -> instructions per pair (the probe runs 1.1 x pairs incl. warm-up)
  local a b
  a=$(instructions "$1" $n1); b=$(instructions "$1" $n2)
  python3 -c "print(f'{($b - $a) / (1.1 * ($n2 - $n1)):.1f}')"
}
base=$(per_pair "")
pass=$(env -u VRAMSLICE_VRAM_LIMIT_BYTES bash -c "$(declare -f instructions per_pair); work=$work n1=$n1 n2=$n2; per_pair $guard")
private=$(VRAMSLICE_VRAM_LIMIT_BYTES=$((1 << 30)) per_pair "$guard")
shared=$(VRAMSLICE_VRAM_LIMIT_BYTES=$((1 << 30)) VRAMSLICE_ACCOUNTING_DIR="$work" per_pair "$guard")
echo "instructions per alloc/free pair (callgrind):"
echo "  without guard                      $base"
echo "  guard, no limit (pass-through)     $pass"
echo "  guard, limit, per-process account  $private"
echo "  guard, limit, shared account file  $shared"
python3 -c "print(f'  added by the guard (shared file)   {$shared - $base:.1f}')"
