"""The guard under PyTorch on a real GPU (needs torch with CUDA; the orchestrator reports these
checks as NOT-RUN where there is none).

    guard_torch.py limits LABEL     under the guard (PYTORCH_CUDA_ALLOC_CONF set by the caller):
                                    the allocator asked for is in force, mem_get_info shows the
                                    slice, within-limit works, past-limit raises
                                    torch.cuda.OutOfMemoryError, growth stops at the limit
    guard_torch.py graphs           under the guard, backend:cudaMallocAsync: CUDA graph capture +
                                    replay is correct, graph memory nodes count in the limit, and a
                                    graph larger than the slice fails its replay (out of memory)
    guard_torch.py share            under the guard: another PyTorch process's memory counts
    guard_torch.py throughput       matmul and memory-bandwidth loops in plain and guarded children,
                                    in ABBA order (plain, guarded, guarded, plain)
    guard_torch.py vllm             under the guard: size a KV cache from mem_get_info total
    guard_torch.py hold BYTES       (helper) hold a tensor, print "ready", wait for stdin to close
    guard_torch.py loops SECONDS    (helper) print matmul TFLOP/s and copy GB/s as JSON

The limit is GPUCHECK_LIMIT_BYTES; GPUCHECK_GUARD_ENV (JSON) is the guard's environment for the
modes that start plain and guarded children.
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Optional, Tuple

from checklib import GIB, MIB, child_env, emit, env_int, mib, throughput_loss_ok
from guard_driver import graph_pool_reserved

import torch  # noqa: E402 - after checklib so a missing torch still reports through main()


# Per variant of `limits`: the backend torch.cuda.get_allocator_backend() must name, and whether
# expandable segments must be on (None: not applicable, the caching allocator is not in use).
ALLOCATORS = {"default": ("native", False), "expandable_segments": ("native", True),
              "cudaMallocAsync": ("cudaMallocAsync", None)}


def limit_bytes() -> int:
    return env_int("GPUCHECK_LIMIT_BYTES")


def allocator_backend() -> Tuple[Optional[str], str]:
    """The CUDA allocator backend in force ("native" or "cudaMallocAsync"), or None and why not."""
    try:
        get = getattr(torch.cuda, "get_allocator_backend", None) or torch.cuda.memory.get_allocator_backend
        return str(get()), ""
    except Exception as e:  # noqa: BLE001
        return None, f"get_allocator_backend failed: {e!r}"


def expandable_in_force() -> Tuple[Optional[bool], str]:
    """Whether the caching allocator uses expandable segments, read from its snapshot (the
    allocator's own settings, else its segments' flags); None and why when it cannot be read."""
    try:
        snap = torch.cuda.memory._snapshot()
        settings = snap.get("allocator_settings") if isinstance(snap, dict) else None
        if isinstance(settings, dict) and "expandable_segments" in settings:
            return bool(settings["expandable_segments"]), "allocator_settings"
        flags = {bool(seg["is_expandable"]) for seg in (snap.get("segments") or []) if "is_expandable" in seg}
        if len(flags) == 1:
            return flags.pop(), "the segments' is_expandable"
        return None, "the snapshot has no allocator_settings and no segment flags"
    except Exception as e:  # noqa: BLE001
        return None, f"the snapshot cannot be read: {e!r}"


def allocator_in_force(label: str) -> None:
    """The variant must run the allocator it asked for: a PYTORCH_ALLOC_CONF from the image (torch
    >= 2.8 prefers it) or a torch that ignores the setting would test the wrong one."""
    want_backend, want_expandable = ALLOCATORS[label]
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    backend, why = allocator_backend()
    expandable, source = (expandable_in_force() if backend == "native" and want_expandable is not None
                          else (None, "not applicable"))
    problems = []
    if backend is None:
        problems.append(f"the backend in force cannot be read ({why})")
    elif backend != want_backend:
        problems.append(f"PYTORCH_CUDA_ALLOC_CONF={conf!r} asks for the {want_backend} backend but torch runs "
                        f"{backend!r}: this variant's results test the wrong allocator")
    if want_expandable is not None and expandable is not None and expandable != want_expandable:
        problems.append(f"PYTORCH_CUDA_ALLOC_CONF={conf!r} asks for expandable_segments {want_expandable} but "
                        f"{source} says {expandable}: this variant's results test the wrong allocator")
    notes = list(problems)
    if want_expandable is not None and expandable is None and backend == "native":
        notes.append(f"expandable_segments unverified: {source}")
    shown = expandable if expandable is not None else "unverified" if backend == "native" else "n/a"
    emit(f"torch [{label}]: the allocator asked for is the one in force", not problems,
         f"backend {backend}" + (f", expandable_segments {shown}" if want_expandable is not None else ""),
         f"backend {want_backend}" + (f", expandable_segments {want_expandable}" if want_expandable is not None
                                      else ""), "; ".join(notes), backend=backend, expandable_segments=expandable,
         expandable_source=source, PYTORCH_CUDA_ALLOC_CONF=conf, PYTORCH_ALLOC_CONF=os.environ.get("PYTORCH_ALLOC_CONF"))


def limits(label: str) -> int:
    limit = limit_bytes()
    free, total = torch.cuda.mem_get_info()
    emit(f"torch [{label}]: mem_get_info shows the slice", total == limit and free <= limit,
         f"total {mib(total)}, free {mib(free)}", f"total = {mib(limit)}", total=total, free=free)
    try:
        a = torch.empty(int(limit * 0.4), dtype=torch.uint8, device="cuda")
        a.fill_(1)
        torch.cuda.synchronize()
        ok, detail = int(a[-1].item()) == 1, ""
    except Exception as e:  # noqa: BLE001
        ok, detail = False, repr(e)
    emit(f"torch [{label}]: 40% of the limit allocates and works", ok, "tensor filled and read back", "works",
         detail)
    allocator_in_force(label)  # with a segment allocated, whose flags are a second witness
    try:
        b = torch.empty(limit + 256 * MIB, dtype=torch.uint8, device="cuda")
        outcome = "allocated"
        del b
    except torch.cuda.OutOfMemoryError:
        outcome = "OutOfMemoryError"
    except Exception as e:  # noqa: BLE001
        outcome = f"other: {e!r}"
    emit(f"torch [{label}]: past the limit raises OutOfMemoryError", outcome == "OutOfMemoryError",
         f"limit + 256 MiB: {outcome[:60]}", "torch.cuda.OutOfMemoryError")
    held, step = [], 256 * MIB
    try:
        while len(held) < 4 * limit // step:
            held.append(torch.empty(step, dtype=torch.uint8, device="cuda"))
    except torch.cuda.OutOfMemoryError:
        pass
    grown = len(held) * step + int(limit * 0.4)
    emit(f"torch [{label}]: growing stops within the limit", grown <= limit, f"{mib(grown)} held at the refusal",
         f"<= {mib(limit)}", grown=grown)
    del held, a
    torch.cuda.empty_cache()
    after = torch.cuda.mem_get_info()[0]
    emit(f"torch [{label}]: empty_cache returns memory to the slice", after >= free - 64 * MIB,
         f"free {mib(after)}", f">= {mib(free - 64 * MIB)}")
    return 0


def graph_pool() -> Tuple[int, str]:
    """The driver's graph memory pool reservation on device 0, or 0 and why it cannot be read."""
    try:
        return graph_pool_reserved(ctypes.CDLL("libcuda.so.1")), ""
    except Exception as e:  # noqa: BLE001
        return 0, f"cannot read the graph pool: {e}"


def graphs() -> int:
    n = 4096
    x = torch.randn(n, n, device="cuda", dtype=torch.float16)
    w = torch.randn(n, n, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up on a side stream, as torch.cuda.graph requires
            (x @ w).relu_()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    temp_bytes = 1 * GIB
    with torch.cuda.graph(graph):
        # A temporary made and dropped inside the capture: with cudaMallocAsync this becomes a
        # graph memory node (allocated when the graph is launched), not a cudaMalloc.
        temp = torch.empty(temp_bytes, dtype=torch.uint8, device="cuda")
        temp.fill_(3)
        y = (x @ w).relu_()
        y.add_(temp[: n * n].view(n, n).to(torch.float16)[:1, :1])
        del temp
    # Measured around the replays alone: entering torch.cuda.graph empties the cache (under this
    # backend a pool trim), which would otherwise blur what the launches added.
    reserved0, error0 = graph_pool()
    free0, total = torch.cuda.mem_get_info()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    free1, _ = torch.cuda.mem_get_info()
    reserved1, error1 = graph_pool()
    pool_error = error0 or error1
    eager = (x @ w).relu_() + 3
    ok = torch.allclose(y, eager, rtol=1e-2, atol=1e-2)
    backend, backend_error = allocator_backend()
    emit("torch graphs: capture + replay correct under the guard", bool(ok), "5 replays of a 4096^2 matmul graph",
         "matches eager", allocator_backend=backend)
    grown, counted = reserved1 - reserved0, free0 - free1
    # Graph memory nodes come from capturing cudaMallocAsync: under another backend the check is moot.
    wrong = backend != "cudaMallocAsync"
    backend_note = f"allocator backend in force: {backend}, not cudaMallocAsync {backend_error}" if wrong else ""
    emit("torch graphs: graph memory nodes count against the limit",
         not pool_error and not wrong and grown >= temp_bytes and counted >= grown - 64 * MIB,
         f"graph pool grew {mib(grown)}, the guard counted {mib(counted)}",
         "counted >= pool growth (>= the 1 GiB temporary)", "; ".join(x for x in (pool_error, backend_note) if x),
         graph_pool_before=reserved0, graph_pool_after=reserved1, counted=counted, total=total,
         allocator_backend=backend)
    del graph, y
    torch.cuda.synchronize()
    # A graph whose memory node does not fit the slice: capturing it takes no memory; the guard
    # refuses the launch (cudaGraphLaunch: out of memory) before the driver maps anything.
    big = torch.cuda.CUDAGraph()
    too_much = total + 512 * MIB
    try:
        with torch.cuda.graph(big):
            t = torch.empty(too_much, dtype=torch.uint8, device="cuda")
            t.fill_(1)
            del t
        big.replay()
        torch.cuda.synchronize()
        refused, what = False, "the replay ran"
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is a RuntimeError too
        refused, what = "out of memory" in str(e).lower(), str(e).strip().splitlines()[0][:160]
    try:
        del big
        goes_on = bool(torch.isfinite((x @ w).float().sum()).item())
    except RuntimeError as e:
        goes_on, what = False, f"{what}; afterwards: {str(e).strip().splitlines()[0][:120]}"
    emit("torch graphs: a graph past the slice fails its replay, the process goes on", refused and goes_on,
         f"{mib(too_much)} graph: {what}", "out of memory, then a matmul works", graph_bytes=too_much)
    return 0


def hold(n: int) -> int:
    t = torch.empty(n, dtype=torch.uint8, device="cuda")
    t.fill_(1)
    torch.cuda.synchronize()
    print("ready", flush=True)
    sys.stdin.read()
    return 0


def share() -> int:
    limit = limit_bytes()
    other_bytes = int(limit * 0.6)
    other = subprocess.Popen([sys.executable, __file__, "hold", str(other_bytes)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        line = other.stdout.readline().strip() if other.stdout else ""
        free, _ = torch.cuda.mem_get_info()
        try:
            big = torch.empty(int(limit * 0.5), dtype=torch.uint8, device="cuda")
            big_outcome = "allocated"
            del big
        except torch.cuda.OutOfMemoryError:
            big_outcome = "OutOfMemoryError"
        torch.cuda.empty_cache()
        # What is left of the slice is still usable: half of the free memory allocates.
        small_bytes = max(free // 2, MIB)
        try:
            small = torch.empty(small_bytes, dtype=torch.uint8, device="cuda")
            small_outcome = "allocated"
            del small
        except torch.cuda.OutOfMemoryError:
            small_outcome = "OutOfMemoryError"
        torch.cuda.empty_cache()
    finally:
        if other.stdin:
            other.stdin.close()
        other.wait(timeout=60)
    emit("torch: two processes share one account", line == "ready" and big_outcome == "OutOfMemoryError"
         and small_outcome == "allocated" and free <= limit - other_bytes,
         f"other holds {mib(other_bytes)}: free {mib(free)}, 50% -> {big_outcome}, half the free "
         f"({mib(small_bytes)}) -> {small_outcome}", "free <= limit - held; 50% raises OutOfMemoryError; "
         "half the free allocates")
    return 0


def loops(seconds: float) -> int:
    n = 8192
    x = torch.randn(n, n, device="cuda", dtype=torch.float16)
    w = torch.randn(n, n, device="cuda", dtype=torch.float16)
    for _ in range(5):
        x @ w
    torch.cuda.synchronize()
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            x @ w  # a fresh output each time, through the caching allocator
        torch.cuda.synchronize()
        iters += 20
    tflops = 2 * n**3 * iters / (time.perf_counter() - start) / 1e12
    del x, w
    src = torch.empty(GIB, dtype=torch.uint8, device="cuda").fill_(7)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    copies, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            dst.copy_(src)
        torch.cuda.synchronize()
        copies += 10
    gbps = 2 * GIB * copies / (time.perf_counter() - start) / 1e9  # read + write
    print(json.dumps({"tflops": tflops, "copy_gbps": gbps, "matmuls": iters, "copies": copies}))
    return 0


THROUGHPUT = (("tflops", "matmul fp16 8192^3", "TFLOP/s"), ("copy_gbps", "memory-bandwidth copy", "GB/s"))


def throughput(seconds: float = 6.0) -> int:
    # ABBA: a drift (the GPU warming, clocks settling) weighs on both sides alike, so the means
    # compare the guard and not the order; every run's figures go to the JSON to judge the noise.
    order = ("plain", "guarded", "guarded", "plain")
    runs = []
    for n, label in enumerate(order, 1):
        started = time.monotonic()
        out = subprocess.run([sys.executable, __file__, "loops", str(seconds)], env=child_env(label == "guarded"),
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            for _, name, _ in THROUGHPUT:
                emit(f"torch: {name} throughput with vs without the guard", False,
                     detail=f"run {n} ({label}) failed: {out.stderr[-400:]}", runs=runs)
            return 0
        runs.append(dict(json.loads(out.stdout.strip().splitlines()[-1]), run=n, label=label,
                         wall_s=round(time.monotonic() - started, 1)))
    for key, name, unit in THROUGHPUT:
        by = {label: [r[key] for r in runs if r["label"] == label] for label in ("plain", "guarded")}
        plain, guarded = statistics.mean(by["plain"]), statistics.mean(by["guarded"])
        loss = (1 - guarded / plain) * 100
        spread = {label: (max(v) - min(v)) / statistics.mean(v) * 100 for label, v in by.items()}
        emit(f"torch: {name} throughput with vs without the guard", throughput_loss_ok(loss, spread["plain"], spread["guarded"]),
             f"{plain:.1f} -> {guarded:.1f} {unit} ({loss:+.2f}% loss)",
             "<= 1% loss (ABBA means), or within the runs' own spread (either side's pair)",
             "runs in order: " + ", ".join(f"{r['label']} {r[key]:.1f}" for r in runs)
             + f"; run-to-run spread: plain {spread['plain']:.2f}%, guarded {spread['guarded']:.2f}%",
             plain=plain, guarded=guarded, loss_percent=loss, plain_spread_percent=spread["plain"],
             guarded_spread_percent=spread["guarded"], order=list(order),
             runs=[{"run": r["run"], "label": r["label"], unit: r[key]} for r in runs], loops=runs)
    return 0


def vllm() -> int:
    """vLLM sizes its KV cache as gpu_memory_utilization x total (from mem_get_info) minus the
    memory in use after loading and profiling; under the guard the total is the slice."""
    limit = limit_bytes()
    utilization = 0.9
    weights = torch.empty(256 * MIB, dtype=torch.uint8, device="cuda")  # "the model"
    free, total = torch.cuda.mem_get_info()
    props_total = torch.cuda.get_device_properties(0).total_memory
    cache_bytes = int(total * utilization) - (total - free)
    try:
        cache = torch.empty(cache_bytes, dtype=torch.uint8, device="cuda")
        cache.fill_(0)
        torch.cuda.synchronize()
        outcome = "allocated"
        del cache
    except torch.cuda.OutOfMemoryError:
        outcome = "OutOfMemoryError"
    del weights
    emit("vLLM-like start (torch): sizes to the slice, not the card", total == limit and outcome == "allocated",
         f"mem_get_info total {mib(total)} -> KV cache {mib(cache_bytes)} {outcome}",
         f"total = {mib(limit)}, cache allocates", device_properties_total=props_total, cache_bytes=cache_bytes)
    return 0


def main(argv) -> int:
    mode = argv[1] if len(argv) > 1 else ""
    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False")
    if mode == "limits" and len(argv) == 3:
        return limits(argv[2])
    if mode == "graphs":
        return graphs()
    if mode == "share":
        return share()
    if mode == "throughput":
        return throughput()
    if mode == "vllm":
        return vllm()
    if mode == "hold" and len(argv) == 3:
        return hold(int(argv[2]))
    if mode == "loops" and len(argv) == 3:
        return loops(float(argv[2]))
    sys.exit(__doc__)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except Exception as e:  # noqa: BLE001 - any failure is a reported FAIL, never a silent pass
        emit(f"guard_torch.py {' '.join(sys.argv[1:3])}", False, detail=f"{type(e).__name__}: {e}")
        sys.exit(1)
