/*
 * Test program for the guard: reaches the driver the three ways real programs do
 * (direct linking, dlopen+dlsym, cuGetProcAddress as the CUDA runtime does) and runs one
 * scenario. Checks print "ok: ..." or "FAIL: ..."; the last line is "N passed, M failed" and the
 * exit status is non-zero when a check failed.
 *
 *   probe entrypoints <direct|dlsym|gpa|gpa_ptsz> <limited|unlimited> <limit-bytes>
 *   probe contexts <estimate-bytes> <ctx-bytes> <module-bytes>
 *   probe race <threads> <iterations> <max-bytes>
 *   probe hold <bytes>          (allocates, prints "ready", waits for stdin to close)
 *   probe alloc <bytes>         (allocates once, prints the result code)
 *   probe fork <bytes> <limit>  (parent and child each hold <bytes>; see tests)
 *   probe streamdev <limit0> <limit1> <context-charge>  (cuMemAllocAsync on a stream of device 1
 *                               while device 0's context is current: charged to device 1)
 *   probe gpafuture             (cuGetProcAddress of cuMemAlloc for a CUDA version to come, twice)
 *   probe forkinit <delay-ms>   (a thread makes the first CUDA call; after <delay-ms> the main
 *                               thread forks and the child allocates: see tests)
 *   probe prefork <workers> <chunk> <want>  (parent makes a context, forks workers that each
 *                               allocate <chunk>s up to <want> bytes or a refusal, print
 *                               "worker pid=P held=B rc=R", then wait for stdin to close)
 *   probe bench <iterations> <bytes> [async]   (ns per alloc/free pair; async: cuMemAllocAsync +
 *                               cuMemFreeAsync on a stream, which the guard first asks whether it
 *                               is capturing)
 *   probe nvml <limited|unlimited> <limit-bytes>
 *   probe rtldnext              (dlsym(RTLD_NEXT) from a library keeps its meaning)
 *   probe allocon <step>...     (steps in order, each printing its result code: "<dev>:<bytes>"
 *                               allocates in a context on dev, "create:<dev>:<bytes>" makes
 *                               physical memory on dev, "primary:<dev>" retains dev's primary context)
 *   probe holdon <step>...      (as allocon, then prints "ready" and waits for stdin to close)
 *   probe multi <limit0> <limit1> <context-charge>  (two devices, each held to its own limit)
 *   probe nvmlon <dev> <limit>  (NVML memory information of one device, by its handle)
 *   probe graphs <direct|dlsym|gpa|gpa_ptsz> <limit-bytes>  (CUDA graph memory nodes: captured
 *                               and explicit, launched, uploaded, trimmed, held to the limit)
 *   probe legacy <direct|dlsym|gpa> <limit-bytes>  (the v1 ABI, 32-bit pointers: probe_legacy.inc.c)
 *   probe vmm <direct|dlsym|gpa|gpa_ptsz> <limit-bytes>  (cuMemCreate memory charged while a
 *                               handle reference or a mapping keeps it: probe_vmm.inc.c)
 *   probe pools <direct|dlsym|gpa> <limit-bytes>  (pools the program creates: on the host, never
 *                               charged; destroyed, given back: probe_pools.inc.c)
 *
 * PROBE_DEVICE (default 0) is the device the entrypoints and contexts scenarios use.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef void *H;
typedef struct { size_t Width, Height; int Format; unsigned NumChannels; } ARRAY_DESC;
typedef struct { size_t Width, Height, Depth; int Format; unsigned NumChannels, Flags; } ARRAY3D_DESC;
typedef struct { int type; int handleTypes; struct { int type; int id; } location; void *win32; unsigned char flags[8]; } MEM_PROP;

CUresult cuInit(unsigned);
CUresult cuDeviceGet(int *, int);
CUresult cuDeviceGetCount(int *);
typedef struct { unsigned char bytes[16]; } CUuuid;
CUresult cuDeviceGetUuid(CUuuid *, int);
CUresult cuCtxCreate_v2(H *, unsigned, int);
CUresult cuCtxDestroy_v2(H);
CUresult cuCtxSetCurrent(H);
CUresult cuDevicePrimaryCtxRetain(H *, int);
CUresult cuDevicePrimaryCtxRelease_v2(int);
CUresult cuMemGetInfo_v2(size_t *, size_t *);
CUresult cuDeviceTotalMem_v2(size_t *, int);
CUresult cuMemAlloc_v2(CUdeviceptr *, size_t);
CUresult cuMemAllocPitch_v2(CUdeviceptr *, size_t *, size_t, size_t, unsigned);
CUresult cuMemAllocManaged(CUdeviceptr *, size_t, unsigned);
CUresult cuMemFree_v2(CUdeviceptr);
CUresult cuMemAllocAsync(CUdeviceptr *, size_t, H);
CUresult cuMemAllocFromPoolAsync(CUdeviceptr *, size_t, H, H);
CUresult cuMemFreeAsync(CUdeviceptr, H);
CUresult cuMemPoolTrimTo(H, size_t);
CUresult cuDeviceGetMemPool(H *, int);
CUresult cuMemCreate(unsigned long long *, size_t, const MEM_PROP *, unsigned long long);
CUresult cuMemRelease(unsigned long long);
CUresult cuArrayCreate_v2(H *, const ARRAY_DESC *);
CUresult cuArray3DCreate_v2(H *, const ARRAY3D_DESC *);
CUresult cuMipmappedArrayCreate(H *, const ARRAY3D_DESC *, unsigned);
CUresult cuArrayDestroy(H);
CUresult cuMipmappedArrayDestroy(H);
CUresult cuModuleLoadData(H *, const void *);
CUresult cuModuleUnload(H);
CUresult cuLibraryLoadData(H *, const void *, void *, void **, unsigned, void *, void **, unsigned);
CUresult cuLibraryUnload(H);
CUresult cuGetProcAddress_v2(const char *, void **, int, unsigned long long, int *);
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
int nvmlDeviceGetMemoryInfo(void *, nvmlMemory_t *);
int nvmlDeviceGetMemoryInfo_v2(void *, nvmlMemory_v2_t *);
int nvmlDeviceGetHandleByIndex_v2(unsigned, void **);
int next_marker(void);
CUresult cuStreamCreate(H *, unsigned);
CUresult cuStreamBeginCapture_v2(H, int);
CUresult cuStreamEndCapture(H, H *);
CUresult cuStreamSynchronize(H);
CUresult cuGraphCreate(H *, unsigned);
CUresult cuGraphAddMemAllocNode(H *, H, H *, size_t, void *);
CUresult cuGraphAddMemFreeNode(H *, H, H *, size_t, CUdeviceptr);
CUresult cuGraphAddChildGraphNode(H *, H, H *, size_t, H);
CUresult cuGraphInstantiateWithFlags(H *, H, unsigned long long);
CUresult cuGraphInstantiateWithParams(H *, H, void *);
CUresult cuGraphLaunch(H, H);
CUresult cuGraphUpload(H, H);
CUresult cuGraphExecDestroy(H);
CUresult cuGraphDestroy(H);
CUresult cuDeviceGraphMemTrim(int);
CUresult cuDeviceGetGraphMemAttribute(int, int, void *);

struct api {
    CUresult (*alloc)(CUdeviceptr *, size_t);
    CUresult (*pitch)(CUdeviceptr *, size_t *, size_t, size_t, unsigned);
    CUresult (*managed)(CUdeviceptr *, size_t, unsigned);
    CUresult (*free_)(CUdeviceptr);
    CUresult (*alloc_async)(CUdeviceptr *, size_t, H);
    CUresult (*alloc_pool)(CUdeviceptr *, size_t, H, H);
    CUresult (*free_async)(CUdeviceptr, H);
    CUresult (*trim)(H, size_t);
    CUresult (*create)(unsigned long long *, size_t, const MEM_PROP *, unsigned long long);
    CUresult (*release)(unsigned long long);
    CUresult (*array)(H *, const ARRAY_DESC *);
    CUresult (*array3d)(H *, const ARRAY3D_DESC *);
    CUresult (*mipmap)(H *, const ARRAY3D_DESC *, unsigned);
    CUresult (*array_destroy)(H);
    CUresult (*mipmap_destroy)(H);
    CUresult (*info)(size_t *, size_t *);
    CUresult (*total)(size_t *, int);
};

static int passed, failed;
static void check(int cond, const char *what) {
    if (cond) { passed++; printf("ok: %s\n", what); }
    else { failed++; printf("FAIL: %s\n", what); }
    fflush(stdout);
}
static int finish(void) {
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
static void die(const char *msg) { fprintf(stderr, "probe: %s\n", msg); exit(2); }

static void *need(void *p, const char *name) {
    if (!p) { fprintf(stderr, "probe: cannot resolve %s\n", name); exit(2); }
    return p;
}

static void load_api(struct api *a, const char *mode) {
    if (!strcmp(mode, "direct")) {
        *a = (struct api){ cuMemAlloc_v2, cuMemAllocPitch_v2, cuMemAllocManaged, cuMemFree_v2, cuMemAllocAsync,
            cuMemAllocFromPoolAsync, cuMemFreeAsync, cuMemPoolTrimTo, cuMemCreate, cuMemRelease, cuArrayCreate_v2,
            cuArray3DCreate_v2, cuMipmappedArrayCreate, cuArrayDestroy, cuMipmappedArrayDestroy, cuMemGetInfo_v2,
            cuDeviceTotalMem_v2 };
        return;
    }
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) die(dlerror());
    if (!strcmp(mode, "dlsym")) {
#define S(field, name) *(void **)&a->field = need(dlsym(lib, name), name)
        S(alloc, "cuMemAlloc_v2"); S(pitch, "cuMemAllocPitch_v2"); S(managed, "cuMemAllocManaged");
        S(free_, "cuMemFree_v2"); S(alloc_async, "cuMemAllocAsync"); S(alloc_pool, "cuMemAllocFromPoolAsync");
        S(free_async, "cuMemFreeAsync"); S(trim, "cuMemPoolTrimTo"); S(create, "cuMemCreate");
        S(release, "cuMemRelease"); S(array, "cuArrayCreate_v2"); S(array3d, "cuArray3DCreate_v2");
        S(mipmap, "cuMipmappedArrayCreate"); S(array_destroy, "cuArrayDestroy");
        S(mipmap_destroy, "cuMipmappedArrayDestroy"); S(info, "cuMemGetInfo_v2"); S(total, "cuDeviceTotalMem_v2");
        return;
    }
    unsigned long long flags = !strcmp(mode, "gpa_ptsz") ? 2 : 0;
    CUresult (*gpa)(const char *, void **, int, unsigned long long, int *) =
        need(dlsym(lib, "cuGetProcAddress_v2"), "cuGetProcAddress_v2");
    /* Like the CUDA runtime: fetch cuGetProcAddress itself through cuGetProcAddress. */
    void *self = NULL;
    if (gpa("cuGetProcAddress", &self, 12040, 0, NULL) || !self) die("cuGetProcAddress(cuGetProcAddress)");
    gpa = self;
#define G(field, name) do { void *p_ = NULL; int st_ = -1; \
        if (gpa(name, &p_, 12040, flags, &st_) || !p_ || st_ != 0) die("cuGetProcAddress " name); \
        *(void **)&a->field = p_; } while (0)
    G(alloc, "cuMemAlloc"); G(pitch, "cuMemAllocPitch"); G(managed, "cuMemAllocManaged"); G(free_, "cuMemFree");
    G(alloc_async, "cuMemAllocAsync"); G(alloc_pool, "cuMemAllocFromPoolAsync"); G(free_async, "cuMemFreeAsync");
    G(trim, "cuMemPoolTrimTo"); G(create, "cuMemCreate"); G(release, "cuMemRelease"); G(array, "cuArrayCreate");
    G(array3d, "cuArray3DCreate"); G(mipmap, "cuMipmappedArrayCreate"); G(array_destroy, "cuArrayDestroy");
    G(mipmap_destroy, "cuMipmappedArrayDestroy"); G(info, "cuMemGetInfo"); G(total, "cuDeviceTotalMem");
}

/* The device the entrypoints and contexts scenarios use. */
static int probe_device(void) {
    const char *v = getenv("PROBE_DEVICE");
    return v && *v ? atoi(v) : 0;
}

static H make_ctx(void) {
    int dev;
    H ctx;
    if (cuInit(0) || cuDeviceGet(&dev, probe_device()) || cuCtxCreate_v2(&ctx, 0, dev)) die("context");
    return ctx;
}

#define MIB (1024ULL * 1024ULL)
#define CHUNK (60 * MIB)

/* One allocate/refuse/free/allocate/free cycle through a pair of functions. */
typedef CUresult (*alloc_fn)(struct api *, void **, size_t);
typedef CUresult (*free_fn)(struct api *, void *);
static CUresult a_alloc(struct api *a, void **h, size_t n) { return a->alloc((CUdeviceptr *)h, n); }
static CUresult a_managed(struct api *a, void **h, size_t n) { return a->managed((CUdeviceptr *)h, n, 1); }
static CUresult a_pitch(struct api *a, void **h, size_t n) { size_t p; return a->pitch((CUdeviceptr *)h, &p, 4000, n / 4096, 4); }
static CUresult f_free(struct api *a, void *h) { return a->free_((CUdeviceptr)h); }
static CUresult a_async(struct api *a, void **h, size_t n) { return a->alloc_async((CUdeviceptr *)h, n, NULL); }
static H pool;
static CUresult a_pool(struct api *a, void **h, size_t n) { return a->alloc_pool((CUdeviceptr *)h, n, pool, NULL); }
static CUresult f_async(struct api *a, void *h) { return a->free_async((CUdeviceptr)h, NULL); }
static CUresult a_create(struct api *a, void **h, size_t n) {
    MEM_PROP p = { 1, 0, { 1, probe_device() }, NULL, { 0 } };
    return a->create((unsigned long long *)h, n, &p, 0);
}
static CUresult f_release(struct api *a, void *h) { return a->release((unsigned long long)h); }
static CUresult a_array(struct api *a, void **h, size_t n) { ARRAY_DESC d = { 4096, n / 4096 / 4, 0x20, 1 }; return a->array(h, &d); }
static CUresult a_array3d(struct api *a, void **h, size_t n) { ARRAY3D_DESC d = { 4096, n / 4096 / 4 / 4, 4, 0x20, 1, 0 }; return a->array3d(h, &d); }
static CUresult f_array(struct api *a, void *h) { return a->array_destroy(h); }
static CUresult a_mipmap(struct api *a, void **h, size_t n) { ARRAY3D_DESC d = { 4096, n / 4096 / 4, 0, 0x20, 1, 0 }; return a->mipmap(h, &d, 1); }
static CUresult f_mipmap(struct api *a, void *h) { return a->mipmap_destroy(h); }

static size_t used_now(struct api *a) {
    size_t f = 0, t = 0;
    if (a->info(&f, &t)) return (size_t)-1;
    return t - f;
}

static void cycle(struct api *a, const char *name, alloc_fn al, free_fn fr, int limited) {
    char what[160];
    void *h1 = NULL, *h2 = NULL, *h3 = NULL;
    size_t base = used_now(a);
    snprintf(what, sizeof what, "%s: first allocation within the limit succeeds", name);
    check(al(a, &h1, CHUNK) == 0 && h1, what);
    CUresult second = al(a, &h2, CHUNK);
    if (limited) {
        snprintf(what, sizeof what, "%s: allocation past the limit gets CUDA_ERROR_OUT_OF_MEMORY (got %d)", name, second);
        check(second == 2, what);
        snprintf(what, sizeof what, "%s: cuMemGetInfo shows the allocation as used", name);
        check(used_now(a) >= base + CHUNK - 8 * MIB, what);
    } else {
        snprintf(what, sizeof what, "%s: without a limit the second allocation passes (got %d)", name, second);
        check(second == 0, what);
        if (second == 0) fr(a, h2);
    }
    snprintf(what, sizeof what, "%s: free succeeds", name);
    check(fr(a, h1) == 0, what);
    snprintf(what, sizeof what, "%s: freed memory can be allocated again", name);
    check(al(a, &h3, CHUNK) == 0, what);
    fr(a, h3);
}

/* `held`: what the guard charges for the probe's own context (its estimate: none is current
 * when the probe makes it), beside the allocations. */
static int entrypoints(const char *mode, int limited, size_t limit, size_t held) {
    struct api a;
    H ctx = make_ctx();
    load_api(&a, mode);
    if (cuDeviceGetMemPool(&pool, probe_device())) die("pool");
    cycle(&a, "cuMemAlloc_v2", a_alloc, f_free, limited);
    cycle(&a, "cuMemAllocPitch_v2", a_pitch, f_free, limited);
    cycle(&a, "cuMemAllocManaged", a_managed, f_free, limited);
    cycle(&a, "cuMemAllocAsync", a_async, f_async, limited);
    cycle(&a, "cuMemAllocFromPoolAsync", a_pool, f_async, limited);
    cycle(&a, "cuMemCreate", a_create, f_release, limited);
    cycle(&a, "cuArrayCreate_v2", a_array, f_array, limited);
    cycle(&a, "cuArray3DCreate_v2", a_array3d, f_array, limited);
    cycle(&a, "cuMipmappedArrayCreate", a_mipmap, f_mipmap, limited);
    /* memory held in a pool after async frees is given back by a trim */
    CUdeviceptr p;
    check(a.alloc_async(&p, CHUNK, NULL) == 0 && a.free_async(p, NULL) == 0, "async alloc+free for the trim check");
    check(a.trim(pool, 0) == 0, "cuMemPoolTrimTo succeeds");
    size_t f = 0, t = 0;
    check(a.info(&f, &t) == 0, "cuMemGetInfo succeeds");
    size_t tot = 0;
    check(a.total(&tot, probe_device()) == 0, "cuDeviceTotalMem succeeds");
    if (limited) {
        check(t == limit, "cuMemGetInfo total is the limit");
        check(tot == limit, "cuDeviceTotalMem is the limit");
        check(f <= limit - held && f >= limit - held - 8 * MIB, "cuMemGetInfo free is the limit minus what is held (pool trimmed)");
    } else {
        check(t > limit, "cuMemGetInfo total is the device size");
    }
    /* host-located cuMemCreate is never counted */
    unsigned long long hh;
    MEM_PROP hp = { 1, 0, { 2, 0 }, NULL, { 0 } };
    check(a.create(&hh, 4 * limit, &hp, 0) == 0 && a.release(hh) == 0, "host-located cuMemCreate is not counted");
    cuCtxDestroy_v2(ctx);
    return finish();
}

static int contexts(size_t estimate, size_t ctx_bytes, size_t module_bytes) {
    int dev;
    H c1, c2, m, l, l0;
    size_t f, t, u0, u1, u2, u3, u4;
    if (cuInit(0) || cuDeviceGet(&dev, probe_device())) die("init");
    check(cuLibraryLoadData(&l0, "x", NULL, NULL, 0, NULL, NULL, 0) == 0,
          "a library loads with no context current (context-independent since CUDA 12)");
    check(cuCtxCreate_v2(&c1, 0, dev) == 0, "first context (none current: charged the estimate)");
    cuMemGetInfo_v2(&f, &t); u0 = t - f;
    check(u0 == estimate, "first context charged VRAMSLICE_CONTEXT_ESTIMATE_BYTES");
    check(cuCtxCreate_v2(&c2, 0, dev) == 0, "second context created");
    cuMemGetInfo_v2(&f, &t); u1 = t - f;
    check(u1 == estimate + ctx_bytes, "second context charged what it measurably took");
    check(cuModuleLoadData(&m, "x") == 0, "module loaded");
    cuMemGetInfo_v2(&f, &t); u2 = t - f;
    check(u2 == u1 + module_bytes, "module charged what it measurably took");
    check(cuLibraryLoadData(&l, "x", NULL, NULL, 0, NULL, NULL, 0) == 0, "library loaded");
    cuMemGetInfo_v2(&f, &t); u3 = t - f;
    check(u3 == u2 + module_bytes, "library charged what it measurably took");
    check(cuLibraryUnload(l) == 0 && cuModuleUnload(m) == 0, "unloaded");
    cuMemGetInfo_v2(&f, &t);
    check(t - f == u1, "unloading returns the module and library charges");
    check(cuCtxDestroy_v2(c2) == 0, "second context destroyed");
    cuCtxSetCurrent(c1);
    cuMemGetInfo_v2(&f, &t); u4 = t - f;
    check(u4 == estimate, "destroying a context returns its charge");
    H p1, p2;
    check(cuDevicePrimaryCtxRetain(&p1, dev) == 0 && cuDevicePrimaryCtxRetain(&p2, dev) == 0, "primary context retained twice");
    cuMemGetInfo_v2(&f, &t);
    check(t - f == u4 + ctx_bytes, "primary context charged once");
    check(cuDevicePrimaryCtxRelease_v2(dev) == 0 && cuDevicePrimaryCtxRelease_v2(dev) == 0, "primary context released twice");
    cuMemGetInfo_v2(&f, &t);
    check(t - f == u4, "last primary release returns the charge");
    check(cuLibraryUnload(l0) == 0, "the library loaded with no context unloads");
    return finish();
}

struct race_arg { int iters; size_t max; unsigned seed; long ok, oom, other; };
static void *race_thread(void *p) {
    struct race_arg *r = p;
    for (int i = 0; i < r->iters; i++) {
        size_t n = (size_t)(rand_r(&r->seed) % r->max) + 1;
        CUdeviceptr d;
        CUresult rc;
        int path = i % 3;
        if (path == 0) rc = cuMemAlloc_v2(&d, n);
        else if (path == 1) rc = cuMemAllocManaged(&d, n, 1);
        else rc = cuMemAllocAsync(&d, n, NULL);
        if (rc == 0) {
            r->ok++;
            if (i % 7 == 0) sched_yield();
            if (path == 2) cuMemFreeAsync(d, NULL); else cuMemFree_v2(d);
        } else if (rc == 2) r->oom++;
        else r->other++;
    }
    return NULL;
}
static int race(int threads, int iters, size_t max) {
    pthread_t th[64];
    struct race_arg args[64];
    if (threads > 64) threads = 64;
    cuInit(0);
    for (int i = 0; i < threads; i++) {
        args[i] = (struct race_arg){ iters, max, (unsigned)(getpid() * 131 + i), 0, 0, 0 };
        pthread_create(&th[i], NULL, race_thread, &args[i]);
    }
    long ok = 0, oom = 0, other = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        ok += args[i].ok; oom += args[i].oom; other += args[i].other;
    }
    printf("race ok=%ld oom=%ld other=%ld\n", ok, oom, other);
    check(other == 0, "no error other than out-of-memory");
    return finish();
}

static int hold(size_t n) {
    CUdeviceptr d;
    CUresult rc = cuMemAlloc_v2(&d, n);
    printf("hold rc=%d pid=%d\nready\n", rc, (int)getpid());
    fflush(stdout);
    char buf[16];
    while (read(0, buf, sizeof buf) > 0) {}
    return rc;
}

static int fork_test(size_t n, size_t limit) {
    CUdeviceptr d;
    check(cuMemAlloc_v2(&d, n) == 0, "parent allocation");
    fflush(stdout);
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        CUdeviceptr c;
        check(cuMemAlloc_v2(&c, n) == 0, "child allocation");
        check(cuMemAlloc_v2(&c, limit - 2 * n + 1) == 2, "child is refused past the shared container total");
        printf("child ready pid=%d\n", (int)getpid());
        fflush(stdout);
        char buf[16];
        while (read(0, buf, sizeof buf) > 0) {}
        exit(finish());
    }
    int status = 0;
    waitpid(child, &status, 0);
    check(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child passed its checks");
    CUdeviceptr e;
    check(cuMemAlloc_v2(&e, limit - n) == 0, "after the child exits its memory is reclaimed");
    return finish();
}

/* cuGetProcAddress of an entry point of a CUDA version to come (the fake driver hands out one
 * the guard cannot know for cuMemAlloc at version 99000), twice: the guard says so, once. */
static int gpafuture(void) {
    void *known = NULL, *future = NULL, *again = NULL;
    check(cuGetProcAddress_v2("cuMemAlloc", &known, 12040, 0, NULL) == 0 && known, "cuMemAlloc of CUDA 12.4 resolves");
    check(cuGetProcAddress_v2("cuMemAlloc", &future, 99000, 0, NULL) == 0 && future, "cuMemAlloc of a CUDA to come resolves");
    check(cuGetProcAddress_v2("cuMemAlloc", &again, 99000, 0, NULL) == 0 && again == future, "and again, the same");
    check(future != known, "to another entry point than CUDA 12.4's");
    return finish();
}

/* The first CUDA call of the process, on its own thread (the test holds the accounting file's
 * lock meanwhile, so this call sits in the guard's set-up). */
static void *first_call(void *arg) {
    (void)arg;
    CUdeviceptr d;
    int rc = cuMemAlloc_v2(&d, MIB);
    printf("thread alloc rc=%d\n", rc);
    fflush(stdout);
    return NULL;
}

/* Fork while another thread is in the guard's set-up: the child's own CUDA calls must not wait
 * forever on a set-up its copy of the process has no thread to finish. */
static int forkinit(unsigned delay_ms) {
    pthread_t t;
    if (pthread_create(&t, NULL, first_call, NULL)) die("thread");
    usleep(delay_ms * 1000);
    fflush(stdout);
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        alarm(10); /* a hung child is killed, and the check below fails */
        CUdeviceptr c;
        int rc = cuMemAlloc_v2(&c, MIB);
        printf("child alloc rc=%d\n", rc);
        fflush(stdout);
        _exit(rc == 0 ? 0 : 3);
    }
    int status = 0;
    waitpid(child, &status, 0);
    pthread_join(t, NULL);
    check(WIFEXITED(status) && WEXITSTATUS(status) == 0, "a child forked during the guard's set-up allocates");
    return finish();
}

static int prefork(int workers, size_t chunk, size_t want) {
    (void)make_ctx();
    int fds[2];
    if (pipe(fds)) die("pipe");
    fflush(stdout);
    for (int w = 0; w < workers; w++) {
        pid_t p = fork();
        if (p < 0) die("fork");
        if (p == 0) {
            close(fds[0]);
            size_t held = 0;
            CUdeviceptr d;
            int rc = 0;
            while (held < want && (rc = cuMemAlloc_v2(&d, chunk)) == 0) held += chunk;
            printf("worker pid=%d held=%zu rc=%d\n", (int)getpid(), held, rc);
            fflush(stdout);
            char b = 'r';
            if (write(fds[1], &b, 1) != 1) _exit(3);
            char buf[16];
            while (read(0, buf, sizeof buf) > 0) {}
            _exit(rc == 0 || rc == 2 ? 0 : 4);
        }
    }
    close(fds[1]);
    for (int w = 0; w < workers; w++) {
        char b;
        if (read(fds[0], &b, 1) != 1) die("a worker died before it was ready");
    }
    printf("all ready\n");
    fflush(stdout);
    int failed = 0;
    for (int w = 0; w < workers; w++) {
        int st = 0;
        if (wait(&st) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) failed++;
    }
    check(failed == 0, "every worker got memory or OUT_OF_MEMORY, never another error");
    return finish();
}

static int bench(long iters, size_t n, int async) {
    CUdeviceptr d;
    H stream = NULL;
    struct timespec a, b;
    if (async) {
        H ctx = make_ctx(); /* stream-ordered allocation needs a current context */
        (void)ctx;
        if (cuStreamCreate(&stream, 0)) die("cuStreamCreate");
    }
#define PAIR() (async ? (cuMemAllocAsync(&d, n, stream) || cuMemFreeAsync(d, stream)) : (cuMemAlloc_v2(&d, n) || cuMemFree_v2(d)))
    for (long i = 0; i < iters / 10; i++) if (PAIR()) die("pair in bench warm-up");
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < iters; i++)
        if (PAIR()) die("pair in bench");
    clock_gettime(CLOCK_MONOTONIC, &b);
#undef PAIR
    double ns = (double)(b.tv_sec - a.tv_sec) * 1e9 + (double)(b.tv_nsec - a.tv_nsec);
    printf("%.2f\n", ns / (double)iters);
    return 0;
}

static int nvml(int limited, size_t limit) {
    CUdeviceptr d;
    check(cuMemAlloc_v2(&d, 10 * MIB) == 0, "hold 10 MiB");
    nvmlMemory_t m;
    nvmlMemory_v2_t m2 = { 2, 0, 0, 0, 0 };
    check(nvmlDeviceGetMemoryInfo(NULL, &m) == 0, "nvmlDeviceGetMemoryInfo succeeds");
    check(nvmlDeviceGetMemoryInfo_v2(NULL, &m2) == 0, "nvmlDeviceGetMemoryInfo_v2 succeeds");
    if (limited) {
        check(m.total == limit && m.used == 10 * MIB && m.free == limit - 10 * MIB, "NVML v1 shows the slice");
        check(m2.total == limit && m2.used == 10 * MIB && m2.free == limit - 10 * MIB, "NVML v2 shows the slice");
    } else {
        check(m.total > limit && m2.total > limit, "NVML shows the whole device");
    }
    return finish();
}

static int rtldnext(void) {
    check(next_marker() == 2, "dlsym(RTLD_NEXT) from a library finds the next library's symbol");
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    check(lib && dlsym(lib, "no_such_symbol") == NULL && dlerror() != NULL, "missing symbols still fail with dlerror");
    check(dlsym(RTLD_DEFAULT, "cuMemAlloc_v2") == (void *)cuMemAlloc_v2, "RTLD_DEFAULT lookups agree with linking");
    return finish();
}

/* A context on `dev`, made once and then made current; the creation's result. */
static CUresult use_device(int dev) {
    static H ctxs[8];
    if (dev < 0 || dev >= 8) die("device out of range");
    if (!ctxs[dev]) {
        CUresult rc = cuInit(0);
        if (rc == 0) rc = cuCtxCreate_v2(&ctxs[dev], 0, dev);
        if (rc) return rc;
    }
    cuCtxSetCurrent(ctxs[dev]);
    return 0;
}

/* Steps, in order: "<dev>:<bytes>" allocates with cuMemAlloc in a context on dev;
 * "create:<dev>:<bytes>" makes physical memory on dev with cuMemCreate from the current context;
 * "primary:<dev>" retains dev's primary context. Each prints its result code. */
static void alloc_on(int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        CUresult rc;
        if (!strncmp(arg, "primary:", 8)) {
            int dev = atoi(arg + 8);
            H ctx;
            cuInit(0);
            rc = cuDevicePrimaryCtxRetain(&ctx, dev);
            printf("primary dev=%d rc=%d\n", dev, rc);
        } else if (!strncmp(arg, "create:", 7)) {
            int dev = atoi(arg + 7);
            const char *colon = strchr(arg + 7, ':');
            if (!colon) die("expected create:<dev>:<bytes>");
            MEM_PROP p = { 1, 0, { 1, dev }, NULL, { 0 } };
            unsigned long long h;
            rc = cuMemCreate(&h, strtoull(colon + 1, 0, 10), &p, 0);
            printf("create dev=%d rc=%d\n", dev, rc);
        } else {
            int dev = atoi(arg);
            const char *colon = strchr(arg, ':');
            if (!colon) die("expected <dev>:<bytes>");
            if ((rc = use_device(dev)) != 0) {
                printf("context dev=%d rc=%d\n", dev, rc);
            } else {
                CUdeviceptr d;
                rc = cuMemAlloc_v2(&d, strtoull(colon + 1, 0, 10));
                printf("alloc dev=%d rc=%d\n", dev, rc);
            }
        }
        fflush(stdout);
    }
}

static size_t used_on(H ctx, size_t *total) {
    size_t f = 0, t = 0;
    cuCtxSetCurrent(ctx);
    if (cuMemGetInfo_v2(&f, &t)) die("cuMemGetInfo");
    if (total) *total = t;
    return t - f;
}

/* cuMemAllocAsync draws from the pool of the stream's device: a stream made on device 1, used
 * while device 0's context is current, fills device 1's slice and leaves device 0's alone. */
static int streamdev(size_t l0, size_t l1, size_t est) {
    const size_t chunk = 32 * MIB;
    H c0, c1, s1;
    CUdeviceptr p;
    char what[200];
    check(cuInit(0) == 0 && cuCtxCreate_v2(&c0, 0, 0) == 0 && cuCtxCreate_v2(&c1, 0, 1) == 0, "a context on each device");
    cuCtxSetCurrent(c1);
    check(cuStreamCreate(&s1, 0) == 0, "a stream on device 1");
    cuCtxSetCurrent(c0);
    int k = 0;
    CUresult rc = 0;
    while (k < 256 && (rc = cuMemAllocAsync(&p, chunk, s1)) == 0) k++;
    snprintf(what, sizeof what, "allocations on device 1's stream fill device 1's slice (%d chunks, rc=%d)", k, rc);
    check(rc == 2 && est + k * chunk <= l1 && est + (k + 1) * chunk > l1, what);
    size_t t = 0;
    check(used_on(c0, &t) == est && t == l0, "device 0 (current while they were made) is untouched");
    check(used_on(c1, &t) == est + k * chunk && t == l1, "device 1 shows them");
    return finish();
}

static int multi(size_t l0, size_t l1, size_t est) {
    const size_t chunk = 64 * MIB;
    int n = 0;
    H c0, c1;
    size_t t = 0, t0 = 0, t1 = 0;
    char what[200];
    check(cuInit(0) == 0 && cuDeviceGetCount(&n) == 0 && n >= 2, "the driver shows two devices");
    check(cuCtxCreate_v2(&c0, 0, 0) == 0, "context on device 0");
    check(cuCtxCreate_v2(&c1, 0, 1) == 0, "context on device 1 (made while device 0's is current)");
    check(used_on(c0, &t) == est && t == l0, "device 0: total is its limit, its context charged to it");
    check(used_on(c1, &t) == est && t == l1, "device 1: total is its limit, its context charged to it");
    check(cuDeviceTotalMem_v2(&t0, 0) == 0 && cuDeviceTotalMem_v2(&t1, 1) == 0 && t0 == l0 && t1 == l1,
          "cuDeviceTotalMem is each device's own limit");

    CUdeviceptr p0[256], p1[256];
    int k0 = 0, k1 = 0;
    CUresult rc = 0;
    cuCtxSetCurrent(c0);
    while (k0 < 256 && (rc = cuMemAlloc_v2(&p0[k0], chunk)) == 0) k0++;
    snprintf(what, sizeof what, "device 0 fills to CUDA_ERROR_OUT_OF_MEMORY at its limit (%d chunks, rc=%d)", k0, rc);
    check(rc == 2 && est + k0 * chunk <= l0 && est + (k0 + 1) * chunk > l0, what);
    check(used_on(c0, &t) == est + k0 * chunk && t == l0, "cuMemGetInfo on device 0 shows its slice full");
    check(used_on(c1, &t) == est && t == l1, "device 1 is untouched by device 0's allocations");
    cuCtxSetCurrent(c1);
    while (k1 < 256 && (rc = cuMemAlloc_v2(&p1[k1], chunk)) == 0) k1++;
    snprintf(what, sizeof what, "device 1 still allocates, up to its own limit (%d chunks, rc=%d)", k1, rc);
    check(rc == 2 && k1 > 0 && est + k1 * chunk <= l1 && est + (k1 + 1) * chunk > l1, what);
    check(used_on(c1, &t) == est + k1 * chunk && t == l1, "cuMemGetInfo on device 1 shows its own slice full");

    /* Memory named by device, made while the other device's context is current. */
    MEM_PROP on0 = { 1, 0, { 1, 0 }, NULL, { 0 } }, on1 = { 1, 0, { 1, 1 }, NULL, { 0 } };
    unsigned long long h0 = 0, h1 = 0;
    cuCtxSetCurrent(c1);
    check(cuMemCreate(&h0, chunk, &on0, 0) == 2, "cuMemCreate on full device 0 is refused (device 1 current)");
    check(cuMemFree_v2(p0[--k0]) == 0, "a chunk freed on device 0");
    check(cuMemCreate(&h0, chunk, &on0, 0) == 0, "cuMemCreate on device 0 fits again (device 1 current)");
    cuCtxSetCurrent(c0);
    check(cuMemCreate(&h1, chunk, &on1, 0) == 2, "cuMemCreate on full device 1 is refused (device 0 current)");
    check(used_on(c0, NULL) == est + (k0 + 1) * chunk && used_on(c1, NULL) == est + k1 * chunk,
          "cuMemCreate charged the device it named");

    /* Asynchronous memory from device 1's pool, while device 0's context is current. */
    H pool1 = NULL;
    CUdeviceptr a = 0;
    check(cuDeviceGetMemPool(&pool1, 1) == 0, "device 1's pool");
    cuCtxSetCurrent(c0);
    check(cuMemAllocFromPoolAsync(&a, chunk, pool1, NULL) == 2, "device 1's pool is refused while device 1 is full");
    check(cuMemFree_v2(p1[--k1]) == 0, "a chunk freed on device 1");
    cuCtxSetCurrent(c0);
    check(cuMemAllocFromPoolAsync(&a, chunk, pool1, NULL) == 0, "device 1's pool allocates again (device 0 current)");
    check(used_on(c0, NULL) == est + (k0 + 1) * chunk && used_on(c1, NULL) == est + (k1 + 1) * chunk,
          "the pool's allocation is charged to device 1");
    cuCtxSetCurrent(c0);
    check(cuMemFreeAsync(a, NULL) == 0 && cuMemPoolTrimTo(pool1, 0) == 0, "async free and trim");
    check(used_on(c1, NULL) == est + k1 * chunk, "freed back to device 1");

    /* Everything freed: each device's whole slice again. */
    cuCtxSetCurrent(c0);
    while (k0 > 0) cuMemFree_v2(p0[--k0]);
    check(cuMemRelease(h0) == 0, "release");
    while (k1 > 0) cuMemFree_v2(p1[--k1]);
    check(used_on(c0, NULL) == est && used_on(c1, NULL) == est, "frees return each device's bytes");
    return finish();
}


/* CUDA graph memory nodes, reached the way `mode` says. */
typedef struct { int type; int handleTypes; struct { int type; int id; } location; void *win32; size_t maxSize;
                 unsigned short usage; unsigned char reserved[54]; } POOL_PROPS_FULL;
typedef struct { POOL_PROPS_FULL poolProps; const void *accessDescs; size_t accessDescCount; size_t bytesize;
                 CUdeviceptr dptr; } MEM_ALLOC_NODE_PARAMS;
typedef struct { unsigned long long flags; H hUploadStream; H hErrNode_out; int result_out; } INSTANTIATE_PARAMS;
struct gapi {
    CUresult (*begin)(H, int);
    CUresult (*end)(H, H *);
    CUresult (*alloc_async)(CUdeviceptr *, size_t, H);
    CUresult (*free_async)(CUdeviceptr, H);
    CUresult (*create)(H *, unsigned);
    CUresult (*add_alloc)(H *, H, H *, size_t, void *);
    CUresult (*add_free)(H *, H, H *, size_t, CUdeviceptr);
    CUresult (*add_child)(H *, H, H *, size_t, H);
    CUresult (*inst)(H *, H, unsigned long long);
    CUresult (*inst_params)(H *, H, void *);
    CUresult (*launch)(H, H);
    CUresult (*upload)(H, H);
    CUresult (*exec_destroy)(H);
    CUresult (*trim)(int);
    CUresult (*attr)(int, int, void *);
    CUresult (*alloc)(CUdeviceptr *, size_t);
    CUresult (*free_)(CUdeviceptr);
    CUresult (*info)(size_t *, size_t *);
    CUresult (*graph_destroy)(H);
};
static void load_graph_api(struct gapi *a, const char *mode) {
    if (!strcmp(mode, "direct")) {
        *a = (struct gapi){ cuStreamBeginCapture_v2, cuStreamEndCapture, cuMemAllocAsync, cuMemFreeAsync, cuGraphCreate,
            cuGraphAddMemAllocNode, cuGraphAddMemFreeNode, cuGraphAddChildGraphNode, cuGraphInstantiateWithFlags,
            cuGraphInstantiateWithParams, cuGraphLaunch, cuGraphUpload, cuGraphExecDestroy, cuDeviceGraphMemTrim,
            cuDeviceGetGraphMemAttribute, cuMemAlloc_v2, cuMemFree_v2, cuMemGetInfo_v2, cuGraphDestroy };
        return;
    }
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) die(dlerror());
    if (!strcmp(mode, "dlsym")) {
        S(begin, "cuStreamBeginCapture_v2"); S(end, "cuStreamEndCapture"); S(alloc_async, "cuMemAllocAsync");
        S(free_async, "cuMemFreeAsync"); S(create, "cuGraphCreate"); S(add_alloc, "cuGraphAddMemAllocNode");
        S(add_free, "cuGraphAddMemFreeNode"); S(add_child, "cuGraphAddChildGraphNode");
        S(inst, "cuGraphInstantiateWithFlags"); S(inst_params, "cuGraphInstantiateWithParams");
        S(launch, "cuGraphLaunch"); S(upload, "cuGraphUpload"); S(exec_destroy, "cuGraphExecDestroy");
        S(trim, "cuDeviceGraphMemTrim"); S(attr, "cuDeviceGetGraphMemAttribute"); S(alloc, "cuMemAlloc_v2");
        S(free_, "cuMemFree_v2"); S(info, "cuMemGetInfo_v2"); S(graph_destroy, "cuGraphDestroy");
        return;
    }
    unsigned long long flags = !strcmp(mode, "gpa_ptsz") ? 2 : 0;
    CUresult (*gpa)(const char *, void **, int, unsigned long long, int *) =
        need(dlsym(lib, "cuGetProcAddress_v2"), "cuGetProcAddress_v2");
    G(begin, "cuStreamBeginCapture"); G(end, "cuStreamEndCapture"); G(alloc_async, "cuMemAllocAsync");
    G(free_async, "cuMemFreeAsync"); G(create, "cuGraphCreate"); G(add_alloc, "cuGraphAddMemAllocNode");
    G(add_free, "cuGraphAddMemFreeNode"); G(add_child, "cuGraphAddChildGraphNode");
    G(inst, "cuGraphInstantiate"); /* CUDA 12: cuGraphInstantiateWithFlags */
    G(inst_params, "cuGraphInstantiateWithParams"); G(launch, "cuGraphLaunch"); G(upload, "cuGraphUpload");
    G(exec_destroy, "cuGraphExecDestroy"); G(trim, "cuDeviceGraphMemTrim"); G(attr, "cuDeviceGetGraphMemAttribute");
    G(alloc, "cuMemAlloc"); G(free_, "cuMemFree"); G(info, "cuMemGetInfo"); G(graph_destroy, "cuGraphDestroy");
}
static size_t g_used(struct gapi *a) { size_t f = 0, t = 0; return a->info(&f, &t) ? (size_t)-1 : t - f; }
static unsigned long long g_reserved(struct gapi *a) {
    unsigned long long v = ~0ULL;
    return a->attr(probe_device(), 2 /* CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT */, &v) ? ~0ULL : v;
}
/* A graph capturing one stream-ordered allocation of n bytes, freed inside the graph. */
static H captured(struct gapi *a, H stream, size_t n, CUresult *alloc_rc) {
    H g = NULL;
    CUdeviceptr p = 0;
    if (a->begin(stream, 0)) die("cuStreamBeginCapture");
    *alloc_rc = a->alloc_async(&p, n, stream);
    if (*alloc_rc == 0) a->free_async(p, stream);
    if (a->end(stream, &g) || !g) die("cuStreamEndCapture");
    return g;
}
/* An explicit graph whose memory node (n bytes on the probe device) sits in a child graph. */
static H explicit_graph(struct gapi *a, size_t n) {
    H child = NULL, parent = NULL, alloc_node = NULL, free_node = NULL, child_node = NULL;
    MEM_ALLOC_NODE_PARAMS p;
    memset(&p, 0, sizeof p);
    p.poolProps.type = 1; /* pinned */
    p.poolProps.location.type = 1;
    p.poolProps.location.id = probe_device();
    p.bytesize = n;
    if (a->create(&child, 0) || a->add_alloc(&alloc_node, child, NULL, 0, &p) || !p.dptr) die("cuGraphAddMemAllocNode");
    if (a->add_free(&free_node, child, &alloc_node, 1, p.dptr)) die("cuGraphAddMemFreeNode");
    if (a->create(&parent, 0) || a->add_child(&child_node, parent, NULL, 0, child)) die("cuGraphAddChildGraphNode");
    return parent;
}
static int graphs(const char *mode, size_t limit) {
    struct gapi a;
    H ctx = make_ctx();
    H s = NULL, gA, gB, gC, eA = NULL, eB = NULL, eC = NULL, eD = NULL, eE = NULL;
    CUdeviceptr d = 0;
    CUresult rc;
    char what[200];
    load_graph_api(&a, mode);
    if (cuStreamCreate(&s, 0)) die("cuStreamCreate");
    size_t base = g_used(&a);
    size_t c = (limit - base) / 4 / MIB * MIB;
    if (c < MIB) die("the limit leaves no room beside the context");

    /* A stream-ordered free of an ordinary allocation, captured: it frees when the graph runs. */
    CUdeviceptr x = 0;
    H gX = NULL, gY = NULL, eX = NULL;
    check(a.alloc_async(&x, c, s) == 0 && g_used(&a) == base + c, "an ordinary stream-ordered allocation is charged");
    if (a.begin(s, 0)) die("cuStreamBeginCapture");
    check(a.free_async(x, s) == 0, "its stream-ordered free is captured");
    if (a.end(s, &gX) || !gX) die("cuStreamEndCapture");
    check(g_used(&a) == base + c, "a captured free keeps the allocation charged until the graph runs");
    CUdeviceptr x2 = 0;
    check(a.alloc_async(&x2, c, s) == 0 && g_used(&a) == base + 2 * c,
          "the pool's next allocation is charged in full (the captured free gave it nothing to reuse)");
    check(a.free_async(x2, s) == 0 && g_used(&a) == base + c, "and freed");
    check(a.inst(&eX, gX, 0) == 0 && a.launch(eX, s) == 0, "the graph holding the free launches");
    check(g_used(&a) == base && a.exec_destroy(eX) == 0, "the allocation is released when the graph runs");
    check(a.alloc_async(&x, c, s) == 0, "allocated again");
    if (a.begin(s, 0) || a.free_async(x, s) || a.end(s, &gY) || !gY) die("second capture");
    check(a.graph_destroy(gY) == 0 && g_used(&a) == base + c, "a destroyed capture never frees: still charged");
    check(a.free_async(x, s) == 0 && g_used(&a) == base, "freed for real");
    check(a.graph_destroy(gX) == 0, "the first capture's graph destroyed");

    /* A capture the driver invalidates ends without a graph, destroying its own: the free
       captured into it never runs, nor does a later graph the driver hands the same handle. */
    H gZ = NULL, gW = NULL, eW = NULL;
    check(a.alloc_async(&x, c, s) == 0 && g_used(&a) == base + c, "allocated for a capture that fails");
    if (a.begin(s, 0)) die("cuStreamBeginCapture");
    check(a.free_async(x, s) == 0, "its stream-ordered free is captured");
    check(cuStreamSynchronize(s) == 900, "a synchronize inside the capture invalidates it");
    check(a.end(s, &gZ) == 901 && gZ == NULL, "the invalidated capture ends with CUDA_ERROR_STREAM_CAPTURE_INVALIDATED");
    if (a.begin(s, 0) || a.end(s, &gW) || !gW) die("an empty capture");
    check(a.inst(&eW, gW, 0) == 0 && a.launch(eW, s) == 0, "a later empty graph (the destroyed one's handle) launches");
    check(g_used(&a) == base + c, "the failed capture's free did not run: the allocation stays charged");
    check(a.exec_destroy(eW) == 0 && a.graph_destroy(gW) == 0, "the empty graph destroyed");
    check(a.free_async(x, s) == 0 && g_used(&a) == base, "freed for real");

    gA = captured(&a, s, 3 * limit, &rc);
    check(rc == 0 && g_used(&a) == base, "capturing an allocation larger than the slice makes a node and charges nothing");
    check(a.inst(&eA, gA, 0) == 0, "the captured graph instantiates");
    rc = a.launch(eA, s);
    snprintf(what, sizeof what, "launching a graph whose memory nodes exceed the slice gets CUDA_ERROR_OUT_OF_MEMORY (got %d)", rc);
    check(rc == 2, what);
    check(g_used(&a) == base && g_reserved(&a) == 0, "the refused launch left nothing charged and the driver mapped nothing");

    gB = captured(&a, s, 2 * c, &rc);
    check(rc == 0 && a.inst(&eB, gB, 0) == 0, "a graph with a 2-chunk memory node instantiates");
    check(a.launch(eB, s) == 0, "its first launch within the slice succeeds");
    snprintf(what, sizeof what, "its first launch is charged what the graph pool reserves (used %llu MiB, pool %llu MiB)",
             (unsigned long long)((g_used(&a) - base) / MIB), g_reserved(&a) / MIB);
    check(g_used(&a) == base + 2 * c && g_reserved(&a) == 2 * c, what);
    check(a.launch(eB, s) == 0 && a.launch(eB, s) == 0 && g_used(&a) == base + 2 * c, "replays take nothing new");
    check(a.alloc(&d, c) == 0, "a plain allocation beside the graph's memory fits");
    rc = a.alloc(&d, 2 * c);
    snprintf(what, sizeof what, "the graph's memory counts against plain allocations (got %d)", rc);
    check(rc == 2, what);

    gC = explicit_graph(&a, 2 * c);
    check(a.inst(&eC, gC, 0) == 0, "an explicit graph with its memory node in a child graph instantiates");
    check(a.launch(eC, s) == 0, "its launch fits once the idle graph's memory is trimmed");
    snprintf(what, sizeof what, "charged the pool after the trim (used %llu MiB, pool %llu MiB)", (g_used(&a) - base) / MIB,
             g_reserved(&a) / MIB);
    check(g_used(&a) == base + 3 * c && g_reserved(&a) == 2 * c, what);
    check(a.launch(eB, s) == 0 && g_used(&a) == base + 3 * c, "the trimmed graph launches again, within the slice");

    check(a.free_(d) == 0 && a.exec_destroy(eB) == 0 && a.exec_destroy(eC) == 0 && a.exec_destroy(eA) == 0,
          "graphs destroyed");
    check(g_used(&a) == base + 2 * c, "destroyed graphs' memory stays charged while the pool holds it");
    check(a.trim(probe_device()) == 0 && g_used(&a) == base && g_reserved(&a) == 0,
          "cuDeviceGraphMemTrim gives it back");

    INSTANTIATE_PARAMS ip = { 2 /* CUDA_GRAPH_INSTANTIATE_FLAG_UPLOAD */, s, NULL, 0 };
    rc = a.inst_params(&eD, gA, &ip);
    snprintf(what, sizeof what, "instantiating with upload a graph past the slice gets CUDA_ERROR_OUT_OF_MEMORY (got %d)", rc);
    check(rc == 2 && g_reserved(&a) == 0, what);
    ip.flags = 2;
    check(a.inst_params(&eE, gB, &ip) == 0 && g_used(&a) == base + 2 * c, "instantiating with upload charges the upload");
    check(a.launch(eE, s) == 0 && g_used(&a) == base + 2 * c, "a launch after the upload takes nothing new");
    check(a.exec_destroy(eE) == 0 && a.trim(probe_device()) == 0 && g_used(&a) == base, "trimmed again");
    H eF = NULL;
    check(a.inst(&eF, gB, 0) == 0 && a.upload(eF, s) == 0 && g_used(&a) == base + 2 * c, "cuGraphUpload is charged like a launch");
    a.exec_destroy(eF);
    a.trim(probe_device());
    cuCtxDestroy_v2(ctx);
    return finish();
}

#include "probe_vmm.inc.c"
#include "probe_legacy.inc.c"
#include "probe_pools.inc.c"

static int nvmlon(int dev, size_t limit) {
    void *h = NULL;
    if (use_device(dev)) die("context on the device");
    CUdeviceptr d;
    check(cuMemAlloc_v2(&d, 10 * MIB) == 0, "hold 10 MiB on the device");
    check(nvmlDeviceGetHandleByIndex_v2((unsigned)dev, &h) == 0, "NVML handle of the device");
    nvmlMemory_t m;
    nvmlMemory_v2_t m2 = { 2, 0, 0, 0, 0 };
    check(nvmlDeviceGetMemoryInfo(h, &m) == 0 && nvmlDeviceGetMemoryInfo_v2(h, &m2) == 0, "NVML answers");
    char what[200];
    snprintf(what, sizeof what, "NVML v1 shows the device's slice (total %llu used %llu free %llu)", m.total, m.used, m.free);
    check(m.total == limit && m.used == 10 * MIB && m.free == limit - 10 * MIB, what);
    check(m2.total == limit && m2.used == 10 * MIB && m2.free == limit - 10 * MIB, "NVML v2 shows the device's slice");
    return finish();
}

int main(int argc, char **argv) {
    if (argc < 2) die("usage: probe <scenario> ...");
    const char *s = argv[1];
    if (!strcmp(s, "entrypoints") && (argc == 5 || argc == 6))
        return entrypoints(argv[2], !strcmp(argv[3], "limited"), strtoull(argv[4], 0, 10), argc == 6 ? strtoull(argv[5], 0, 10) : 0);
    if (!strcmp(s, "contexts") && argc == 5) return contexts(strtoull(argv[2], 0, 10), strtoull(argv[3], 0, 10), strtoull(argv[4], 0, 10));
    if (!strcmp(s, "race") && argc == 5) return race(atoi(argv[2]), atoi(argv[3]), strtoull(argv[4], 0, 10));
    if (!strcmp(s, "hold") && argc == 3) return hold(strtoull(argv[2], 0, 10));
    if (!strcmp(s, "alloc") && argc == 3) { CUdeviceptr d; int rc = cuMemAlloc_v2(&d, strtoull(argv[2], 0, 10)); printf("alloc rc=%d\n", rc); return 0; }
    if (!strcmp(s, "pitch") && argc == 4) {
        CUdeviceptr d; size_t p = 0;
        int rc = cuMemAllocPitch_v2(&d, &p, strtoull(argv[2], 0, 10), strtoull(argv[3], 0, 10), 4);
        printf("pitch rc=%d pitch=%zu\n", rc, p);
        return 0;
    }
    if (!strcmp(s, "fork") && argc == 4) return fork_test(strtoull(argv[2], 0, 10), strtoull(argv[3], 0, 10));
    if (!strcmp(s, "streamdev") && argc == 5) return streamdev(strtoull(argv[2], 0, 10), strtoull(argv[3], 0, 10), strtoull(argv[4], 0, 10));
    if (!strcmp(s, "gpafuture") && argc == 2) return gpafuture();
    if (!strcmp(s, "forkinit") && argc == 3) return forkinit((unsigned)atoi(argv[2]));
    if (!strcmp(s, "prefork") && argc == 5) return prefork(atoi(argv[2]), strtoull(argv[3], 0, 10), strtoull(argv[4], 0, 10));
    if (!strcmp(s, "bench") && (argc == 4 || (argc == 5 && !strcmp(argv[4], "async"))))
        return bench(atol(argv[2]), strtoull(argv[3], 0, 10), argc == 5);
    if (!strcmp(s, "nvml") && argc == 4) return nvml(!strcmp(argv[2], "limited"), strtoull(argv[3], 0, 10));
    if (!strcmp(s, "rtldnext") && argc == 2) return rtldnext();
    if (!strcmp(s, "allocon") && argc >= 3) { alloc_on(argc - 2, argv + 2); return 0; }
    if (!strcmp(s, "holdon") && argc >= 3) {
        alloc_on(argc - 2, argv + 2);
        printf("pid=%d\nready\n", (int)getpid());
        fflush(stdout);
        char buf[16];
        while (read(0, buf, sizeof buf) > 0) {}
        return 0;
    }
    if (!strcmp(s, "multi") && argc == 5) return multi(strtoull(argv[2], 0, 10), strtoull(argv[3], 0, 10), strtoull(argv[4], 0, 10));
    if (!strcmp(s, "graphs") && argc == 4) return graphs(argv[2], strtoull(argv[3], 0, 10));
    if (!strcmp(s, "legacy") && argc == 4) return legacy(argv[2], strtoull(argv[3], 0, 10));
    if (!strcmp(s, "vmm") && argc == 4) return vmm(argv[2], strtoull(argv[3], 0, 10));
    if (!strcmp(s, "pools") && argc == 4) return pools(argv[2], strtoull(argv[3], 0, 10));
    if (!strcmp(s, "nvmlon") && argc == 4) return nvmlon(atoi(argv[2]), strtoull(argv[3], 0, 10));
    die("unknown scenario or wrong arguments");
    return 2;
}
