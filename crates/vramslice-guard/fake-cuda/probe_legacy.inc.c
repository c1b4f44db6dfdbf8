/*
 * probe legacy <direct|dlsym|gpa> <limit-bytes>: the v1 ABI (32-bit pointers and sizes; what
 * cuGetProcAddress hands out for versions before 3020) is held to the same limit and shown the
 * same slice. Included by probe.c.
 */

CUresult cuMemAlloc(unsigned *, unsigned);
CUresult cuMemAllocPitch(unsigned *, unsigned *, unsigned, unsigned, unsigned);
CUresult cuMemFree(unsigned);
CUresult cuMemGetInfo(unsigned *, unsigned *);
CUresult cuDeviceTotalMem(unsigned *, int);
typedef struct { unsigned Width, Height; int Format; unsigned NumChannels; } ARRAY_DESC_V1;
CUresult cuArrayCreate(H *, const ARRAY_DESC_V1 *);
CUresult cuCtxCreate(H *, unsigned, int);
CUresult cuCtxDestroy(H);

struct lapi {
    CUresult (*alloc)(unsigned *, unsigned);
    CUresult (*pitch)(unsigned *, unsigned *, unsigned, unsigned, unsigned);
    CUresult (*free_)(unsigned);
    CUresult (*info)(unsigned *, unsigned *);
    CUresult (*total)(unsigned *, int);
    CUresult (*array)(H *, const ARRAY_DESC_V1 *);
    CUresult (*ctx_create)(H *, unsigned, int);
    CUresult (*ctx_destroy)(H);
};

static void load_legacy_api(struct lapi *a, const char *mode) {
    if (!strcmp(mode, "direct")) {
        *a = (struct lapi){ cuMemAlloc, cuMemAllocPitch, cuMemFree, cuMemGetInfo, cuDeviceTotalMem, cuArrayCreate,
                            cuCtxCreate, cuCtxDestroy };
        return;
    }
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) die(dlerror());
    if (!strcmp(mode, "dlsym")) {
        S(alloc, "cuMemAlloc"); S(pitch, "cuMemAllocPitch"); S(free_, "cuMemFree"); S(info, "cuMemGetInfo");
        S(total, "cuDeviceTotalMem"); S(array, "cuArrayCreate"); S(ctx_create, "cuCtxCreate");
        S(ctx_destroy, "cuCtxDestroy");
        return;
    }
    CUresult (*gpa)(const char *, void **, int, unsigned long long, int *) =
        need(dlsym(lib, "cuGetProcAddress_v2"), "cuGetProcAddress_v2");
    /* A CUDA 2.0 caller: the driver answers with the v1 entry points. */
#define G1(field, name) do { void *p_ = NULL; int st_ = -1; \
        if (gpa(name, &p_, 2000, 0, &st_) || !p_ || st_ != 0) die("cuGetProcAddress " name); \
        *(void **)&a->field = p_; } while (0)
    G1(alloc, "cuMemAlloc"); G1(pitch, "cuMemAllocPitch"); G1(free_, "cuMemFree"); G1(info, "cuMemGetInfo");
    G1(total, "cuDeviceTotalMem"); G1(array, "cuArrayCreate"); G1(ctx_create, "cuCtxCreate");
    G1(ctx_destroy, "cuCtxDestroy");
}

static int legacy(const char *mode, size_t limit) {
    struct lapi a;
    H ctx = make_ctx();
    load_legacy_api(&a, mode);
    unsigned f0 = 0, t0 = 0, total = 0;
    check(a.info(&f0, &t0) == 0 && t0 == limit && f0 <= limit, "v1 cuMemGetInfo shows the slice");
    check(a.total(&total, probe_device()) == 0 && total == limit, "v1 cuDeviceTotalMem shows the slice");
    const unsigned chunk = (unsigned)(limit / 4);
    unsigned p[8];
    int made = 0;
    CUresult rc = 0;
    for (int i = 0; i < 8; i++) {
        rc = a.alloc(&p[i], chunk);
        if (rc) break;
        made++;
    }
    unsigned f1 = 0, t1 = 0;
    check(made * (size_t)chunk <= f0 && made >= 1 && rc == 2, "v1 cuMemAlloc is refused at the limit");
    check(a.info(&f1, &t1) == 0 && f0 - f1 == made * chunk, "v1 allocations are counted");
    for (int i = 0; i < made; i++) a.free_(p[i]);
    check(a.info(&f1, &t1) == 0 && f1 == f0, "v1 cuMemFree gives them back");
    unsigned q = 0, pitch = 0, rows = chunk / 1024;
    check(a.pitch(&q, &pitch, 1000, rows, 4) == 0 && pitch == 1024 && a.info(&f1, &t1) == 0 &&
          f0 - f1 == pitch * rows, "v1 cuMemAllocPitch is counted with its padding");
    check(a.free_(q) == 0 && a.info(&f1, &t1) == 0 && f1 == f0, "and given back");
    check(a.pitch(&q, &pitch, 1000, (unsigned)(limit / 512), 4) == 2 && a.info(&f1, &t1) == 0 && f1 == f0,
          "a v1 pitched allocation past the slice is refused");
    check(a.free_(0x7fff0000u) != 0 && a.info(&f1, &t1) == 0 && f1 == f0, "v1 cuMemFree of an unknown pointer changes nothing");
    /* Arrays with a v1 descriptor (4-byte elements, one channel). */
    H arr = NULL;
    ARRAY_DESC_V1 fits = { 1024, chunk / 4096, 0x20 /* float */, 1 }, past = { 1024, (unsigned)(limit / 2048), 0x20, 1 };
    check(a.array(&arr, &fits) == 0 && a.info(&f1, &t1) == 0 && f0 - f1 == chunk, "a v1 cuArrayCreate is counted");
    check(cuArrayDestroy(arr) == 0 && a.info(&f1, &t1) == 0 && f1 == f0, "cuArrayDestroy gives it back");
    check(a.array(&arr, &past) == 2 && a.info(&f1, &t1) == 0 && f1 == f0, "a v1 array past the slice is refused");
    /* A v1 context is measured and charged like any other (FAKE_CUDA_CTX_BYTES). */
    H c1 = NULL;
    check(a.ctx_create(&c1, 0, probe_device()) == 0 && a.info(&f1, &t1) == 0 && f1 < f0, "a v1 cuCtxCreate is charged its context");
    check(a.ctx_destroy(c1) == 0 && cuCtxSetCurrent(ctx) == 0 && a.info(&f1, &t1) == 0 && f1 == f0,
          "v1 cuCtxDestroy gives it back");
    return finish();
}
