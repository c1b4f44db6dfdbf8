"""The guard at the CUDA driver API, through ctypes: no PyTorch needed, so this runs on the real
driver (lent GPU) and on the fake driver (dry run) alike.

    guard_driver.py limits            under the guard: cuMemGetInfo shows the slice, within-limit
                                      allocations work, past-limit ones fail with
                                      CUDA_ERROR_OUT_OF_MEMORY, NVML memory info shows the slice
    guard_driver.py share             under the guard: a second process holding memory in the
                                      same accounting directory counts against this one's limit
    guard_driver.py graphs            under the guard: a CUDA graph memory node is charged when the
                                      graph is launched, a graph past the slice is refused at
                                      launch, cuDeviceGraphMemTrim gives the memory back
    guard_driver.py vmm               under the guard: cuMemCreate memory whose handle is released
                                      right after cuMemMap stays charged until cuMemUnmap (and a
                                      plain child shows the real driver keeps it that long)
    guard_driver.py legacy            under the guard: the v1 ABI (cuMemAlloc with 32-bit pointers,
                                      which the driver still exports) is held to the limit too
    guard_driver.py latency           alloc/free pair time, plain and guarded (child processes)
    guard_driver.py vllm              a vLLM-like start: size a cache from cuMemGetInfo total
    guard_driver.py hold BYTES        (helper) allocate, print "ready", wait for stdin to close
    guard_driver.py context           (helper) create the primary context only, print "ready", wait
                                      for stdin to close (the orchestrator measures it in NVML)
    guard_driver.py fill MOST         (helper, under the guard) allocate in 256 MiB, then 2 MiB
                                      steps until refused (at most MOST bytes), print what was held
                                      as JSON, hold it until stdin closes (the orchestrator reads
                                      the real usage from NVML)
    guard_driver.py pairs N BYTES     (helper) print the mean alloc/free pair time in ns
    guard_driver.py vmm-facts BYTES   (helper) print the driver's free memory across create, map,
                                      release and unmap of BYTES, as JSON

The limit is VRAMSLICE_VRAM_LIMIT_BYTES (or the limit file the guard reads, whose figure the
orchestrator also passes as GPUCHECK_LIMIT_BYTES). GPUCHECK_GUARD_ENV (JSON) is the guard's
environment, for the modes that start guarded and plain children themselves.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import time

from checklib import MIB, child_env, emit, env_int, mib

CUDA_SUCCESS = 0
CUDA_ERROR_OUT_OF_MEMORY = 2
NVML_SUCCESS = 0


class Driver:
    """The few driver entry points the checks call, looked up the way ctypes users do (dlopen
    + dlsym, which the guard interposes)."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_size_t]
        self.lib.cuMemFree_v2.argtypes = [ctypes.c_ulonglong]
        self.lib.cuMemGetInfo_v2.argtypes = [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
        self.check("cuInit", self.lib.cuInit(0))
        dev = ctypes.c_int()
        self.check("cuDeviceGet", self.lib.cuDeviceGet(ctypes.byref(dev), 0))
        ctx = ctypes.c_void_p()
        self.check("cuDevicePrimaryCtxRetain", self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
        self.check("cuCtxSetCurrent", self.lib.cuCtxSetCurrent(ctx))

    @staticmethod
    def check(what: str, rc: int) -> None:
        if rc != CUDA_SUCCESS:
            raise RuntimeError(f"{what} returned CUDA error {rc}")

    def mem_get_info(self):
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.check("cuMemGetInfo_v2", self.lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)))
        return free.value, total.value

    def alloc(self, n: int):
        """(rc, pointer)."""
        ptr = ctypes.c_ulonglong()
        rc = self.lib.cuMemAlloc_v2(ctypes.byref(ptr), n)
        return rc, ptr.value

    def free(self, ptr: int) -> None:
        self.check("cuMemFree_v2", self.lib.cuMemFree_v2(ptr))

    def grow(self, step: int, most: int):
        """Allocate `step`s until refused or `most` reached; (pointers, last rc)."""
        held, rc = [], CUDA_SUCCESS
        while len(held) * step < most:
            rc, ptr = self.alloc(step)
            if rc != CUDA_SUCCESS:
                break
            held.append(ptr)
        return held, rc


def limit_bytes() -> int:
    return env_int("GPUCHECK_LIMIT_BYTES", env_int("VRAMSLICE_VRAM_LIMIT_BYTES", 0))


def nvml_total():
    """(total bytes of GPU 0 by nvmlDeviceGetMemoryInfo_v2, by v1 or None, error or None)."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as e:
        return None, None, f"cannot load libnvidia-ml.so.1: {e}"
    if nvml.nvmlInit_v2() != NVML_SUCCESS:
        return None, None, "nvmlInit_v2 failed"
    handle = ctypes.c_void_p()
    if nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)) != NVML_SUCCESS:
        return None, None, "nvmlDeviceGetHandleByIndex_v2 failed"

    class MemoryV2(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint), ("total", ctypes.c_ulonglong), ("reserved", ctypes.c_ulonglong),
                    ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

    class MemoryV1(ctypes.Structure):
        _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

    v2 = MemoryV2(version=(ctypes.sizeof(MemoryV2) | (2 << 24)))
    rc = nvml.nvmlDeviceGetMemoryInfo_v2(handle, ctypes.byref(v2))
    if rc != NVML_SUCCESS:
        return None, None, f"nvmlDeviceGetMemoryInfo_v2 returned {rc}"
    total_v1 = None
    if hasattr(nvml, "nvmlDeviceGetMemoryInfo"):
        v1 = MemoryV1()
        if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(v1)) == NVML_SUCCESS:
            total_v1 = v1.total
    return v2.total, total_v1, None


def limits() -> int:
    limit = limit_bytes()
    drv = Driver()
    free, total = drv.mem_get_info()
    emit("driver: cuMemGetInfo total is the slice", total == limit, f"total {mib(total)}, free {mib(free)}",
         f"total = {mib(limit)}", total=total, free=free, limit=limit)
    emit("driver: cuMemGetInfo free within the slice", free <= limit, f"free {mib(free)}", f"<= {mib(limit)}")
    rc, ptr = drv.alloc(int(limit * 0.4))
    emit("driver: allocation within the limit succeeds", rc == CUDA_SUCCESS, f"40% of the limit: rc {rc}", "rc 0")
    if rc == CUDA_SUCCESS:
        drv.free(ptr)
    rc, ptr = drv.alloc(limit + 256 * MIB)
    emit("driver: allocation past the limit is refused", rc == CUDA_ERROR_OUT_OF_MEMORY,
         f"limit + 256 MiB: rc {rc}", f"rc {CUDA_ERROR_OUT_OF_MEMORY} (out of memory)")
    if rc == CUDA_SUCCESS:
        drv.free(ptr)
    held, rc = drv.grow(256 * MIB, 2 * limit)
    grown = len(held) * 256 * MIB
    emit("driver: growing in 256 MiB steps stops within the limit", grown <= limit and rc == CUDA_ERROR_OUT_OF_MEMORY,
         f"{mib(grown)} then rc {rc}", f"<= {mib(limit)}, then rc 2", grown=grown)
    for ptr in held:
        drv.free(ptr)
    after, _ = drv.mem_get_info()
    emit("driver: freed memory returns to the slice", after >= free - 64 * MIB, f"free {mib(after)} after freeing",
         f">= {mib(free - 64 * MIB)}")
    v2, v1, err = nvml_total()
    if err:
        emit("nvml: memory info shows the slice", False, detail=err)
    else:
        ok = v2 == limit and (v1 is None or v1 == limit)
        figure = f"v2 total {mib(v2)}" + (f", v1 total {mib(v1)}" if v1 is not None else ", v1 absent")
        emit("nvml: memory info shows the slice", ok, figure, f"total = {mib(limit)}")
    return 0


class AllocNodeParams(ctypes.Structure):
    """CUDA_MEM_ALLOC_NODE_PARAMS: CUmemPoolProps (88 bytes), access descriptors, size, address."""

    _fields_ = [("alloc_type", ctypes.c_int), ("handle_types", ctypes.c_int), ("location_type", ctypes.c_int),
                ("location_id", ctypes.c_int), ("win32", ctypes.c_void_p), ("max_size", ctypes.c_size_t),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 54), ("access_descs", ctypes.c_void_p),
                ("access_desc_count", ctypes.c_size_t), ("bytesize", ctypes.c_size_t), ("dptr", ctypes.c_ulonglong)]


assert ctypes.sizeof(AllocNodeParams) == 120


def graph_pool_reserved(lib) -> int:
    value = ctypes.c_ulonglong()
    Driver.check("cuDeviceGetGraphMemAttribute",
                 lib.cuDeviceGetGraphMemAttribute(0, 2, ctypes.byref(value)))  # RESERVED_MEM_CURRENT
    return value.value


def memory_node_graph(lib, n: int) -> ctypes.c_void_p:
    """A graph allocating `n` bytes on device 0 in a memory node and freeing them in the graph."""
    graph, alloc_node, free_node = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    Driver.check("cuGraphCreate", lib.cuGraphCreate(ctypes.byref(graph), 0))
    params = AllocNodeParams(alloc_type=1, location_type=1, location_id=0, bytesize=n)  # pinned, on device 0
    Driver.check("cuGraphAddMemAllocNode",
                 lib.cuGraphAddMemAllocNode(ctypes.byref(alloc_node), graph, None, ctypes.c_size_t(0),
                                            ctypes.byref(params)))
    Driver.check("cuGraphAddMemFreeNode",
                 lib.cuGraphAddMemFreeNode(ctypes.byref(free_node), graph, ctypes.byref(alloc_node),
                                           ctypes.c_size_t(1), ctypes.c_ulonglong(params.dptr)))
    return graph


def graphs() -> int:
    limit = limit_bytes()
    drv = Driver()
    lib = drv.lib
    stream = ctypes.c_void_p()
    drv.check("cuStreamCreate", lib.cuStreamCreate(ctypes.byref(stream), 0))
    free0, _ = drv.mem_get_info()
    reserved0 = graph_pool_reserved(lib)
    within, past = ctypes.c_void_p(), ctypes.c_void_p()
    drv.check("cuGraphInstantiateWithFlags",
              lib.cuGraphInstantiateWithFlags(ctypes.byref(within), memory_node_graph(lib, int(limit * 0.4)),
                                              ctypes.c_ulonglong(0)))
    rc = lib.cuGraphLaunch(within, stream)
    drv.check("cuStreamSynchronize", lib.cuStreamSynchronize(stream))
    free1, _ = drv.mem_get_info()
    reserved1 = graph_pool_reserved(lib)
    emit("driver graphs: a memory node within the slice launches", rc == CUDA_SUCCESS,
         f"40% of the limit: rc {rc}", "rc 0")
    counted, grew = free0 - free1, reserved1 - reserved0
    emit("driver graphs: the graph pool's memory counts against the limit", grew > 0 and counted >= grew,
         f"pool grew {mib(grew)}, guard counted {mib(counted)}", "counted >= pool growth", grew=grew, counted=counted)
    drv.check("cuGraphInstantiateWithFlags",
              lib.cuGraphInstantiateWithFlags(ctypes.byref(past), memory_node_graph(lib, limit + 256 * MIB),
                                              ctypes.c_ulonglong(0)))
    rc = lib.cuGraphLaunch(past, stream)
    drv.check("cuStreamSynchronize", lib.cuStreamSynchronize(stream))
    reserved2 = graph_pool_reserved(lib)
    emit("driver graphs: a memory node past the slice is refused at launch",
         rc == CUDA_ERROR_OUT_OF_MEMORY and reserved2 <= reserved1,
         f"limit + 256 MiB: rc {rc}, pool {mib(reserved2)}", f"rc {CUDA_ERROR_OUT_OF_MEMORY}, pool not grown")
    drv.check("cuGraphExecDestroy", lib.cuGraphExecDestroy(within))
    drv.check("cuGraphExecDestroy", lib.cuGraphExecDestroy(past))
    drv.check("cuDeviceGraphMemTrim", lib.cuDeviceGraphMemTrim(0))
    free3, _ = drv.mem_get_info()
    emit("driver graphs: cuDeviceGraphMemTrim returns the memory to the slice", free3 >= free0 - 64 * MIB,
         f"free {mib(free3)} after the trim, pool {mib(graph_pool_reserved(lib))}", f">= {mib(free0 - 64 * MIB)}")
    return 0


def hold(n: int) -> int:
    drv = Driver()
    rc, _ = drv.alloc(n)
    print(f"ready rc={rc}", flush=True)
    sys.stdin.read()
    return 0


def context() -> int:
    drv = Driver()
    drv.mem_get_info()
    print("ready", flush=True)
    sys.stdin.read()
    return 0


def fill(most: int) -> int:
    drv = Driver()
    coarse, rc = drv.grow(256 * MIB, most)
    held = len(coarse) * 256 * MIB
    fine = []
    if rc == CUDA_ERROR_OUT_OF_MEMORY:  # close the last gap below the refusal
        fine, rc = drv.grow(2 * MIB, most - held)
        held += len(fine) * 2 * MIB
    free, total = drv.mem_get_info()
    print(json.dumps({"held_bytes": held, "last_rc": rc, "guard_free": free, "guard_total": total,
                      "allocations": len(coarse) + len(fine)}), flush=True)
    sys.stdin.read()
    return 0


def share() -> int:
    limit = limit_bytes()
    # Half the limit: each process's context is charged too (about 429 MiB on a Hopper part),
    # so three quarters held by one left no room at all beside two contexts.
    held_by_other = int(limit * 0.5)
    other = subprocess.Popen([sys.executable, __file__, "hold", str(held_by_other)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        line = other.stdout.readline().strip() if other.stdout else ""
        drv = Driver()
        free, _ = drv.mem_get_info()
        rc_big, ptr = drv.alloc(int(limit * 0.5))
        if rc_big == CUDA_SUCCESS:
            drv.free(ptr)
        # What is left after the other's memory and both contexts, sized from what this one
        # sees, never more than a tenth of the limit.
        small = max(MIB, min(int(limit * 0.1), free // 2))
        rc_small, ptr = drv.alloc(small)
        if rc_small == CUDA_SUCCESS:
            drv.free(ptr)
    finally:
        if other.stdin:
            other.stdin.close()
        other.wait(timeout=30)
    emit("two processes, one account: the other's memory is counted",
         line == "ready rc=0" and rc_big == CUDA_ERROR_OUT_OF_MEMORY and rc_small == CUDA_SUCCESS
         and free <= limit - held_by_other,
         f"other holds {mib(held_by_other)}: free {mib(free)}, 50% rc {rc_big}, {mib(small)} rc {rc_small}",
         "free <= limit - held, 50% refused, min(10%, free/2) ok", other=line)
    deadline = time.monotonic() + 5
    rc = -1
    while time.monotonic() < deadline:
        rc, ptr = drv.alloc(int(limit * 0.5))
        if rc == CUDA_SUCCESS:
            drv.free(ptr)
            break
        time.sleep(0.05)
    emit("two processes, one account: memory returns when the other exits", rc == CUDA_SUCCESS,
         f"50% of the limit after it exited: rc {rc}", "rc 0 within 5 s")
    return 0


def pairs(n: int, size: int) -> int:
    drv = Driver()
    for _ in range(100):
        rc, ptr = drv.alloc(size)
        drv.check("cuMemAlloc_v2", rc)
        drv.free(ptr)
    start = time.perf_counter_ns()
    for _ in range(n):
        rc, ptr = drv.alloc(size)
        drv.check("cuMemAlloc_v2", rc)
        drv.free(ptr)
    print(json.dumps({"ns_per_pair": (time.perf_counter_ns() - start) / n}))
    return 0


def latency(n: int = 20000, size: int = 2 * MIB) -> int:
    figures = {}
    for label in ("plain", "guarded", "plain2", "guarded2"):
        out = subprocess.run([sys.executable, __file__, "pairs", str(n), str(size)], env=child_env("guarded" in label),
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            emit("driver: alloc/free latency added by the guard", False, detail=f"{label} run failed: {out.stderr[-400:]}")
            return 0
        figures[label] = json.loads(out.stdout.strip().splitlines()[-1])["ns_per_pair"]
    plain = min(figures["plain"], figures["plain2"])
    guarded = min(figures["guarded"], figures["guarded2"])
    added_us = (guarded - plain) / 1000
    emit("driver: alloc/free latency added by the guard", added_us <= 20,
         f"{plain / 1000:.2f} us plain, {guarded / 1000:.2f} us guarded per 2 MiB pair (+{added_us:.2f} us)",
         "<= 20 us added per pair", plain_ns=plain, guarded_ns=guarded, runs=figures)
    return 0


def vllm() -> int:
    """Size a 'KV cache' as vLLM does: gpu_memory_utilization x total, minus what is in use."""
    limit = limit_bytes()
    utilization = 0.9
    drv = Driver()
    free, total = drv.mem_get_info()
    budget = int(total * utilization) - (total - free)
    chunk = 256 * MIB
    planned = max(budget, 0) // chunk * chunk
    held, rc = drv.grow(chunk, planned)
    got = len(held) * chunk
    for ptr in held:
        drv.free(ptr)
    ok = total == limit and planned > 0 and got == planned
    emit("vLLM-like start (driver): sizes to the slice, not the card", ok,
         f"total {mib(total)} -> cache {mib(got)} of {mib(planned)} planned", f"total = {mib(limit)}, cache allocates",
         total=total, budget=budget, allocated=got, last_rc=rc)
    return 0


class AllocationProp(ctypes.Structure):
    """CUmemAllocationProp: pinned device memory on device 0."""
    _fields_ = [("type", ctypes.c_int), ("handle_types", ctypes.c_int), ("location_type", ctypes.c_int),
                ("location_id", ctypes.c_int), ("win32", ctypes.c_void_p), ("flags", ctypes.c_ubyte * 8)]


class Vmm:
    """cuMemCreate / cuMemAddressReserve / cuMemMap / cuMemUnmap / cuMemRelease through ctypes."""

    def __init__(self, drv: Driver) -> None:
        self.drv, lib = drv, drv.lib
        u64, size = ctypes.c_ulonglong, ctypes.c_size_t
        lib.cuMemCreate.argtypes = [ctypes.POINTER(u64), size, ctypes.POINTER(AllocationProp), u64]
        lib.cuMemRelease.argtypes = [u64]
        lib.cuMemAddressReserve.argtypes = [ctypes.POINTER(u64), size, size, u64, u64]
        lib.cuMemAddressFree.argtypes = [u64, size]
        lib.cuMemMap.argtypes = [u64, size, size, u64, u64]
        lib.cuMemUnmap.argtypes = [u64, size]
        self.lib = lib
        self.prop = AllocationProp(type=1, location_type=1, location_id=0)  # pinned, on device 0

    def reserve(self, n: int) -> int:
        va = ctypes.c_ulonglong()
        self.drv.check("cuMemAddressReserve", self.lib.cuMemAddressReserve(ctypes.byref(va), n, 0, 0, 0))
        return va.value

    def create(self, n: int):
        """(rc, handle)."""
        h = ctypes.c_ulonglong()
        return self.lib.cuMemCreate(ctypes.byref(h), n, ctypes.byref(self.prop), 0), h.value


def vmm_chunk(limit: int) -> int:
    """A quarter of the limit in whole 2 MiB pages (the GPUs' allocation granularity)."""
    return max(limit // 4 // (2 * MIB), 1) * 2 * MIB


def vmm() -> int:
    limit = limit_bytes()
    chunk = vmm_chunk(limit)
    facts = subprocess.run([sys.executable, __file__, "vmm-facts", str(chunk)], env=child_env(False),
                           capture_output=True, text=True, timeout=60)
    try:
        f = json.loads(facts.stdout.strip().splitlines()[-1])
        kept, back = f["before"] - f["released"], f["unmapped"] - f["before"]
        emit("driver vmm: a released handle's memory stays while mapped (plain driver)",
             kept >= chunk - 64 * MIB and back >= -64 * MIB,
             f"{mib(chunk)}: {mib(kept)} still taken after cuMemRelease, {mib(back)} back after cuMemUnmap",
             ">= the chunk taken, then back", **f)
    except (IndexError, KeyError, ValueError):
        emit("driver vmm: a released handle's memory stays while mapped (plain driver)", False,
             detail=f"vmm-facts rc {facts.returncode}: {facts.stderr[-300:]}")
    drv = Driver()
    v = Vmm(drv)
    free0, _ = drv.mem_get_info()
    va = v.reserve(8 * chunk)
    made, rc = 0, CUDA_SUCCESS
    while made < 8:
        rc, h = v.create(chunk)
        if rc != CUDA_SUCCESS:
            break
        drv.check("cuMemMap", v.lib.cuMemMap(va + made * chunk, chunk, 0, h, 0))
        drv.check("cuMemRelease", v.lib.cuMemRelease(h))
        made += 1
    free1, _ = drv.mem_get_info()
    emit("driver vmm: cuMemRelease right after cuMemMap keeps the memory charged",
         rc == CUDA_ERROR_OUT_OF_MEMORY and made * chunk <= limit and free0 - free1 >= made * chunk,
         f"{made} x {mib(chunk)} mapped and released, then rc {rc}; guard counted {mib(free0 - free1)}",
         f"refused within the limit (rc {CUDA_ERROR_OUT_OF_MEMORY})", made=made, chunk=chunk)
    drv.check("cuMemUnmap", v.lib.cuMemUnmap(va, made * chunk) if made else CUDA_SUCCESS)
    drv.check("cuMemAddressFree", v.lib.cuMemAddressFree(va, 8 * chunk))
    free2, _ = drv.mem_get_info()
    emit("driver vmm: cuMemUnmap gives the memory back", free2 >= free0 - 64 * MIB,
         f"free {mib(free2)} after one unmap of {made} mappings", f">= {mib(free0 - 64 * MIB)}")
    return 0


def legacy() -> int:
    limit = limit_bytes()
    chunk = min(limit // 4, 1 << 31)
    drv = Driver()
    lib = drv.lib
    alloc, free = lib.cuMemAlloc, lib.cuMemFree  # the v1 symbols, not the _v2 ones
    # An 8-byte out-buffer, read as its low 32 bits: v1 writes a 32-bit pointer, but a driver that
    # wrote a full one must not overwrite ctypes' memory and take the check down with it.
    alloc.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_uint]
    free.argtypes = [ctypes.c_uint]
    held, rc = [], CUDA_SUCCESS
    while len(held) < 8:
        p = ctypes.c_uint64(0)
        rc = alloc(ctypes.byref(p), chunk)
        if rc != CUDA_SUCCESS:
            break
        held.append(p.value & 0xFFFFFFFF)
    for p in held:
        free(p)
    # Held to the limit: refused by the guard past it, or (a driver that no longer serves v1 on
    # 64-bit) refused by the driver; the figure says which.
    emit("driver: the v1 ABI (cuMemAlloc, 32-bit pointers) is held to the limit", len(held) * chunk <= limit,
         f"{len(held)} x {mib(chunk)} through v1, then rc {rc}", "at most the limit", made=len(held), rc=rc)
    return 0


def vmm_facts(n: int) -> int:
    drv = Driver()
    v = Vmm(drv)
    va = v.reserve(n)
    before = drv.mem_get_info()[0]
    rc, h = v.create(n)
    drv.check("cuMemCreate", rc)
    drv.check("cuMemMap", v.lib.cuMemMap(va, n, 0, h, 0))
    mapped = drv.mem_get_info()[0]
    drv.check("cuMemRelease", v.lib.cuMemRelease(h))
    released = drv.mem_get_info()[0]
    drv.check("cuMemUnmap", v.lib.cuMemUnmap(va, n))
    unmapped = drv.mem_get_info()[0]
    drv.check("cuMemAddressFree", v.lib.cuMemAddressFree(va, n))
    print(json.dumps({"before": before, "mapped": mapped, "released": released, "unmapped": unmapped}))
    return 0


def main(argv) -> int:
    mode = argv[1] if len(argv) > 1 else ""
    if mode == "limits":
        return limits()
    if mode == "share":
        return share()
    if mode == "graphs":
        return graphs()
    if mode == "vmm":
        return vmm()
    if mode == "legacy":
        return legacy()
    if mode == "vmm-facts" and len(argv) == 3:
        return vmm_facts(int(argv[2]))
    if mode == "latency":
        return latency()
    if mode == "vllm":
        return vllm()
    if mode == "hold" and len(argv) == 3:
        return hold(int(argv[2]))
    if mode == "context":
        return context()
    if mode == "fill" and len(argv) == 3:
        return fill(int(argv[2]))
    if mode == "pairs" and len(argv) == 4:
        return pairs(int(argv[2]), int(argv[3]))
    sys.exit(__doc__)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except Exception as e:  # noqa: BLE001 - any failure is a reported FAIL, never a silent pass
        emit(f"guard_driver.py {' '.join(sys.argv[1:2])}", False, detail=f"{type(e).__name__}: {e}")
        sys.exit(1)
