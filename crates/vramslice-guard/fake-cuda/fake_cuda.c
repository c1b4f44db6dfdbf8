/*
 * A fake CUDA driver (libcuda.so.1 stand-in) for the guard's tests and benchmark.
 *
 * Device memory is host memory; the device size comes from FAKE_CUDA_DEVICE_BYTES (default
 * 1 GiB). Every allocation is charged against that size with an atomic counter, and the
 * counter's high-water mark is written to FAKE_CUDA_HWM_FILE (when set) at every new peak, so
 * a test can check what the *driver* saw across processes: the file holds the highest value any
 * process of the test wrote (processes share the count through FAKE_CUDA_SHARED_FILE, an mmapped
 * counter, when set).
 *
 * Contexts cost FAKE_CUDA_CTX_BYTES (default 64 MiB), modules FAKE_CUDA_MODULE_BYTES (1 MiB).
 * cuMemGetInfo needs a current context, like the real driver. Pools retain freed async memory
 * until cuMemPoolTrimTo when FAKE_CUDA_POOL_RETAIN=1.
 * Built with -Wl,-Bsymbolic like the real driver, so its own addresses are never interposed.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void *CUcontext;
typedef void *CUstream;
typedef void *CUmodule;
typedef void *CUlibrary;
typedef void *CUmemoryPool;
typedef void *CUarray;
typedef void *CUmipmappedArray;
typedef unsigned long long CUmemGenericAllocationHandle;

#define OK 0
#define ERR_INVALID_VALUE 1
#define ERR_OOM 2
#define ERR_INVALID_CONTEXT 201
#define ERR_NOT_FOUND 500

typedef struct { size_t Width, Height; int Format; unsigned NumChannels; } ARRAY_DESC;
typedef struct { size_t Width, Height, Depth; int Format; unsigned NumChannels, Flags; } ARRAY3D_DESC;
typedef struct { int type; int handleTypes; struct { int type; int id; } location; void *win32; unsigned char flags[8]; } MEM_PROP;

static _Atomic long long local_used;
static _Atomic long long *used = &local_used;
static _Atomic long long local_hwm;
static _Atomic long long *hwm = &local_hwm;
static long long device_bytes = 1LL << 30;
static long long ctx_bytes = 64LL << 20;
static long long module_bytes = 1LL << 20;
static int pool_retain;
static const char *hwm_file;
static _Atomic long long pool_held; /* bytes freed into the single fake pool, still taken */
static __thread CUcontext current_ctx;

static long long env_ll(const char *name, long long dflt) {
    const char *v = getenv(name);
    return v && *v ? atoll(v) : dflt;
}

__attribute__((constructor)) static void fake_init(void) {
    device_bytes = env_ll("FAKE_CUDA_DEVICE_BYTES", device_bytes);
    ctx_bytes = env_ll("FAKE_CUDA_CTX_BYTES", ctx_bytes);
    module_bytes = env_ll("FAKE_CUDA_MODULE_BYTES", module_bytes);
    pool_retain = (int)env_ll("FAKE_CUDA_POOL_RETAIN", 0);
    hwm_file = getenv("FAKE_CUDA_HWM_FILE");
    const char *shared = getenv("FAKE_CUDA_SHARED_FILE");
    if (shared && *shared) {
        int fd = open(shared, O_RDWR | O_CREAT, 0644);
        if (fd >= 0 && ftruncate(fd, 4096) == 0) {
            void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (p != MAP_FAILED) {
                used = (_Atomic long long *)p;
                hwm = (_Atomic long long *)p + 1;
            }
        }
        if (fd >= 0) close(fd);
    }
}

static void note_peak(long long now) {
    long long old = atomic_load(hwm);
    while (now > old) {
        if (atomic_compare_exchange_weak(hwm, &old, now)) {
            if (hwm_file) {
                FILE *f = fopen(hwm_file, "w");
                if (f) { fprintf(f, "%lld\n", atomic_load(hwm)); fclose(f); }
            }
            return;
        }
    }
}

static int take(long long n) {
    long long now = atomic_fetch_add(used, n) + n;
    if (now > device_bytes) { atomic_fetch_sub(used, n); return 0; }
    note_peak(now);
    return 1;
}
static void give(long long n) { atomic_fetch_sub(used, n); }

/* Each allocation carries a 16-byte header holding its charged size. */
static void *host_alloc(long long n) {
    if (!take(n)) return NULL;
    long long *p = malloc(16 + (size_t)(n > 64 ? 64 : n));
    if (!p) { give(n); return NULL; }
    p[0] = n;
    return p + 2;
}
static long long host_free(void *q) {
    if (!q) return -1;
    long long *p = (long long *)q - 2;
    long long n = p[0];
    free(p);
    give(n);
    return n;
}

CUresult cuInit(unsigned flags) { (void)flags; return OK; }
CUresult cuDriverGetVersion(int *v) { if (!v) return ERR_INVALID_VALUE; *v = 12040; return OK; }
CUresult cuDeviceGetCount(int *n) { if (!n) return ERR_INVALID_VALUE; *n = 1; return OK; }
CUresult cuDeviceGet(CUdevice *d, int ordinal) { if (!d || ordinal != 0) return ERR_INVALID_VALUE; *d = 0; return OK; }
CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) { (void)d; if (!bytes) return ERR_INVALID_VALUE; *bytes = (size_t)device_bytes; return OK; }

static CUresult ctx_new(CUcontext *c) {
    if (!c) return ERR_INVALID_VALUE;
    void *p = host_alloc(ctx_bytes);
    if (!p) return ERR_OOM;
    *c = p;
    current_ctx = p;
    return OK;
}
CUresult cuCtxCreate_v2(CUcontext *c, unsigned flags, CUdevice d) { (void)flags; (void)d; return ctx_new(c); }
CUresult cuCtxCreate_v3(CUcontext *c, void *params, int n, unsigned flags, CUdevice d) { (void)params; (void)n; (void)flags; (void)d; return ctx_new(c); }
CUresult cuCtxCreate_v4(CUcontext *c, void *params, unsigned flags, CUdevice d) { (void)params; (void)flags; (void)d; return ctx_new(c); }
CUresult cuCtxDestroy_v2(CUcontext c) {
    if (!c) return ERR_INVALID_VALUE;
    if (current_ctx == c) current_ctx = NULL;
    host_free(c);
    return OK;
}
CUresult cuCtxSetCurrent(CUcontext c) { current_ctx = c; return OK; }
CUresult cuCtxGetCurrent(CUcontext *c) { if (!c) return ERR_INVALID_VALUE; *c = current_ctx; return OK; }
CUresult cuCtxGetDevice(CUdevice *d) { if (!d) return ERR_INVALID_VALUE; if (!current_ctx) return ERR_INVALID_CONTEXT; *d = 0; return OK; }
CUresult cuCtxSynchronize(void) { return OK; }

static CUcontext primary;
static int primary_refs;
CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) {
    (void)d;
    if (!c) return ERR_INVALID_VALUE;
    if (primary_refs++ == 0) {
        primary = host_alloc(ctx_bytes);
        if (!primary) { primary_refs = 0; return ERR_OOM; }
    }
    *c = primary;
    return OK;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    (void)d;
    if (primary_refs == 0) return ERR_INVALID_CONTEXT;
    if (--primary_refs == 0) {
        if (current_ctx == primary) current_ctx = NULL;
        host_free(primary);
        primary = NULL;
    }
    return OK;
}
CUresult cuDevicePrimaryCtxReset_v2(CUdevice d) {
    (void)d;
    if (primary_refs > 0) {
        if (current_ctx == primary) current_ctx = NULL;
        host_free(primary);
        primary = NULL;
        primary_refs = 0;
    }
    return OK;
}

CUresult cuMemGetInfo_v2(size_t *free_b, size_t *total) {
    if (!current_ctx) return ERR_INVALID_CONTEXT;
    if (!free_b || !total) return ERR_INVALID_VALUE;
    long long u = atomic_load(used);
    *free_b = (size_t)(u > device_bytes ? 0 : device_bytes - u);
    *total = (size_t)device_bytes;
    return OK;
}

#define ALLOC_INTO(out, n) do { if (!(out)) return ERR_INVALID_VALUE; void *p_ = host_alloc((long long)(n)); if (!p_) return ERR_OOM; *(out) = (CUdeviceptr)p_; return OK; } while (0)

CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t n) { ALLOC_INTO(dptr, n); }
CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t w, size_t h, unsigned elem) {
    (void)elem;
    if (!pitch) return ERR_INVALID_VALUE;
    size_t p = (w + 511) / 512 * 512;
    if (!dptr) return ERR_INVALID_VALUE;
    void *q = host_alloc((long long)(p * h));
    if (!q) return ERR_OOM;
    *pitch = p;
    *dptr = (CUdeviceptr)q;
    return OK;
}
CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t n, unsigned flags) { (void)flags; ALLOC_INTO(dptr, n); }
CUresult cuMemFree_v2(CUdeviceptr p) { return host_free((void *)p) < 0 ? ERR_INVALID_VALUE : OK; }

/* One pool; with retention, async frees stay taken until a trim. */
static int the_pool;
CUresult cuDeviceGetMemPool(CUmemoryPool *pool, CUdevice d) { (void)d; if (!pool) return ERR_INVALID_VALUE; *pool = &the_pool; return OK; }
CUresult cuDeviceGetDefaultMemPool(CUmemoryPool *pool, CUdevice d) { return cuDeviceGetMemPool(pool, d); }
CUresult cuMemPoolCreate(CUmemoryPool *pool, const void *props) { (void)props; if (!pool) return ERR_INVALID_VALUE; *pool = &the_pool; return OK; }
static _Atomic long long pool_in_use;
static CUresult async_alloc(CUdeviceptr *dptr, size_t n) {
    if (!dptr) return ERR_INVALID_VALUE;
    long long from_pool = 0, held = atomic_load(&pool_held);
    while (held > 0) {
        long long t = held < (long long)n ? held : (long long)n;
        if (atomic_compare_exchange_weak(&pool_held, &held, held - t)) { from_pool = t; break; }
    }
    give(from_pool); /* the pool's bytes are re-charged by host_alloc below */
    void *p = host_alloc((long long)n);
    if (!p) { atomic_fetch_add(used, from_pool); atomic_fetch_add(&pool_held, from_pool); return ERR_OOM; }
    atomic_fetch_add(&pool_in_use, (long long)n);
    *dptr = (CUdeviceptr)p;
    return OK;
}
static CUresult async_free(CUdeviceptr p) {
    long long n = host_free((void *)p);
    if (n < 0) return ERR_INVALID_VALUE;
    atomic_fetch_sub(&pool_in_use, n);
    if (pool_retain) { atomic_fetch_add(used, n); atomic_fetch_add(&pool_held, n); }
    return OK;
}
CUresult cuMemAllocAsync(CUdeviceptr *d, size_t n, CUstream s) { (void)s; return async_alloc(d, n); }
CUresult cuMemAllocAsync_ptsz(CUdeviceptr *d, size_t n, CUstream s) { (void)s; return async_alloc(d, n); }
CUresult cuMemAllocFromPoolAsync(CUdeviceptr *d, size_t n, CUmemoryPool pool, CUstream s) { (void)pool; (void)s; return async_alloc(d, n); }
CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *d, size_t n, CUmemoryPool pool, CUstream s) { (void)pool; (void)s; return async_alloc(d, n); }
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) { (void)s; return async_free(p); }
CUresult cuMemFreeAsync_ptsz(CUdeviceptr p, CUstream s) { (void)s; return async_free(p); }
CUresult cuMemPoolTrimTo(CUmemoryPool pool, size_t keep) {
    (void)pool;
    long long held = atomic_load(&pool_held);
    if (held > (long long)keep) {
        long long drop = held - (long long)keep;
        atomic_fetch_sub(&pool_held, drop);
        give(drop);
    }
    return OK;
}
#define ATTR_RESERVED_MEM_CURRENT 5
CUresult cuMemPoolGetAttribute(CUmemoryPool pool, int attr, void *value) {
    (void)pool;
    if (!value) return ERR_INVALID_VALUE;
    if (attr != ATTR_RESERVED_MEM_CURRENT) return ERR_INVALID_VALUE;
    *(unsigned long long *)value = (unsigned long long)(atomic_load(&pool_in_use) + atomic_load(&pool_held));
    return OK;
}

CUresult cuMemCreate(CUmemGenericAllocationHandle *h, size_t n, const MEM_PROP *prop, unsigned long long flags) {
    (void)flags;
    if (!h || !prop) return ERR_INVALID_VALUE;
    void *p = prop->location.type == 1 ? host_alloc((long long)n) : (void *)((long long *)malloc(16) + 2);
    if (!p) return ERR_OOM;
    if (prop->location.type != 1) ((long long *)p)[-2] = 0; /* host memory: not charged */
    *h = (CUmemGenericAllocationHandle)p;
    return OK;
}
CUresult cuMemRelease(CUmemGenericAllocationHandle h) { return host_free((void *)h) < 0 ? ERR_INVALID_VALUE : OK; }

static size_t elem_size(int format) {
    switch (format) { case 0x01: case 0x08: return 1; case 0x02: case 0x09: case 0x10: return 2; default: return 4; }
}
static size_t dim(size_t v) { return v ? v : 1; }
CUresult cuArrayCreate_v2(CUarray *a, const ARRAY_DESC *d) {
    if (!a || !d) return ERR_INVALID_VALUE;
    void *p = host_alloc((long long)(dim(d->Width) * dim(d->Height) * elem_size(d->Format) * d->NumChannels));
    if (!p) return ERR_OOM;
    *a = p;
    return OK;
}
CUresult cuArray3DCreate_v2(CUarray *a, const ARRAY3D_DESC *d) {
    if (!a || !d) return ERR_INVALID_VALUE;
    void *p = host_alloc((long long)(dim(d->Width) * dim(d->Height) * dim(d->Depth) * elem_size(d->Format) * d->NumChannels));
    if (!p) return ERR_OOM;
    *a = p;
    return OK;
}
CUresult cuArrayDestroy(CUarray a) { return host_free(a) < 0 ? ERR_INVALID_VALUE : OK; }
CUresult cuMipmappedArrayCreate(CUmipmappedArray *a, const ARRAY3D_DESC *d, unsigned levels) {
    if (!a || !d) return ERR_INVALID_VALUE;
    long long total = 0;
    for (unsigned l = 0; l < (levels ? levels : 1); l++) {
        size_t w = dim(d->Width >> l), h = d->Height ? dim(d->Height >> l) : 1, z = d->Depth ? dim(d->Depth >> l) : 1;
        total += (long long)(w * h * z * elem_size(d->Format) * d->NumChannels);
    }
    void *p = host_alloc(total);
    if (!p) return ERR_OOM;
    *a = p;
    return OK;
}
CUresult cuMipmappedArrayDestroy(CUmipmappedArray a) { return host_free(a) < 0 ? ERR_INVALID_VALUE : OK; }

static CUresult module_new(void **m) {
    if (!m) return ERR_INVALID_VALUE;
    if (!current_ctx) return ERR_INVALID_CONTEXT;
    void *p = host_alloc(module_bytes);
    if (!p) return ERR_OOM;
    *m = p;
    return OK;
}
CUresult cuModuleLoad(CUmodule *m, const char *f) { (void)f; return module_new(m); }
CUresult cuModuleLoadData(CUmodule *m, const void *img) { (void)img; return module_new(m); }
CUresult cuModuleLoadDataEx(CUmodule *m, const void *img, unsigned n, void *o, void **v) { (void)img; (void)n; (void)o; (void)v; return module_new(m); }
CUresult cuModuleLoadFatBinary(CUmodule *m, const void *img) { (void)img; return module_new(m); }
CUresult cuModuleUnload(CUmodule m) { return host_free(m) < 0 ? ERR_INVALID_VALUE : OK; }
CUresult cuLibraryLoadData(CUlibrary *l, const void *c, void *jo, void **jv, unsigned nj, void *lo, void **lv, unsigned nl) { (void)c; (void)jo; (void)jv; (void)nj; (void)lo; (void)lv; (void)nl; return module_new(l); }
CUresult cuLibraryLoadFromFile(CUlibrary *l, const char *f, void *jo, void **jv, unsigned nj, void *lo, void **lv, unsigned nl) { (void)f; (void)jo; (void)jv; (void)nj; (void)lo; (void)lv; (void)nl; return module_new(l); }
CUresult cuLibraryUnload(CUlibrary l) { return host_free(l) < 0 ? ERR_INVALID_VALUE : OK; }

/* Fake NVML in the same library (tests point VRAMSLICE_REAL_LIBNVML here). */
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
int nvmlDeviceGetMemoryInfo(void *dev, nvmlMemory_t *m) {
    (void)dev;
    if (!m) return 2;
    long long u = atomic_load(used);
    m->total = (unsigned long long)device_bytes; m->used = (unsigned long long)u; m->free = (unsigned long long)(device_bytes - u);
    return 0;
}
int nvmlDeviceGetMemoryInfo_v2(void *dev, nvmlMemory_v2_t *m) {
    (void)dev;
    if (!m) return 2;
    long long u = atomic_load(used);
    m->total = (unsigned long long)device_bytes; m->reserved = 0; m->used = (unsigned long long)u; m->free = (unsigned long long)(device_bytes - u);
    return 0;
}

/* Minimal CUDA 12 cuGetProcAddress: version-aware for the names with ABI versions. */
struct entry { const char *name; int min_version; int per_thread; void *fn; };
#define E(n, v, pt, f) { n, v, pt, (void *)(f) }
static const struct entry table[] = {
    E("cuInit", 0, 0, cuInit), E("cuDriverGetVersion", 0, 0, cuDriverGetVersion),
    E("cuDeviceGet", 0, 0, cuDeviceGet), E("cuDeviceGetCount", 0, 0, cuDeviceGetCount),
    E("cuDeviceTotalMem", 3020, 0, cuDeviceTotalMem_v2),
    E("cuCtxCreate", 11040, 0, cuCtxCreate_v3), E("cuCtxCreate", 3020, 0, cuCtxCreate_v2),
    E("cuCtxDestroy", 4000, 0, cuCtxDestroy_v2), E("cuCtxSetCurrent", 0, 0, cuCtxSetCurrent),
    E("cuCtxGetCurrent", 0, 0, cuCtxGetCurrent), E("cuCtxGetDevice", 0, 0, cuCtxGetDevice),
    E("cuDevicePrimaryCtxRetain", 0, 0, cuDevicePrimaryCtxRetain),
    E("cuDevicePrimaryCtxRelease", 11000, 0, cuDevicePrimaryCtxRelease_v2),
    E("cuDevicePrimaryCtxReset", 11000, 0, cuDevicePrimaryCtxReset_v2),
    E("cuMemGetInfo", 3020, 0, cuMemGetInfo_v2),
    E("cuMemAlloc", 3020, 0, cuMemAlloc_v2), E("cuMemAllocPitch", 3020, 0, cuMemAllocPitch_v2),
    E("cuMemAllocManaged", 0, 0, cuMemAllocManaged), E("cuMemFree", 3020, 0, cuMemFree_v2),
    E("cuMemAllocAsync", 0, 1, cuMemAllocAsync_ptsz), E("cuMemAllocAsync", 0, 0, cuMemAllocAsync),
    E("cuMemAllocFromPoolAsync", 0, 1, cuMemAllocFromPoolAsync_ptsz),
    E("cuMemAllocFromPoolAsync", 0, 0, cuMemAllocFromPoolAsync),
    E("cuMemFreeAsync", 0, 1, cuMemFreeAsync_ptsz), E("cuMemFreeAsync", 0, 0, cuMemFreeAsync),
    E("cuMemPoolTrimTo", 0, 0, cuMemPoolTrimTo), E("cuMemPoolGetAttribute", 0, 0, cuMemPoolGetAttribute),
    E("cuDeviceGetMemPool", 0, 0, cuDeviceGetMemPool),
    E("cuMemCreate", 0, 0, cuMemCreate), E("cuMemRelease", 0, 0, cuMemRelease),
    E("cuArrayCreate", 3020, 0, cuArrayCreate_v2), E("cuArray3DCreate", 3020, 0, cuArray3DCreate_v2),
    E("cuArrayDestroy", 0, 0, cuArrayDestroy), E("cuMipmappedArrayCreate", 0, 0, cuMipmappedArrayCreate),
    E("cuMipmappedArrayDestroy", 0, 0, cuMipmappedArrayDestroy),
    E("cuModuleLoad", 0, 0, cuModuleLoad), E("cuModuleLoadData", 0, 0, cuModuleLoadData),
    E("cuModuleLoadDataEx", 0, 0, cuModuleLoadDataEx), E("cuModuleLoadFatBinary", 0, 0, cuModuleLoadFatBinary),
    E("cuModuleUnload", 0, 0, cuModuleUnload), E("cuLibraryLoadData", 0, 0, cuLibraryLoadData),
    E("cuLibraryLoadFromFile", 0, 0, cuLibraryLoadFromFile), E("cuLibraryUnload", 0, 0, cuLibraryUnload),
};
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, unsigned long long flags, int *status);
CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, unsigned long long flags) {
    return cuGetProcAddress_v2(symbol, pfn, version, flags, NULL);
}
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, unsigned long long flags, int *status) {
    if (!symbol || !pfn) return ERR_INVALID_VALUE;
    int per_thread = (flags & 2) ? 1 : 0; /* CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM */
    if (!strcmp(symbol, "cuGetProcAddress")) { *pfn = (void *)cuGetProcAddress_v2; if (status) *status = 0; return OK; }
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        const struct entry *e = &table[i];
        if (strcmp(e->name, symbol) || e->min_version > version) continue;
        if (e->per_thread && !per_thread) continue;
        *pfn = e->fn;
        if (status) *status = 0;
        return OK;
    }
    *pfn = NULL;
    if (status) *status = 1; /* CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND */
    return ERR_NOT_FOUND;
}
