/*
 * probe vmm <direct|dlsym|gpa|gpa_ptsz> <limit-bytes>: physical allocations (cuMemCreate) stay
 * charged for as long as the driver keeps them: until the last handle reference is released *and*
 * the last mapping is unmapped, whichever comes last. Included by probe.c.
 */

CUresult cuMemAddressReserve(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
CUresult cuMemAddressFree(CUdeviceptr, size_t);
CUresult cuMemMap(CUdeviceptr, size_t, size_t, unsigned long long, unsigned long long);
CUresult cuMemUnmap(CUdeviceptr, size_t);
CUresult cuMemRetainAllocationHandle(unsigned long long *, void *);

struct vapi {
    CUresult (*create)(unsigned long long *, size_t, const MEM_PROP *, unsigned long long);
    CUresult (*release)(unsigned long long);
    CUresult (*reserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    CUresult (*address_free)(CUdeviceptr, size_t);
    CUresult (*map)(CUdeviceptr, size_t, size_t, unsigned long long, unsigned long long);
    CUresult (*unmap)(CUdeviceptr, size_t);
    CUresult (*retain)(unsigned long long *, void *);
    CUresult (*info)(size_t *, size_t *);
};

static void load_vmm_api(struct vapi *a, const char *mode) {
    if (!strcmp(mode, "direct")) {
        *a = (struct vapi){ cuMemCreate, cuMemRelease, cuMemAddressReserve, cuMemAddressFree, cuMemMap, cuMemUnmap,
                            cuMemRetainAllocationHandle, cuMemGetInfo_v2 };
        return;
    }
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) die(dlerror());
    if (!strcmp(mode, "dlsym")) {
        S(create, "cuMemCreate"); S(release, "cuMemRelease"); S(reserve, "cuMemAddressReserve");
        S(address_free, "cuMemAddressFree"); S(map, "cuMemMap"); S(unmap, "cuMemUnmap");
        S(retain, "cuMemRetainAllocationHandle"); S(info, "cuMemGetInfo_v2");
        return;
    }
    unsigned long long flags = !strcmp(mode, "gpa_ptsz") ? 2 : 0;
    CUresult (*gpa)(const char *, void **, int, unsigned long long, int *) =
        need(dlsym(lib, "cuGetProcAddress_v2"), "cuGetProcAddress_v2");
    G(create, "cuMemCreate"); G(release, "cuMemRelease"); G(reserve, "cuMemAddressReserve");
    G(address_free, "cuMemAddressFree"); G(map, "cuMemMap"); G(unmap, "cuMemUnmap");
    G(retain, "cuMemRetainAllocationHandle"); G(info, "cuMemGetInfo");
}

static size_t v_used(struct vapi *a) { size_t f = 0, t = 0; return a->info(&f, &t) ? (size_t)-1 : t - f; }

static int vmm(const char *mode, size_t limit) {
    struct vapi a;
    make_ctx();
    load_vmm_api(&a, mode);
    MEM_PROP prop;
    memset(&prop, 0, sizeof prop);
    prop.type = 1; /* pinned */
    prop.location.type = 1;
    prop.location.id = probe_device();
    const size_t chunk = limit / 4;
    const size_t base = v_used(&a);
    CUdeviceptr va = 0, va2 = 0;
    if (a.reserve(&va, 8 * chunk, 0, 0, 0) || a.reserve(&va2, 8 * chunk, 0, 0, 0)) die("cuMemAddressReserve");
    unsigned long long h = 0, h2 = 0;

    /* 1. Release right after map (the driver API's own samples do this): the mapping keeps the
     *    memory, so it stays charged and the slice fills up as usual. */
    int made = 0;
    CUresult rc = 0;
    for (int i = 0; i < 8; i++) {
        rc = a.create(&h, chunk, &prop, 0);
        if (rc) break;
        if (a.map(va + i * chunk, chunk, 0, h, 0) || a.release(h)) die("map/release");
        made++;
    }
    check(made == 4 && rc == 2, "cuMemRelease right after cuMemMap: the mapped memory stays charged (5th chunk refused)");
    check(v_used(&a) == base + 4 * chunk, "four mapped, released chunks are charged");
    /* 2. One cuMemUnmap over several mappings (PyTorch's expandable segments) frees them all. */
    check(a.unmap(va, 4 * chunk) == 0 && v_used(&a) == base, "one cuMemUnmap over four mappings frees all four");

    /* 3. NCCL's free: retain the handle from the address, release it, unmap, release. */
    if (a.create(&h, chunk, &prop, 0) || a.map(va, chunk, 0, h, 0)) die("create/map");
    check(a.retain(&h2, (void *)va) == 0 && h2 == h, "cuMemRetainAllocationHandle returns the mapped handle");
    check(a.release(h2) == 0 && v_used(&a) == base + chunk, "releasing a retained reference keeps the memory charged");
    check(a.release(h) == 0 && v_used(&a) == base + chunk, "releasing the last reference while mapped keeps it charged");
    check(a.unmap(va, chunk) == 0 && v_used(&a) == base, "the unmap that frees it gives it back");

    /* 4. The usual order (create, map, unmap, release): freed at the release. */
    if (a.create(&h, chunk, &prop, 0) || a.map(va, chunk, 0, h, 0)) die("create/map");
    check(a.unmap(va, chunk) == 0 && v_used(&a) == base + chunk, "unmapped but not released: still charged");
    check(a.release(h) == 0 && v_used(&a) == base, "released after the unmap: given back");

    /* 5. One allocation mapped twice is charged once, until both mappings are gone. */
    if (a.create(&h, chunk, &prop, 0) || a.map(va, chunk, 0, h, 0) || a.map(va2, chunk, 0, h, 0) || a.release(h))
        die("create/map twice");
    check(v_used(&a) == base + chunk, "an allocation mapped twice is charged once");
    check(a.unmap(va, chunk) == 0 && v_used(&a) == base + chunk, "with one mapping left it stays charged");
    /* 6. A refused unmap (a range that cuts through a mapping) changes nothing. */
    check(a.unmap(va2, chunk / 2) != 0 && v_used(&a) == base + chunk, "a refused cuMemUnmap keeps the charge");
    check(a.unmap(va2, chunk) == 0 && v_used(&a) == base, "the last mapping's unmap gives it back");
    /* 7. A refused cuMemRelease (no reference left) changes nothing either. */
    if (a.create(&h, chunk, &prop, 0) || a.map(va, chunk, 0, h, 0) || a.release(h)) die("create/map/release");
    check(a.release(h) != 0 && v_used(&a) == base + chunk, "a refused cuMemRelease keeps the charge");
    check(a.unmap(va, chunk) == 0 && v_used(&a) == base, "and the unmap still gives it back");

    /* 8. Nothing leaked: the whole slice fills again. */
    unsigned long long hs[4];
    int refill = 0;
    for (int i = 0; i < 4; i++) {
        if (a.create(&hs[i], chunk, &prop, 0)) break;
        refill++;
    }
    check(refill == 4 && v_used(&a) == base + 4 * chunk, "afterwards the slice fills again to the limit");
    for (int i = 0; i < refill; i++) a.release(hs[i]);
    check(v_used(&a) == base, "and empties again");
    a.address_free(va, 8 * chunk);
    a.address_free(va2, 8 * chunk);
    return finish();
}
