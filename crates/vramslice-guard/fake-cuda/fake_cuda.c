/*
 * A fake CUDA driver (libcuda.so.1 stand-in) for the guard's tests and benchmark.
 *
 * Device memory is host memory. FAKE_CUDA_DEVICES devices (default 1, at most 8); their sizes
 * come from FAKE_CUDA_DEVICE_BYTES (default 1 GiB), a comma-separated list giving device i the
 * i-th value (the last value for the devices beyond the list). Device i's UUID has all 16 bytes
 * equal to 0x11 * (i + 1): "GPU-11111111-1111-1111-1111-111111111111" for device 0,
 * "GPU-22222222-..." for device 1. Every allocation is charged against its device's size with an
 * atomic counter, and device 0's high-water mark is written to FAKE_CUDA_HWM_FILE (device i's
 * to FAKE_CUDA_HWM_FILE.i) at every new peak, so a test can check what the *driver* saw across
 * processes: the file holds the highest value any process of the test wrote (processes share the
 * counts through FAKE_CUDA_SHARED_FILE, an mmapped array of counters, when set).
 *
 * Memory is taken on the device of the calling thread's current context (device 0 when none is
 * current), cuMemCreate and pools on the device they name. Contexts cost FAKE_CUDA_CTX_BYTES
 * (default 64 MiB) on their device, modules FAKE_CUDA_MODULE_BYTES (1 MiB). cuMemGetInfo needs a
 * current context and answers for its device, like the real driver. Each device has a default
 * pool and one pool cuMemPoolCreate hands out (the same handle again once cuMemPoolDestroy has
 * destroyed it); a pool located on the host hands out memory no device counts; pools retain
 * freed async memory until cuMemPoolTrimTo (or destruction) when FAKE_CUDA_POOL_RETAIN=1. CUDA graphs with memory nodes, stream capture and
 * each device's graph memory pool: fake_cuda_graphs.inc.c (included below). Physical allocations
 * (cuMemCreate), their handle references and mappings: fake_cuda_vmm.inc.c.
 * Built with -Wl,-Bsymbolic like the real driver, so its own addresses are never interposed.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
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

#define MAXDEV 8
static int ndev = 1;
static _Atomic long long local_counts[2 * MAXDEV];
/* counts[2 * d] = bytes taken on device d, counts[2 * d + 1] = its high-water mark */
static _Atomic long long *counts = local_counts;
static long long device_bytes[MAXDEV];
static long long ctx_bytes = 64LL << 20;
static long long module_bytes = 1LL << 20;
static int pool_retain;
static const char *hwm_file;
static __thread CUcontext current_ctx;

typedef struct { int dev; _Atomic long long held, in_use; _Atomic int destroyed; } fake_pool;
/* A device's default pool, the one pool cuMemPoolCreate makes on it (the same handle again after
 * cuMemPoolDestroy, as a real driver may reuse one), and one pool of host memory (dev -1), whose
 * allocations take no device memory. */
static fake_pool default_pool[MAXDEV], created_pool[MAXDEV], host_pool = { .dev = -1 };

static long long env_ll(const char *name, long long dflt) {
    const char *v = getenv(name);
    return v && *v ? atoll(v) : dflt;
}

__attribute__((constructor)) static void fake_init(void) {
    ndev = (int)env_ll("FAKE_CUDA_DEVICES", 1);
    if (ndev < 1) ndev = 1;
    if (ndev > MAXDEV) ndev = MAXDEV;
    long long size = 1LL << 30;
    const char *sizes = getenv("FAKE_CUDA_DEVICE_BYTES");
    for (int d = 0; d < MAXDEV; d++) {
        if (sizes && *sizes) {
            size = atoll(sizes);
            const char *comma = strchr(sizes, ',');
            sizes = comma ? comma + 1 : NULL;
        }
        device_bytes[d] = size;
        default_pool[d].dev = d;
        created_pool[d].dev = d;
    }
    ctx_bytes = env_ll("FAKE_CUDA_CTX_BYTES", ctx_bytes);
    module_bytes = env_ll("FAKE_CUDA_MODULE_BYTES", module_bytes);
    pool_retain = (int)env_ll("FAKE_CUDA_POOL_RETAIN", 0);
    hwm_file = getenv("FAKE_CUDA_HWM_FILE");
    const char *shared = getenv("FAKE_CUDA_SHARED_FILE");
    if (shared && *shared) {
        int fd = open(shared, O_RDWR | O_CREAT, 0644);
        if (fd >= 0 && ftruncate(fd, 4096) == 0) {
            void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (p != MAP_FAILED) counts = (_Atomic long long *)p;
        }
        if (fd >= 0) close(fd);
    }
}

static _Atomic long long *used_of(int d) { return &counts[2 * d]; }

static void note_peak(int d, long long now) {
    _Atomic long long *hwm = &counts[2 * d + 1];
    long long old = atomic_load(hwm);
    while (now > old) {
        if (atomic_compare_exchange_weak(hwm, &old, now)) {
            if (hwm_file) {
                char path[4096];
                if (d == 0) snprintf(path, sizeof path, "%s", hwm_file);
                else snprintf(path, sizeof path, "%s.%d", hwm_file, d);
                FILE *f = fopen(path, "w");
                if (f) { fprintf(f, "%lld\n", atomic_load(hwm)); fclose(f); }
            }
            return;
        }
    }
}

static int take(int d, long long n) {
    long long now = atomic_fetch_add(used_of(d), n) + n;
    if (now > device_bytes[d]) { atomic_fetch_sub(used_of(d), n); return 0; }
    note_peak(d, now);
    return 1;
}
static void give(int d, long long n) { atomic_fetch_sub(used_of(d), n); }

/* Each allocation carries a 16-byte header: its charged size and its device. */
static void *host_alloc_on(int d, long long n) {
    if (!take(d, n)) return NULL;
    long long *p = malloc(16 + (size_t)(n > 64 ? 64 : n));
    if (!p) { give(d, n); return NULL; }
    p[0] = n;
    p[1] = d;
    return p + 2;
}
static int device_of(const void *q) { return (int)(((const long long *)q)[-1] & 0xff); }
static long long host_free(void *q) {
    if (!q) return -1;
    long long *p = (long long *)q - 2;
    long long n = p[0];
    int d = (int)(p[1] & 0xff);
    free(p);
    give(d, n);
    return n;
}
/* Contexts are allocations on their device: the header says which. */
static int current_device(void) { return current_ctx ? device_of(current_ctx) : 0; }
static void *host_alloc(long long n) { return host_alloc_on(current_device(), n); }
static int valid_device(CUdevice d) { return d >= 0 && d < ndev; }

CUresult cuInit(unsigned flags) { (void)flags; return OK; }
CUresult cuDriverGetVersion(int *v) { if (!v) return ERR_INVALID_VALUE; *v = 12040; return OK; }
CUresult cuDeviceGetCount(int *n) { if (!n) return ERR_INVALID_VALUE; *n = ndev; return OK; }
/* Only CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT (16), from FAKE_CUDA_SMS; unset, the driver does
 * not say (as for any other attribute). */
CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
    long long sms = env_ll("FAKE_CUDA_SMS", 0);
    if (!v || !valid_device(d) || attr != 16 || sms <= 0) return ERR_INVALID_VALUE;
    *v = (int)sms;
    return OK;
}
CUresult cuDeviceGet(CUdevice *d, int ordinal) { if (!d || !valid_device(ordinal)) return ERR_INVALID_VALUE; *d = ordinal; return OK; }
CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) { if (!bytes || !valid_device(d)) return ERR_INVALID_VALUE; *bytes = (size_t)device_bytes[d]; return OK; }
typedef struct { unsigned char bytes[16]; } CUuuid;
CUresult cuDeviceGetUuid(CUuuid *u, CUdevice d) {
    if (!u || !valid_device(d)) return ERR_INVALID_VALUE;
    memset(u->bytes, 0x11 * (d + 1), sizeof u->bytes);
    return OK;
}
CUresult cuDeviceGetUuid_v2(CUuuid *u, CUdevice d) { return cuDeviceGetUuid(u, d); }

static CUresult ctx_new(CUcontext *c, CUdevice d) {
    if (!c) return ERR_INVALID_VALUE;
    if (!valid_device(d)) return ERR_INVALID_VALUE;
    void *p = host_alloc_on(d, ctx_bytes);
    if (!p) return ERR_OOM;
    *c = p;
    current_ctx = p;
    return OK;
}
CUresult cuCtxCreate_v2(CUcontext *c, unsigned flags, CUdevice d) { (void)flags; return ctx_new(c, d); }
CUresult cuCtxCreate_v3(CUcontext *c, void *params, int n, unsigned flags, CUdevice d) { (void)params; (void)n; (void)flags; return ctx_new(c, d); }
CUresult cuCtxCreate_v4(CUcontext *c, void *params, unsigned flags, CUdevice d) { (void)params; (void)flags; return ctx_new(c, d); }
CUresult cuCtxDestroy_v2(CUcontext c) {
    if (!c) return ERR_INVALID_VALUE;
    if (current_ctx == c) current_ctx = NULL;
    host_free(c);
    return OK;
}
/* v1 context entry points (before CUDA 3.2 / 4.0): the same as their successors here. */
CUresult cuCtxCreate(CUcontext *c, unsigned flags, CUdevice d) { return cuCtxCreate_v2(c, flags, d); }
CUresult cuCtxDestroy(CUcontext c) { return cuCtxDestroy_v2(c); }
CUresult cuCtxSetCurrent(CUcontext c) { current_ctx = c; return OK; }
/* The context stack, one deep beyond the current context (all the guard needs). */
static __thread CUcontext pushed_ctx;
CUresult cuCtxPushCurrent_v2(CUcontext c) { if (!c) return ERR_INVALID_VALUE; pushed_ctx = current_ctx; current_ctx = c; return OK; }
CUresult cuCtxPopCurrent_v2(CUcontext *c) { if (c) *c = current_ctx; current_ctx = pushed_ctx; pushed_ctx = NULL; return OK; }
CUresult cuCtxGetCurrent(CUcontext *c) { if (!c) return ERR_INVALID_VALUE; *c = current_ctx; return OK; }
CUresult cuCtxGetDevice(CUdevice *d) { if (!d) return ERR_INVALID_VALUE; if (!current_ctx) return ERR_INVALID_CONTEXT; *d = device_of(current_ctx); return OK; }
CUresult cuCtxSynchronize(void) { return OK; }

static CUcontext primary[MAXDEV];
static int primary_refs[MAXDEV];
CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) {
    if (!c || !valid_device(d)) return ERR_INVALID_VALUE;
    if (primary_refs[d]++ == 0) {
        primary[d] = host_alloc_on(d, ctx_bytes);
        if (!primary[d]) { primary_refs[d] = 0; return ERR_OOM; }
    }
    *c = primary[d];
    return OK;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    if (!valid_device(d)) return ERR_INVALID_VALUE;
    if (primary_refs[d] == 0) return ERR_INVALID_CONTEXT;
    if (--primary_refs[d] == 0) {
        if (current_ctx == primary[d]) current_ctx = NULL;
        host_free(primary[d]);
        primary[d] = NULL;
    }
    return OK;
}
CUresult cuDevicePrimaryCtxReset_v2(CUdevice d) {
    if (!valid_device(d)) return ERR_INVALID_VALUE;
    if (primary_refs[d] > 0) {
        if (current_ctx == primary[d]) current_ctx = NULL;
        host_free(primary[d]);
        primary[d] = NULL;
        primary_refs[d] = 0;
    }
    return OK;
}

CUresult cuMemGetInfo_v2(size_t *free_b, size_t *total) {
    if (!current_ctx) return ERR_INVALID_CONTEXT;
    if (!free_b || !total) return ERR_INVALID_VALUE;
    int d = current_device();
    long long u = atomic_load(used_of(d));
    *free_b = (size_t)(u > device_bytes[d] ? 0 : device_bytes[d] - u);
    *total = (size_t)device_bytes[d];
    return OK;
}

#define ALLOC_INTO(out, n) do { if (!(out)) return ERR_INVALID_VALUE; void *p_ = host_alloc((long long)(n)); if (!p_) return ERR_OOM; *(out) = (CUdeviceptr)p_; return OK; } while (0)

CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t n) { ALLOC_INTO(dptr, n); }
/* Rows are padded to 512 bytes, as a pitch the driver might choose. */
static size_t pitch_for(size_t w) { return (w + 511) / 512 * 512; }
CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t w, size_t h, unsigned elem) {
    (void)elem;
    if (!pitch) return ERR_INVALID_VALUE;
    size_t p = pitch_for(w);
    if (!dptr) return ERR_INVALID_VALUE;
    void *q = host_alloc((long long)(p * h));
    if (!q) return ERR_OOM;
    *pitch = p;
    *dptr = (CUdeviceptr)q;
    return OK;
}
CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t n, unsigned flags) { (void)flags; ALLOC_INTO(dptr, n); }
CUresult cuMemFree_v2(CUdeviceptr p) { return host_free((void *)p) < 0 ? ERR_INVALID_VALUE : OK; }

/* The v1 ABI (CUDA 3.1: 32-bit device pointers and sizes), which the driver still exports and
 * cuGetProcAddress hands out for versions before 3020. Its pointers are small numbers naming
 * slots of allocations. */
#define V1_SLOTS 1024
static void *_Atomic v1_slots[V1_SLOTS];
static CUresult v1_keep(unsigned *dptr, void *q) {
    for (unsigned i = 0; i < V1_SLOTS; i++) {
        void *expected = NULL;
        if (atomic_compare_exchange_strong(&v1_slots[i], &expected, q)) { *dptr = (i + 1) << 16; return OK; }
    }
    host_free(q);
    return ERR_OOM;
}
CUresult cuMemAlloc(unsigned *dptr, unsigned n) {
    if (!dptr || !n) return ERR_INVALID_VALUE;
    void *q = host_alloc(n);
    return q ? v1_keep(dptr, q) : ERR_OOM;
}
CUresult cuMemAllocPitch(unsigned *dptr, unsigned *pitch, unsigned w, unsigned h, unsigned elem) {
    (void)elem;
    if (!dptr || !pitch) return ERR_INVALID_VALUE;
    unsigned p = (unsigned)pitch_for(w);
    void *q = host_alloc((long long)p * h);
    if (!q) return ERR_OOM;
    *pitch = p;
    return v1_keep(dptr, q);
}
CUresult cuMemFree(unsigned p) {
    unsigned i = (p >> 16) - 1;
    if (!p || (p & 0xffff) || i >= V1_SLOTS) return ERR_INVALID_VALUE;
    void *q = atomic_exchange(&v1_slots[i], NULL);
    return q && host_free(q) >= 0 ? OK : ERR_INVALID_VALUE;
}
static unsigned clamp32(size_t v) { return v > 0xffffffffu ? 0xffffffffu : (unsigned)v; }
CUresult cuMemGetInfo(unsigned *free_b, unsigned *total) {
    size_t f, t;
    if (!free_b || !total) return ERR_INVALID_VALUE;
    CUresult rc = cuMemGetInfo_v2(&f, &t);
    if (rc == OK) { *free_b = clamp32(f); *total = clamp32(t); }
    return rc;
}
CUresult cuDeviceTotalMem(unsigned *bytes, CUdevice d) {
    size_t t;
    if (!bytes) return ERR_INVALID_VALUE;
    CUresult rc = cuDeviceTotalMem_v2(&t, d);
    if (rc == OK) *bytes = clamp32(t);
    return rc;
}

#include "fake_cuda_graphs.inc.c"

/* With retention, async frees stay taken (on the pool's device) until a trim. */
CUresult cuDeviceGetMemPool(CUmemoryPool *pool, CUdevice d) { if (!pool || !valid_device(d)) return ERR_INVALID_VALUE; *pool = &default_pool[d]; return OK; }
CUresult cuDeviceGetDefaultMemPool(CUmemoryPool *pool, CUdevice d) { return cuDeviceGetMemPool(pool, d); }
typedef struct { int allocType; int handleTypes; struct { int type; int id; } location; } POOL_PROPS;
/* Location types: 1 a device, 2 the host, 3 a host NUMA node, 4 the current thread's NUMA node. */
CUresult cuMemPoolCreate(CUmemoryPool *pool, const POOL_PROPS *props) {
    if (!pool || !props) return ERR_INVALID_VALUE;
    fake_pool *made;
    if (props->location.type == 1 && valid_device(props->location.id)) made = &created_pool[props->location.id];
    else if (props->location.type >= 2 && props->location.type <= 4) made = &host_pool;
    else return ERR_INVALID_VALUE;
    atomic_store(&made->held, 0);
    atomic_store(&made->destroyed, 0);
    *pool = made;
    return OK;
}
/* One of the pools this driver handed out and has not destroyed (anything else is an invalid
 * handle, as for the real one). */
static fake_pool *known_pool(void *p) {
    fake_pool *found = NULL;
    for (int d = 0; d < MAXDEV; d++)
        if (p == &default_pool[d] || p == &created_pool[d]) found = p;
    if (p == &host_pool) found = p;
    return found && !atomic_load(&found->destroyed) ? found : NULL;
}
/* Its memory goes back at once, and what is still allocated from it goes back when freed (the
 * driver releases the pool's resources once no allocation is outstanding). A device's default
 * pool cannot be destroyed. */
CUresult cuMemPoolDestroy(CUmemoryPool p) {
    fake_pool *pool = known_pool(p);
    if (!pool || (pool->dev >= 0 && pool == &default_pool[pool->dev])) return ERR_INVALID_VALUE;
    atomic_store(&pool->destroyed, 1);
    long long held = atomic_exchange(&pool->held, 0);
    if (pool->dev >= 0) give(pool->dev, held);
    return OK;
}
#define TAG_CREATED_POOL 0x100
#define TAG_HOST_POOL 0x200
static CUresult async_alloc(fake_pool *pool, CUdeviceptr *dptr, size_t n) {
    if (!dptr || !known_pool(pool)) return ERR_INVALID_VALUE;
    if (pool == &host_pool) {
        long long *h = malloc(16 + (n > 64 ? 64 : n));
        if (!h) return ERR_OOM;
        h[0] = (long long)n;
        h[1] = TAG_HOST_POOL;
        atomic_fetch_add(&pool->in_use, (long long)n);
        *dptr = (CUdeviceptr)(h + 2);
        return OK;
    }
    int d = pool->dev;
    long long from_pool = 0, held = atomic_load(&pool->held);
    while (held > 0) {
        long long t = held < (long long)n ? held : (long long)n;
        if (atomic_compare_exchange_weak(&pool->held, &held, held - t)) { from_pool = t; break; }
    }
    give(d, from_pool); /* the pool's bytes are re-charged by host_alloc_on below */
    void *p = host_alloc_on(d, (long long)n);
    if (!p) { atomic_fetch_add(used_of(d), from_pool); atomic_fetch_add(&pool->held, from_pool); return ERR_OOM; }
    atomic_fetch_add(&pool->in_use, (long long)n);
    if (pool == &created_pool[d]) ((long long *)p)[-1] |= TAG_CREATED_POOL; /* which pool gets it back */
    *dptr = (CUdeviceptr)p;
    return OK;
}
static CUresult async_free(CUdeviceptr q) {
    if (!q) return ERR_INVALID_VALUE;
    long long tag = ((long long *)q)[-1];
    if (tag & TAG_HOST_POOL) {
        long long *h = (long long *)q - 2;
        atomic_fetch_sub(&host_pool.in_use, h[0]);
        free(h);
        return OK;
    }
    int d = (int)(tag & 0xff);
    fake_pool *pool = (tag & TAG_CREATED_POOL) ? &created_pool[d] : &default_pool[d];
    long long n = host_free((void *)q);
    if (n < 0) return ERR_INVALID_VALUE;
    atomic_fetch_sub(&pool->in_use, n);
    if (pool_retain && !atomic_load(&pool->destroyed)) { atomic_fetch_add(used_of(d), n); atomic_fetch_add(&pool->held, n); }
    return OK;
}
/* cuMemAllocAsync draws from the current pool of the stream's device (which is not always the
 * current context's). */
static fake_pool *stream_pool(CUstream s) { return &default_pool[stream_device(s)]; }
/* On a capturing stream an async allocation or free is a graph node, not memory. */
CUresult cuMemAllocAsync(CUdeviceptr *d, size_t n, CUstream s) {
    fake_graph *g = capture_graph(s);
    return g ? capture_alloc(g, d, n, stream_device(s)) : async_alloc(stream_pool(s), d, n);
}
CUresult cuMemAllocAsync_ptsz(CUdeviceptr *d, size_t n, CUstream s) { return cuMemAllocAsync(d, n, s); }
CUresult cuMemAllocFromPoolAsync(CUdeviceptr *d, size_t n, CUmemoryPool pool, CUstream s) {
    fake_graph *g = capture_graph(s);
    if (g) return known_pool(pool) && ((fake_pool *)pool)->dev >= 0 ? capture_alloc(g, d, n, ((fake_pool *)pool)->dev) : ERR_INVALID_VALUE;
    return async_alloc(pool, d, n);
}
CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *d, size_t n, CUmemoryPool pool, CUstream s) { return cuMemAllocFromPoolAsync(d, n, pool, s); }
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    fake_graph *g = capture_graph(s);
    return g ? add_node(g, NULL, NODE_MEM_FREE, 0, 0, p, NULL) : async_free(p);
}
CUresult cuMemFreeAsync_ptsz(CUdeviceptr p, CUstream s) { return cuMemFreeAsync(p, s); }
CUresult cuMemPoolTrimTo(CUmemoryPool p, size_t keep) {
    fake_pool *pool = known_pool(p);
    if (!pool) return ERR_INVALID_VALUE;
    long long held = atomic_load(&pool->held);
    if (held > (long long)keep) {
        long long drop = held - (long long)keep;
        atomic_fetch_sub(&pool->held, drop);
        if (pool->dev >= 0) give(pool->dev, drop);
    }
    return OK;
}
#define ATTR_RESERVED_MEM_CURRENT 5
CUresult cuMemPoolGetAttribute(CUmemoryPool p, int attr, void *value) {
    fake_pool *pool = known_pool(p);
    if (!value || !pool) return ERR_INVALID_VALUE;
    if (attr != ATTR_RESERVED_MEM_CURRENT) return ERR_INVALID_VALUE;
    *(unsigned long long *)value = (unsigned long long)(atomic_load(&pool->in_use) + atomic_load(&pool->held));
    return OK;
}

#include "fake_cuda_vmm.inc.c"

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
/* v1 array descriptors: 32-bit dimensions. */
typedef struct { unsigned Width, Height; int Format; unsigned NumChannels; } ARRAY_DESC_V1;
typedef struct { unsigned Width, Height, Depth; int Format; unsigned NumChannels, Flags; } ARRAY3D_DESC_V1;
CUresult cuArrayCreate(CUarray *a, const ARRAY_DESC_V1 *d) {
    if (!d) return ERR_INVALID_VALUE;
    ARRAY_DESC v2 = { d->Width, d->Height, d->Format, d->NumChannels };
    return cuArrayCreate_v2(a, &v2);
}
CUresult cuArray3DCreate(CUarray *a, const ARRAY3D_DESC_V1 *d) {
    if (!d) return ERR_INVALID_VALUE;
    ARRAY3D_DESC v2 = { d->Width, d->Height, d->Depth, d->Format, d->NumChannels, d->Flags };
    return cuArray3DCreate_v2(a, &v2);
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
/* Libraries are context-independent (CUDA 12): with no context current one loads, taking no
 * device memory until a context uses it (here: nothing at all). */
static CUresult library_new(void **l) {
    if (!l) return ERR_INVALID_VALUE;
    if (current_ctx) return module_new(l);
    void *p = host_alloc_on(0, 0);
    if (!p) return ERR_OOM;
    *l = p;
    return OK;
}
CUresult cuLibraryLoadData(CUlibrary *l, const void *c, void *jo, void **jv, unsigned nj, void *lo, void **lv, unsigned nl) { (void)c; (void)jo; (void)jv; (void)nj; (void)lo; (void)lv; (void)nl; return library_new(l); }
CUresult cuLibraryLoadFromFile(CUlibrary *l, const char *f, void *jo, void **jv, unsigned nj, void *lo, void **lv, unsigned nl) { (void)f; (void)jo; (void)jv; (void)nj; (void)lo; (void)lv; (void)nl; return library_new(l); }
CUresult cuLibraryUnload(CUlibrary l) { return host_free(l) < 0 ? ERR_INVALID_VALUE : OK; }

/* Fake NVML in the same library (tests point VRAMSLICE_REAL_LIBNVML here). A device handle
 * points at its index; NULL is device 0. */
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
static int nvml_index[MAXDEV] = { 0, 1, 2, 3, 4, 5, 6, 7 };
static int nvml_device(void *dev) { return dev ? *(int *)dev : 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned idx, void **dev) {
    if (!dev || idx >= (unsigned)ndev) return 2;
    *dev = &nvml_index[idx];
    return 0;
}
int nvmlDeviceGetUUID(void *dev, char *buf, unsigned len) {
    CUuuid u;
    if (!buf || cuDeviceGetUuid(&u, nvml_device(dev)) != OK) return 2;
    unsigned char *b = u.bytes;
    int n = snprintf(buf, len, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
                     b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
    return n < 0 || (unsigned)n >= len ? 7 /* NVML_ERROR_INSUFFICIENT_SIZE */ : 0;
}
int nvmlDeviceGetMemoryInfo(void *dev, nvmlMemory_t *m) {
    if (!m) return 2;
    int d = nvml_device(dev);
    long long u = atomic_load(used_of(d));
    m->total = (unsigned long long)device_bytes[d]; m->used = (unsigned long long)u; m->free = (unsigned long long)(device_bytes[d] - u);
    return 0;
}
int nvmlDeviceGetMemoryInfo_v2(void *dev, nvmlMemory_v2_t *m) {
    if (!m) return 2;
    int d = nvml_device(dev);
    long long u = atomic_load(used_of(d));
    m->total = (unsigned long long)device_bytes[d]; m->reserved = 0; m->used = (unsigned long long)u; m->free = (unsigned long long)(device_bytes[d] - u);
    return 0;
}

/* A cuMemAlloc of a CUDA version to come (its ABI as v2's here): an entry point the guard does
 * not know by address, handed out only for version 99000 and above. */
static CUresult future_cuMemAlloc(CUdeviceptr *d, size_t n) { return cuMemAlloc_v2(d, n); }

/* Minimal CUDA 12 cuGetProcAddress: version-aware for the names with ABI versions. */
struct entry { const char *name; int min_version; int per_thread; void *fn; };
#define E(n, v, pt, f) { n, v, pt, (void *)(f) }
static const struct entry table[] = {
    E("cuInit", 0, 0, cuInit), E("cuDriverGetVersion", 0, 0, cuDriverGetVersion),
    E("cuDeviceGet", 0, 0, cuDeviceGet), E("cuDeviceGetCount", 0, 0, cuDeviceGetCount), E("cuDeviceGetAttribute", 0, 0, cuDeviceGetAttribute),
    E("cuDeviceGetUuid", 11040, 0, cuDeviceGetUuid_v2), E("cuDeviceGetUuid", 0, 0, cuDeviceGetUuid),
    E("cuDeviceTotalMem", 3020, 0, cuDeviceTotalMem_v2), E("cuDeviceTotalMem", 0, 0, cuDeviceTotalMem),
    E("cuCtxCreate", 11040, 0, cuCtxCreate_v3), E("cuCtxCreate", 3020, 0, cuCtxCreate_v2), E("cuCtxCreate", 0, 0, cuCtxCreate),
    E("cuCtxDestroy", 4000, 0, cuCtxDestroy_v2), E("cuCtxDestroy", 0, 0, cuCtxDestroy), E("cuCtxSetCurrent", 0, 0, cuCtxSetCurrent),
    E("cuCtxGetCurrent", 0, 0, cuCtxGetCurrent), E("cuCtxGetDevice", 0, 0, cuCtxGetDevice),
    E("cuDevicePrimaryCtxRetain", 0, 0, cuDevicePrimaryCtxRetain),
    E("cuDevicePrimaryCtxRelease", 11000, 0, cuDevicePrimaryCtxRelease_v2),
    E("cuDevicePrimaryCtxReset", 11000, 0, cuDevicePrimaryCtxReset_v2),
    E("cuMemGetInfo", 3020, 0, cuMemGetInfo_v2), E("cuMemGetInfo", 0, 0, cuMemGetInfo),
    E("cuMemAlloc", 99000, 0, future_cuMemAlloc),
    E("cuMemAlloc", 3020, 0, cuMemAlloc_v2), E("cuMemAlloc", 0, 0, cuMemAlloc),
    E("cuMemAllocPitch", 3020, 0, cuMemAllocPitch_v2), E("cuMemAllocPitch", 0, 0, cuMemAllocPitch),
    E("cuMemAllocManaged", 0, 0, cuMemAllocManaged), E("cuMemFree", 3020, 0, cuMemFree_v2), E("cuMemFree", 0, 0, cuMemFree),
    E("cuMemAllocAsync", 0, 1, cuMemAllocAsync_ptsz), E("cuMemAllocAsync", 0, 0, cuMemAllocAsync),
    E("cuMemAllocFromPoolAsync", 0, 1, cuMemAllocFromPoolAsync_ptsz),
    E("cuMemAllocFromPoolAsync", 0, 0, cuMemAllocFromPoolAsync),
    E("cuMemFreeAsync", 0, 1, cuMemFreeAsync_ptsz), E("cuMemFreeAsync", 0, 0, cuMemFreeAsync),
    E("cuMemPoolTrimTo", 0, 0, cuMemPoolTrimTo), E("cuMemPoolGetAttribute", 0, 0, cuMemPoolGetAttribute),
    E("cuDeviceGetMemPool", 0, 0, cuDeviceGetMemPool),
    E("cuDeviceGetDefaultMemPool", 0, 0, cuDeviceGetDefaultMemPool), E("cuMemPoolCreate", 0, 0, cuMemPoolCreate),
    E("cuMemPoolDestroy", 0, 0, cuMemPoolDestroy),
    E("cuMemCreate", 0, 0, cuMemCreate), E("cuMemRelease", 0, 0, cuMemRelease),
    E("cuMemAddressReserve", 0, 0, cuMemAddressReserve), E("cuMemAddressFree", 0, 0, cuMemAddressFree),
    E("cuMemMap", 0, 0, cuMemMap), E("cuMemUnmap", 0, 0, cuMemUnmap),
    E("cuMemRetainAllocationHandle", 0, 0, cuMemRetainAllocationHandle),
    E("cuArrayCreate", 3020, 0, cuArrayCreate_v2), E("cuArrayCreate", 0, 0, cuArrayCreate),
    E("cuArray3DCreate", 3020, 0, cuArray3DCreate_v2), E("cuArray3DCreate", 0, 0, cuArray3DCreate),
    E("cuArrayDestroy", 0, 0, cuArrayDestroy), E("cuMipmappedArrayCreate", 0, 0, cuMipmappedArrayCreate),
    E("cuMipmappedArrayDestroy", 0, 0, cuMipmappedArrayDestroy),
    E("cuModuleLoad", 0, 0, cuModuleLoad), E("cuModuleLoadData", 0, 0, cuModuleLoadData),
    E("cuModuleLoadDataEx", 0, 0, cuModuleLoadDataEx), E("cuModuleLoadFatBinary", 0, 0, cuModuleLoadFatBinary),
    E("cuModuleUnload", 0, 0, cuModuleUnload), E("cuLibraryLoadData", 0, 0, cuLibraryLoadData),
    E("cuLibraryLoadFromFile", 0, 0, cuLibraryLoadFromFile), E("cuLibraryUnload", 0, 0, cuLibraryUnload),
    E("cuStreamCreate", 0, 0, cuStreamCreate), E("cuStreamGetCtx", 0, 0, cuStreamGetCtx),
    E("cuCtxPushCurrent", 4000, 0, cuCtxPushCurrent_v2), E("cuCtxPopCurrent", 4000, 0, cuCtxPopCurrent_v2), E("cuStreamDestroy", 4000, 0, cuStreamDestroy_v2),
    E("cuStreamSynchronize", 0, 0, cuStreamSynchronize), E("cuStreamBeginCapture", 10010, 0, cuStreamBeginCapture_v2),
    E("cuStreamEndCapture", 0, 1, cuStreamEndCapture_ptsz), E("cuStreamEndCapture", 0, 0, cuStreamEndCapture),
    E("cuStreamIsCapturing", 0, 1, cuStreamIsCapturing_ptsz), E("cuStreamIsCapturing", 0, 0, cuStreamIsCapturing),
    E("cuStreamGetCaptureInfo", 12030, 1, cuStreamGetCaptureInfo_v3_ptsz),
    E("cuStreamGetCaptureInfo", 12030, 0, cuStreamGetCaptureInfo_v3),
    E("cuStreamGetCaptureInfo", 11030, 1, cuStreamGetCaptureInfo_v2_ptsz),
    E("cuStreamGetCaptureInfo", 11030, 0, cuStreamGetCaptureInfo_v2),
    E("cuGraphCreate", 0, 0, cuGraphCreate), E("cuGraphDestroy", 0, 0, cuGraphDestroy),
    E("cuGraphAddMemAllocNode", 0, 0, cuGraphAddMemAllocNode), E("cuGraphAddMemFreeNode", 0, 0, cuGraphAddMemFreeNode),
    E("cuGraphAddChildGraphNode", 0, 0, cuGraphAddChildGraphNode), E("cuGraphGetNodes", 0, 0, cuGraphGetNodes),
    E("cuGraphNodeGetType", 0, 0, cuGraphNodeGetType), E("cuGraphMemAllocNodeGetParams", 0, 0, cuGraphMemAllocNodeGetParams),
    E("cuGraphChildGraphNodeGetGraph", 0, 0, cuGraphChildGraphNodeGetGraph),
    E("cuGraphInstantiate", 12000, 0, cuGraphInstantiateWithFlags), E("cuGraphInstantiate", 11000, 0, cuGraphInstantiate_v2),
    E("cuGraphInstantiate", 0, 0, cuGraphInstantiate), E("cuGraphInstantiateWithFlags", 0, 0, cuGraphInstantiateWithFlags),
    E("cuGraphInstantiateWithParams", 0, 1, cuGraphInstantiateWithParams_ptsz),
    E("cuGraphInstantiateWithParams", 0, 0, cuGraphInstantiateWithParams),
    E("cuGraphLaunch", 0, 1, cuGraphLaunch_ptsz), E("cuGraphLaunch", 0, 0, cuGraphLaunch),
    E("cuGraphUpload", 0, 1, cuGraphUpload_ptsz), E("cuGraphUpload", 0, 0, cuGraphUpload),
    E("cuGraphExecDestroy", 0, 0, cuGraphExecDestroy), E("cuDeviceGraphMemTrim", 0, 0, cuDeviceGraphMemTrim),
    E("cuDeviceGetGraphMemAttribute", 0, 0, cuDeviceGetGraphMemAttribute),
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
