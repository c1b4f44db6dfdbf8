#!/usr/bin/env bash
# Build libvramslice_guard.so against an old glibc floor with cargo-zigbuild and check that no
# symbol it imports needs a newer GLIBC_ version (objdump -T). Real CUDA images (UBI 8, Ubuntu
# 20.04, Rocky 8) ship glibc 2.28..2.31; a guard linked against the build host's newer glibc would
# fail to load there, silently leaving the container unguarded.
#
# Tools (pinned, installed once into the repository's .tools/, gitignored; skipped when present):
#   zig      from PyPI `ziglang==$ZIG_VERSION` into .tools/venv-zig
#   cargo-zigbuild $ZIGBUILD_VERSION via `cargo install --locked --root .tools`
# Env: GLIBC_FLOOR (default 2.28); VRAMSLICE_TOOLS_DIR (default .tools; e.g. a CI cache dir).
# Prints the highest GLIBC_ version found; exits 1 above the floor.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
floor="${GLIBC_FLOOR:-2.28}"
ZIG_VERSION="0.13.0.post1"
ZIGBUILD_VERSION="0.19.8"
tools="${VRAMSLICE_TOOLS_DIR:-$root/.tools}"
venv="$tools/venv-zig"
start=$(date +%s)

if [ ! -x "$venv/bin/python-zig" ] || ! "$venv/bin/python" -m ziglang version >/dev/null 2>&1; then
  echo "installing ziglang==$ZIG_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet "ziglang==$ZIG_VERSION"
  # cargo-zigbuild looks for `python -m ziglang` when no `zig` is on PATH; give it a `zig` too.
  printf '#!/bin/sh\nexec "%s" -m ziglang "$@"\n' "$venv/bin/python" >"$venv/bin/python-zig"
  chmod +x "$venv/bin/python-zig"
fi
mkdir -p "$tools/zigbin"
ln -sf "$venv/bin/python-zig" "$tools/zigbin/zig"
if ! "$tools/bin/cargo-zigbuild" --version 2>/dev/null | grep -q "$ZIGBUILD_VERSION"; then
  echo "installing cargo-zigbuild $ZIGBUILD_VERSION into $tools"
  cargo install --locked --quiet --root "$tools" --version "$ZIGBUILD_VERSION" cargo-zigbuild
fi
echo "zig $("$tools/zigbin/zig" version), $("$tools/bin/cargo-zigbuild" --version)"

export PATH="$tools/zigbin:$tools/bin:$PATH"
target="x86_64-unknown-linux-gnu"
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
# A separate target dir: zig-linked artefacts must not replace the host build's cdylib.
target_dir="$root/target/glibc-floor"
build_start=$(date +%s)
cargo zigbuild --quiet --release -p vramslice-guard --lib \
  --target "$target.$floor" --target-dir "$target_dir"
lib="$target_dir/$target/release/libvramslice_guard.so"
[ -f "$lib" ] || { echo "FAIL: $lib was not built" >&2; exit 1; }

versions=$(objdump -T "$lib" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -u -V)
highest=$(printf '%s\n' "$versions" | tail -n1)
end=$(date +%s)
echo "GLIBC versions needed: $(echo "$versions" | tr '\n' ' ')"
echo "highest GLIBC_ symbol version: $highest (floor $floor)"
echo "time: build $((end - build_start)) s, total $((end - start)) s"
if [ "$(printf '%s\n%s\n' "$highest" "$floor" | sort -V | tail -n1)" != "$floor" ]; then
  echo "FAIL: $lib needs GLIBC_$highest, above the floor $floor:" >&2
  objdump -T "$lib" | grep "GLIBC_$highest" >&2
  exit 1
fi
echo "OK: $lib loads on glibc >= $floor"
