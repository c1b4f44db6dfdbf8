/*
 * probe pools <direct|dlsym|gpa> <limit-bytes>: memory pools the program creates. A pool located
 * on the host hands out host memory, never charged; a destroyed pool's retained memory goes back
 * at once, and what was still allocated from it when it is freed; a pool created on a handle the
 * driver hands out again is held to the limit like any. Run with FAKE_CUDA_POOL_RETAIN=1 (pools
 * keep freed memory until trimmed). Included by probe.c.
 */

CUresult cuMemPoolCreate(H *, const void *);
CUresult cuMemPoolDestroy(H);

/* CUmemPoolProps: allocation type, handle types, location, then fields the guard never reads. */
typedef struct { int allocType; int handleTypes; struct { int type; int id; } location; void *win32; size_t maxSize;
                 unsigned short usage; unsigned char reserved[54]; } POOL_PROPS;

struct papi {
    CUresult (*create)(H *, const void *);
    CUresult (*destroy)(H);
    CUresult (*alloc_pool)(CUdeviceptr *, size_t, H, H);
    CUresult (*free_async)(CUdeviceptr, H);
    CUresult (*alloc)(CUdeviceptr *, size_t);
    CUresult (*free_)(CUdeviceptr);
    CUresult (*info)(size_t *, size_t *);
};

static void load_pools_api(struct papi *a, const char *mode) {
    if (!strcmp(mode, "direct")) {
        *a = (struct papi){ cuMemPoolCreate, cuMemPoolDestroy, cuMemAllocFromPoolAsync, cuMemFreeAsync, cuMemAlloc_v2,
                            cuMemFree_v2, cuMemGetInfo_v2 };
        return;
    }
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) die(dlerror());
    if (!strcmp(mode, "dlsym")) {
        S(create, "cuMemPoolCreate"); S(destroy, "cuMemPoolDestroy"); S(alloc_pool, "cuMemAllocFromPoolAsync");
        S(free_async, "cuMemFreeAsync"); S(alloc, "cuMemAlloc_v2"); S(free_, "cuMemFree_v2"); S(info, "cuMemGetInfo_v2");
        return;
    }
    unsigned long long flags = 0;
    CUresult (*gpa)(const char *, void **, int, unsigned long long, int *) =
        need(dlsym(lib, "cuGetProcAddress_v2"), "cuGetProcAddress_v2");
    G(create, "cuMemPoolCreate"); G(destroy, "cuMemPoolDestroy"); G(alloc_pool, "cuMemAllocFromPoolAsync");
    G(free_async, "cuMemFreeAsync"); G(alloc, "cuMemAlloc"); G(free_, "cuMemFree"); G(info, "cuMemGetInfo");
}

static size_t p_used(struct papi *a) { size_t f = 0, t = 0; return a->info(&f, &t) ? (size_t)-1 : t - f; }

static POOL_PROPS pool_props(int location_type, int id) {
    POOL_PROPS p;
    memset(&p, 0, sizeof p);
    p.allocType = 1; /* pinned */
    p.location.type = location_type;
    p.location.id = id;
    return p;
}

static int pools(const char *mode, size_t limit) {
    struct papi a;
    make_ctx();
    load_pools_api(&a, mode);
    const size_t big = limit / 4 * 3, half = limit / 2;
    const size_t base = p_used(&a);
    H pool = NULL, dflt = NULL;
    CUdeviceptr p = 0, q = 0;

    /* Host pools: host memory, whatever its size, never charged. */
    for (int type = 2; type <= 4; type++) {
        POOL_PROPS props = pool_props(type, 0);
        char what[160];
        snprintf(what, sizeof what, "a pool on the host (location type %d) is created", type);
        check(a.create(&pool, &props) == 0, what);
        snprintf(what, sizeof what, "twice the limit from the host pool (location type %d) is not device memory", type);
        check(a.alloc_pool(&p, 2 * limit, pool, NULL) == 0, what);
        check(p_used(&a) == base, "the host pool's memory is not charged");
        check(a.free_async(p, NULL) == 0 && a.destroy(pool) == 0, "host pool memory freed and the pool destroyed");
    }

    /* A device pool retains what is freed into it; destroying the pool gives that back. */
    POOL_PROPS dev = pool_props(1, probe_device());
    check(a.create(&pool, &dev) == 0, "a pool on the device is created");
    check(a.alloc_pool(&p, big, pool, NULL) == 0 && a.free_async(p, NULL) == 0, "3/4 of the limit allocated from it and freed");
    check(a.alloc(&q, half) == 2, "what the pool retains still counts: half the limit beside it is refused");
    check(a.destroy(pool) == 0, "the pool is destroyed");
    check(p_used(&a) == base, "its retained memory is no longer charged");
    check(a.alloc(&q, big) == 0 && a.free_(q) == 0, "3/4 of the limit fits once the pool is destroyed");

    /* Destroyed with an allocation outstanding: the memory goes back when that is freed. */
    check(a.create(&pool, &dev) == 0, "a pool on the device is created again (the driver may reuse the handle)");
    check(a.alloc_pool(&p, big, pool, NULL) == 0, "3/4 of the limit allocated from it");
    check(a.alloc_pool(&q, half, pool, NULL) == 2, "the new pool is held to the limit");
    check(a.destroy(pool) == 0, "the pool is destroyed with the allocation outstanding");
    check(p_used(&a) == base + big, "the outstanding allocation still counts");
    check(a.alloc(&q, half) == 2, "half the limit beside it is refused");
    check(a.free_async(p, NULL) == 0, "the outstanding allocation is freed");
    check(p_used(&a) == base, "nothing of the destroyed pool is charged any more");
    check(a.alloc(&q, big) == 0 && a.free_(q) == 0, "3/4 of the limit fits again");

    /* A device's default pool cannot be destroyed, and stays counted. */
    if (cuDeviceGetMemPool(&dflt, probe_device())) die("default pool");
    check(a.destroy(dflt) != 0, "the default pool cannot be destroyed");
    check(a.alloc_pool(&p, big, dflt, NULL) == 0, "3/4 of the limit from the default pool");
    check(a.alloc(&q, half) == 2, "the default pool's memory counts");
    check(a.free_async(p, NULL) == 0, "freed into the default pool");
    return finish();
}
