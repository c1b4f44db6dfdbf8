# shellcheck shell=bash
# Sourced by scripts that link against an old glibc floor (check-glibc-floor.sh, gpu-check.sh):
# installs the pinned zig and cargo-zigbuild once and puts them on PATH.
#
# Tools (pinned, installed once into the repository's .tools/, gitignored; skipped when present):
#   zig      from PyPI `ziglang==$ZIG_VERSION` into .tools/venv-zig
#   cargo-zigbuild $ZIGBUILD_VERSION via `cargo install --locked --root .tools`
# Env: VRAMSLICE_TOOLS_DIR (default .tools; e.g. a CI cache dir). Needs $root (the repository).
ZIG_VERSION="0.13.0.post1"
ZIGBUILD_VERSION="0.19.8"
ZIG_TARGET="x86_64-unknown-linux-gnu"

zig_tools_setup() {
  local tools="${VRAMSLICE_TOOLS_DIR:-$root/.tools}"
  local venv="$tools/venv-zig"
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
  rustup target list --installed | grep -qx "$ZIG_TARGET" || rustup target add "$ZIG_TARGET"
}

# The highest GLIBC_ symbol version an ELF file imports (empty when none).
glibc_highest() {
  objdump -T "$1" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -u -V | tail -n1
}

# Whether version $1 is at most version $2.
version_at_most() {
  [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | tail -n1)" = "$2" ]
}
