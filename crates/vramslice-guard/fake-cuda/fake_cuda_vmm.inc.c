/*
 * Virtual memory management for the fake driver (cuMemCreate and its family): included by
 * fake_cuda.c, so every build of the fake stays one `cc fake_cuda.c`.
 *
 * The model follows the driver API's documentation: cuMemCreate makes a physical allocation
 * with one handle reference; cuMemRetainAllocationHandle adds a reference, cuMemRelease drops
 * one; cuMemMap maps it into a range cuMemAddressReserve handed out, cuMemUnmap unmaps whole
 * mappings (a range that cuts through one is invalid). The memory is freed when the last
 * reference is released *and* the last mapping is unmapped, in either order, so "release right
 * after map" keeps the memory until the unmap. Host-located allocations are not charged.
 */

typedef struct { void *mem; /* charged device memory; NULL when host-located */ int refs, maps; } fake_phys;
typedef struct { CUdeviceptr va; size_t size; fake_phys *phys; } fake_mapping;

#define MAX_MAPPINGS 4096
static fake_mapping mappings[MAX_MAPPINGS];
static int n_mappings;
static atomic_flag vmm_busy = ATOMIC_FLAG_INIT;
static _Atomic CUdeviceptr next_va = 0x7f0000000000ULL;

static void vmm_lock(void) { while (atomic_flag_test_and_set_explicit(&vmm_busy, memory_order_acquire)) sched_yield(); }
static void vmm_unlock(void) { atomic_flag_clear_explicit(&vmm_busy, memory_order_release); }

/* Frees the allocation when nothing holds it any more (called with the lock held). */
static void phys_settle(fake_phys *p) {
    if (p->refs > 0 || p->maps > 0) return;
    if (p->mem) host_free(p->mem);
    free(p);
}

CUresult cuMemCreate(CUmemGenericAllocationHandle *h, size_t n, const MEM_PROP *prop, unsigned long long flags) {
    (void)flags;
    if (!h || !prop || !n) return ERR_INVALID_VALUE;
    fake_phys *p = calloc(1, sizeof *p);
    if (!p) return ERR_OOM;
    if (prop->location.type == 1) {
        if (!valid_device(prop->location.id)) { free(p); return ERR_INVALID_VALUE; }
        p->mem = host_alloc_on(prop->location.id, (long long)n);
        if (!p->mem) { free(p); return ERR_OOM; }
    }
    p->refs = 1;
    *h = (CUmemGenericAllocationHandle)p;
    return OK;
}

CUresult cuMemRelease(CUmemGenericAllocationHandle h) {
    fake_phys *p = (fake_phys *)h;
    if (!p) return ERR_INVALID_VALUE;
    vmm_lock();
    CUresult rc = ERR_INVALID_VALUE;
    if (p->refs > 0) {
        p->refs--;
        phys_settle(p);
        rc = OK;
    }
    vmm_unlock();
    return rc;
}

CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                             unsigned long long flags) {
    (void)alignment; (void)addr; (void)flags;
    if (!ptr || !size) return ERR_INVALID_VALUE;
    const size_t gran = 2ULL << 20;
    size_t span = (size + gran - 1) / gran * gran;
    *ptr = atomic_fetch_add(&next_va, span + gran); /* a gap after each range */
    return OK;
}

CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) { return ptr && size ? OK : ERR_INVALID_VALUE; }

CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle h,
                  unsigned long long flags) {
    fake_phys *p = (fake_phys *)h;
    if (!ptr || !size || !p || offset || flags) return ERR_INVALID_VALUE;
    vmm_lock();
    CUresult rc = OK;
    for (int i = 0; i < n_mappings && rc == OK; i++)
        if (ptr < mappings[i].va + mappings[i].size && mappings[i].va < ptr + size) rc = ERR_INVALID_VALUE;
    if (rc == OK && (n_mappings == MAX_MAPPINGS || p->refs <= 0)) rc = ERR_INVALID_VALUE;
    if (rc == OK) {
        mappings[n_mappings++] = (fake_mapping){ ptr, size, p };
        p->maps++;
    }
    vmm_unlock();
    return rc;
}

CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
    if (!ptr || !size) return ERR_INVALID_VALUE;
    CUdeviceptr end = ptr + size;
    vmm_lock();
    int found = 0, cut = 0;
    for (int i = 0; i < n_mappings; i++) {
        fake_mapping *m = &mappings[i];
        if (m->va >= end || m->va + m->size <= ptr) continue;
        if (m->va < ptr || m->va + m->size > end) cut = 1;
        found++;
    }
    if (!found || cut) { vmm_unlock(); return ERR_INVALID_VALUE; }
    for (int i = 0; i < n_mappings;) {
        fake_mapping *m = &mappings[i];
        if (m->va >= ptr && m->va + m->size <= end) {
            fake_phys *p = m->phys;
            *m = mappings[--n_mappings];
            p->maps--;
            phys_settle(p);
        } else {
            i++;
        }
    }
    vmm_unlock();
    return OK;
}

CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *h, void *addr) {
    if (!h) return ERR_INVALID_VALUE;
    CUdeviceptr a = (CUdeviceptr)addr;
    vmm_lock();
    CUresult rc = ERR_INVALID_VALUE;
    for (int i = 0; i < n_mappings; i++) {
        if (a >= mappings[i].va && a < mappings[i].va + mappings[i].size) {
            mappings[i].phys->refs++;
            *h = (CUmemGenericAllocationHandle)mappings[i].phys;
            rc = OK;
            break;
        }
    }
    vmm_unlock();
    return rc;
}
