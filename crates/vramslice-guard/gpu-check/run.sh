#!/usr/bin/env bash
# Checks the guard on a real NVIDIA GPU (written for the lent H100) with PyTorch:
#   1. torch.cuda.mem_get_info() reports the 2 GiB limit as total,
#   2. a tensor past the limit raises torch.cuda.OutOfMemoryError (and one inside it does not),
#   3. the same with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (cuMemCreate path) and with
#      backend:cudaMallocAsync (memory-pool path),
#   4. a matmul loop's throughput with and without the guard.
# Prints a summary; exits non-zero when a check fails.
#
# Environment: GUARD_LIB=<path> uses a prebuilt libvramslice_guard.so instead of building it;
# PYTHON=<python3>; TORCH_SPEC=<pip spec> (default "torch"); LIMIT_BYTES (default 2 GiB).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
work="${WORK:-$(mktemp -d)}"
limit=${LIMIT_BYTES:-$((2 << 30))}

if [[ -z "${GUARD_LIB:-}" ]]; then
  command -v cargo >/dev/null || { echo "no cargo here: build the guard elsewhere and set GUARD_LIB" >&2; exit 2; }
  cargo build --release -p vramslice-guard --manifest-path "$root/Cargo.toml"
  target="$(cargo metadata -q --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" |
    "${PYTHON:-python3}" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
  GUARD_LIB="$target/release/libvramslice_guard.so"
fi
[[ -f "$GUARD_LIB" ]] || { echo "guard library not found: $GUARD_LIB" >&2; exit 2; }
nvidia-smi --query-gpu=name,uuid,memory.total,memory.used,driver_version --format=csv,noheader || true

venv="$work/venv"
if [[ ! -x "$venv/bin/python" ]]; then
  "${PYTHON:-python3}" -m venv --system-site-packages "$venv"
fi
if ! "$venv/bin/python" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  "$venv/bin/pip" install -q "${TORCH_SPEC:-torch}"
fi
py="$venv/bin/python"

cat >"$work/check.py" <<'PY'
import json, os, sys, time
import torch

mode = sys.argv[1]
limit = int(os.environ.get("VRAMSLICE_VRAM_LIMIT_BYTES", "0"))
res = {"mode": mode, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
torch.cuda.init()
free, total = torch.cuda.mem_get_info()
res["mem_get_info"] = [free, total]
res["context_charge"] = total - free  # what the guard charged for the context (guarded runs)
if mode == "limits":
    ok_small = True
    try:
        a = torch.empty(int(limit * 0.4), dtype=torch.uint8, device="cuda")
        a.fill_(1)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        ok_small, res["small_error"] = False, repr(e)
    res["small_ok"] = ok_small
    try:
        b = torch.empty(limit + (256 << 20), dtype=torch.uint8, device="cuda")
        res["big"] = "allocated"
    except torch.cuda.OutOfMemoryError:
        res["big"] = "OutOfMemoryError"
    except Exception as e:  # noqa: BLE001
        res["big"] = "other: " + repr(e)
    # grow in 256 MiB steps until refused: the total reached must stay within the limit
    held, step = [], 256 << 20
    try:
        while len(held) < 64:
            held.append(torch.empty(step, dtype=torch.uint8, device="cuda"))
    except torch.cuda.OutOfMemoryError:
        pass
    res["grown_bytes"] = len(held) * step + int(limit * 0.4)
    del held
    torch.cuda.empty_cache()
    res["free_after_empty_cache"] = torch.cuda.mem_get_info()[0]
elif mode == "matmul":
    n, iters = 8192, 200
    x = torch.randn(n, n, device="cuda", dtype=torch.float16)
    y = torch.randn(n, n, device="cuda", dtype=torch.float16)
    for _ in range(10):
        z = x @ y
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        z = x @ y  # allocates a fresh output each iteration through the caching allocator
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    res["tflops"] = 2 * n**3 * iters / dt / 1e12
    # allocator churn: many small tensors freed and re-made (the guard's per-call cost)
    torch.cuda.empty_cache()
    t = time.perf_counter()
    for i in range(20000):
        w = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
        del w
        if i % 100 == 0:
            torch.cuda.empty_cache()
    torch.cuda.synchronize()
    res["churn_us_per_alloc"] = (time.perf_counter() - t) / 20000 * 1e6
print("RESULT " + json.dumps(res))
PY

run() { # env-assignments... -- mode ; prints the RESULT json
  "$@" 2>"$work/stderr.txt" | sed -n 's/^RESULT //p'
}
guarded=(env LD_PRELOAD="$GUARD_LIB" VRAMSLICE_VRAM_LIMIT_BYTES="$limit" VRAMSLICE_ACCOUNTING_DIR="$work")
fail=0
declare -a summary
check() { # name condition-python-expression json
  if "$py" -c "import json,sys; r=json.loads(sys.argv[1]); sys.exit(0 if ($2) else 1)" "$3"; then
    summary+=("PASS  $1"); else summary+=("FAIL  $1   $3"); fail=1; fi
}

for conf in "" "expandable_segments:True" "backend:cudaMallocAsync"; do
  r=$(run "${guarded[@]}" PYTORCH_CUDA_ALLOC_CONF="$conf" "$py" "$work/check.py" limits || true)
  echo "guarded limits [$conf]: $r"
  [[ -n "$r" ]] || { summary+=("FAIL  run [$conf]: $(tail -5 "$work/stderr.txt")"); fail=1; continue; }
  check "[$conf] mem_get_info total == limit" "r['mem_get_info'][1] == $limit" "$r"
  check "[$conf] mem_get_info free <= limit" "r['mem_get_info'][0] <= $limit" "$r"
  check "[$conf] 40% of the limit allocates" "r['small_ok']" "$r"
  check "[$conf] past the limit raises OutOfMemoryError" "r['big'] == 'OutOfMemoryError'" "$r"
  check "[$conf] growing stops within the limit" "r['grown_bytes'] <= $limit" "$r"
done

plain=$(run env "$py" "$work/check.py" matmul || true)
withg=$(run env LD_PRELOAD="$GUARD_LIB" VRAMSLICE_VRAM_LIMIT_BYTES=$((16 << 30)) VRAMSLICE_ACCOUNTING_DIR="$work" \
  "$py" "$work/check.py" matmul || true)
echo "matmul without guard: $plain"
echo "matmul with guard:    $withg"
if [[ -n "$plain" && -n "$withg" ]]; then
  "$py" - "$plain" "$withg" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"matmul fp16 8192^3: {a['tflops']:.1f} TFLOP/s without guard, {b['tflops']:.1f} with ({b['tflops']/a['tflops']*100:.1f}%)")
print(f"alloc churn: {a['churn_us_per_alloc']:.2f} us/alloc without guard, {b['churn_us_per_alloc']:.2f} with")
print(f"context charged by the guard: {b['context_charge']/2**20:.0f} MiB (set VRAMSLICE_CONTEXT_ESTIMATE_BYTES from nvidia-smi's per-process figure if far off)")
PY
else
  summary+=("FAIL  matmul runs: $(tail -5 "$work/stderr.txt")"); fail=1
fi

echo "---- summary ----"
printf '%s\n' "${summary[@]}"
exit $fail
