#!/usr/bin/env bash
# Builds the fake CUDA driver (libcuda.so.1) and the probe program into $1 (used by the
# valgrind and callgrind scripts; the Rust tests build the same files themselves).
set -euo pipefail
out=${1:?usage: build-c.sh OUTDIR}
src="$(cd "$(dirname "$0")/../fake-cuda" && pwd)"
cc=${CC:-cc}
mkdir -p "$out"
"$cc" -O2 -g -Wall -Wextra -Werror -fPIC -shared -Wl,-Bsymbolic -Wl,-soname,libcuda.so.1 \
  -o "$out/libcuda.so.1" "$src/fake_cuda.c"
ln -sf libcuda.so.1 "$out/libcuda.so"
"$cc" -O2 -fPIC -shared -o "$out/libnext_b.so" "$src/next_b.c"
"$cc" -O2 -fPIC -shared -o "$out/libnext_a.so" "$src/next_a.c" -L "$out" -Wl,-rpath,"$out" -Wl,--no-as-needed -lnext_b -ldl
"$cc" -O2 -g -Wall -Wextra -Werror -o "$out/probe" "$src/probe.c" -L "$out" -Wl,-rpath,"$out" -lcuda -lnext_a -ldl -lpthread
