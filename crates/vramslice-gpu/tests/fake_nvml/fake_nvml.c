/*
 * A fake libnvidia-ml for testing vramslice's NVML backend on machines without a GPU.
 *
 * It implements the few NVML entry points the backend calls. Its state is a text file named
 * `fake-nvml-state` in the directory the library was loaded from (found with dladdr), so each
 * test copies the library into its own directory and scripts it by rewriting that file; the
 * file is re-read on every call. Lines (index = NVML device index, 0..15):
 *
 *   gpu <index> <uuid> <total-bytes> <free-bytes> <name...>
 *   proc <index> compute|graphics <pid> <used-bytes>|na
 *   xid <index> <n>          a critical XID event (delivered once, in file order)
 *   dbe <index>              a double-bit ECC event
 *   lost <index>             every query of the device fails with GPU_IS_LOST
 *   gone <index>             the device handle is NOT_FOUND
 *   noevents <index>         the device supports no events
 *   mig <index> on|off|none  MIG mode now (`none`: the GPU does not support MIG, as an L4); a
 *                            GPU with no such line reports MIG off
 *   memfail <index>          the memory query fails with NVML_ERROR_UNKNOWN (a transient error)
 *   procfail <index> compute|graphics unknown|notsupported
 *                            listing that kind of process fails with NVML_ERROR_UNKNOWN or
 *                            NVML_ERROR_NOT_SUPPORTED
 *
 * No state file at nvmlInit_v2 means "driver not loaded".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_UNKNOWN = 999,
};
#define EVENT_DOUBLE_BIT_ECC 0x2ULL
#define EVENT_XID_CRITICAL 0x8ULL

#define MAX_GPUS 16
#define MAX_PROCS 64
#define MAX_EVENTS 256

struct gpu {
    int present, lost, gone, noevents, memfail;
    int mig; /* 0 off, 1 on, -1 not supported */
    nvmlReturn_t procfail[2]; /* listing [compute, graphics] processes fails with this */
    char uuid[96];
    char name[96];
    unsigned long long total, free;
};
struct proc {
    int gpu, graphics;
    unsigned pid;
    unsigned long long used;
};
struct event {
    int gpu;
    unsigned long long type, data;
};
struct state {
    int count, nprocs, nevents;
    struct gpu gpus[MAX_GPUS];
    struct proc procs[MAX_PROCS];
    struct event events[MAX_EVENTS];
};

struct nvmlDevice { int index; };
static struct nvmlDevice devices[MAX_GPUS];

struct nvmlEventSet {
    unsigned long long types[MAX_GPUS];
    int cursor; /* next index into the state's event list */
};

struct nvmlMemory_v2 {
    unsigned version;
    unsigned long long total, reserved, free, used;
};
struct nvmlProcessInfo {
    unsigned pid;
    unsigned long long usedGpuMemory;
    unsigned gpuInstanceId, computeInstanceId;
};
struct nvmlEventData {
    struct nvmlDevice *device;
    unsigned long long eventType, eventData;
    unsigned gpuInstanceId, computeInstanceId;
};

static int load(struct state *s) {
    memset(s, 0, sizeof *s);
    Dl_info info;
    char path[4096];
    if (!dladdr((void *)&load, &info) || !info.dli_fname) return -1;
    snprintf(path, sizeof path, "%s", info.dli_fname);
    char *slash = strrchr(path, '/');
    if (slash) slash[1] = 0; else path[0] = 0;
    strncat(path, "fake-nvml-state", sizeof path - strlen(path) - 1);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        char kind[32];
        int idx;
        if (sscanf(line, "%31s %d", kind, &idx) != 2 || idx < 0 || idx >= MAX_GPUS) continue;
        struct gpu *g = &s->gpus[idx];
        if (!strcmp(kind, "gpu")) {
            if (sscanf(line, "gpu %*d %95s %llu %llu %95[^\n]", g->uuid, &g->total, &g->free, g->name) == 4) {
                g->present = 1;
                if (idx + 1 > s->count) s->count = idx + 1;
            }
        } else if (!strcmp(kind, "lost")) {
            g->lost = 1;
        } else if (!strcmp(kind, "gone")) {
            g->gone = 1;
        } else if (!strcmp(kind, "noevents")) {
            g->noevents = 1;
        } else if (!strcmp(kind, "memfail")) {
            g->memfail = 1;
        } else if (!strcmp(kind, "mig")) {
            char mode[8];
            if (sscanf(line, "mig %*d %7s", mode) == 1)
                g->mig = !strcmp(mode, "on") ? 1 : !strcmp(mode, "none") ? -1 : 0;
        } else if (!strcmp(kind, "procfail")) {
            char which[16], err[16];
            if (sscanf(line, "procfail %*d %15s %15s", which, err) == 2)
                g->procfail[!strcmp(which, "graphics")] =
                    !strcmp(err, "notsupported") ? NVML_ERROR_NOT_SUPPORTED : NVML_ERROR_UNKNOWN;
        } else if (!strcmp(kind, "proc") && s->nprocs < MAX_PROCS) {
            struct proc *p = &s->procs[s->nprocs];
            char which[16], used[32];
            if (sscanf(line, "proc %*d %15s %u %31s", which, &p->pid, used) == 3) {
                p->gpu = idx;
                p->graphics = !strcmp(which, "graphics");
                p->used = strcmp(used, "na") ? strtoull(used, NULL, 10) : ~0ULL;
                s->nprocs++;
            }
        } else if (!strcmp(kind, "xid") && s->nevents < MAX_EVENTS) {
            unsigned long long n;
            if (sscanf(line, "xid %*d %llu", &n) == 1) {
                s->events[s->nevents++] = (struct event){idx, EVENT_XID_CRITICAL, n};
            }
        } else if (!strcmp(kind, "dbe") && s->nevents < MAX_EVENTS) {
            s->events[s->nevents++] = (struct event){idx, EVENT_DOUBLE_BIT_ECC, 0};
        }
    }
    fclose(f);
    return 0;
}

/* The state's GPU behind a handle, or an error code. */
static nvmlReturn_t gpu_of(struct nvmlDevice *d, struct state *s, struct gpu **out) {
    if (!d || d < devices || d >= devices + MAX_GPUS) return NVML_ERROR_INVALID_ARGUMENT;
    if (load(s)) return NVML_ERROR_DRIVER_NOT_LOADED;
    struct gpu *g = &s->gpus[d->index];
    if (!g->present) return NVML_ERROR_INVALID_ARGUMENT;
    if (g->gone) return NVML_ERROR_NOT_FOUND;
    if (g->lost) return NVML_ERROR_GPU_IS_LOST;
    *out = g;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) {
    struct state s;
    return load(&s) ? NVML_ERROR_DRIVER_NOT_LOADED : NVML_SUCCESS;
}

nvmlReturn_t nvmlShutdown(void) { return NVML_SUCCESS; }

const char *nvmlErrorString(nvmlReturn_t r) { (void)r; return "fake NVML error"; }

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *count) {
    struct state s;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (load(&s)) return NVML_ERROR_DRIVER_NOT_LOADED;
    *count = (unsigned)s.count;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned index, struct nvmlDevice **device) {
    struct state s;
    if (!device || index >= MAX_GPUS) return NVML_ERROR_INVALID_ARGUMENT;
    devices[index].index = (int)index;
    struct gpu *g;
    nvmlReturn_t r = gpu_of(&devices[index], &s, &g);
    if (r == NVML_SUCCESS) *device = &devices[index];
    return r;
}

nvmlReturn_t nvmlDeviceGetUUID(struct nvmlDevice *d, char *buf, unsigned len) {
    struct state s;
    struct gpu *g;
    nvmlReturn_t r = gpu_of(d, &s, &g);
    if (r) return r;
    if (strlen(g->uuid) + 1 > len) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(buf, g->uuid);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(struct nvmlDevice *d, char *buf, unsigned len) {
    struct state s;
    struct gpu *g;
    nvmlReturn_t r = gpu_of(d, &s, &g);
    if (r) return r;
    if (strlen(g->name) + 1 > len) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(buf, g->name);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(struct nvmlDevice *d, struct nvmlMemory_v2 *m) {
    struct state s;
    struct gpu *g;
    nvmlReturn_t r = gpu_of(d, &s, &g);
    if (r) return r;
    if (!m || m->version != (sizeof *m | (2u << 24))) return NVML_ERROR_INVALID_ARGUMENT;
    if (g->memfail) return NVML_ERROR_UNKNOWN;
    unsigned long long taken = g->total > g->free ? g->total - g->free : 0;
    /* Like the real driver: some of what is not free is reserved, not "used". */
    m->total = g->total;
    m->free = g->free;
    m->reserved = taken < (1ULL << 20) ? taken : (1ULL << 20);
    m->used = taken - m->reserved;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigMode(struct nvmlDevice *d, unsigned *current, unsigned *pending) {
    struct state s;
    struct gpu *g;
    nvmlReturn_t r = gpu_of(d, &s, &g);
    if (r) return r;
    if (!current || !pending) return NVML_ERROR_INVALID_ARGUMENT;
    if (g->mig < 0) return NVML_ERROR_NOT_SUPPORTED;
    *current = *pending = (unsigned)g->mig;
    return NVML_SUCCESS;
}

static nvmlReturn_t processes(struct nvmlDevice *d, int graphics, unsigned *count, struct nvmlProcessInfo *infos) {
    struct state s;
    struct gpu *g;
    nvmlReturn_t r = gpu_of(d, &s, &g);
    if (r) return r;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (g->procfail[graphics]) return g->procfail[graphics];
    unsigned n = 0;
    for (int i = 0; i < s.nprocs; i++)
        if (s.procs[i].gpu == d->index && s.procs[i].graphics == graphics) n++;
    if (n == 0) { *count = 0; return NVML_SUCCESS; }
    if (!infos || *count < n) { *count = n; return NVML_ERROR_INSUFFICIENT_SIZE; }
    unsigned k = 0;
    for (int i = 0; i < s.nprocs; i++) {
        struct proc *p = &s.procs[i];
        if (p->gpu != d->index || p->graphics != graphics) continue;
        infos[k++] = (struct nvmlProcessInfo){p->pid, p->used, 0xFFFFFFFFu, 0xFFFFFFFFu};
    }
    *count = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(struct nvmlDevice *d, unsigned *count, struct nvmlProcessInfo *infos) {
    return processes(d, 0, count, infos);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(struct nvmlDevice *d, unsigned *count, struct nvmlProcessInfo *infos) {
    return processes(d, 1, count, infos);
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(struct nvmlDevice *d, unsigned long long *types) {
    struct state s;
    struct gpu *g;
    nvmlReturn_t r = gpu_of(d, &s, &g);
    if (r) return r;
    if (!types) return NVML_ERROR_INVALID_ARGUMENT;
    *types = g->noevents ? 0 : (EVENT_DOUBLE_BIT_ECC | EVENT_XID_CRITICAL | 0x1ULL /* single-bit ECC */);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetCreate(struct nvmlEventSet **set) {
    if (!set) return NVML_ERROR_INVALID_ARGUMENT;
    *set = calloc(1, sizeof **set);
    return *set ? NVML_SUCCESS : NVML_ERROR_INVALID_ARGUMENT;
}

nvmlReturn_t nvmlDeviceRegisterEvents(struct nvmlDevice *d, unsigned long long types, struct nvmlEventSet *set) {
    struct state s;
    struct gpu *g;
    nvmlReturn_t r = gpu_of(d, &s, &g);
    if (r) return r;
    if (!set) return NVML_ERROR_INVALID_ARGUMENT;
    if (g->noevents) return NVML_ERROR_NOT_SUPPORTED;
    set->types[d->index] |= types;
    /* Only events after registration are delivered. */
    set->cursor = s.nevents;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetWait_v2(struct nvmlEventSet *set, struct nvmlEventData *data, unsigned timeout_ms) {
    (void)timeout_ms; /* never sleeps: tests only drain */
    struct state s;
    if (!set || !data) return NVML_ERROR_INVALID_ARGUMENT;
    if (load(&s)) return NVML_ERROR_DRIVER_NOT_LOADED;
    while (set->cursor < s.nevents) {
        struct event *e = &s.events[set->cursor++];
        if (set->types[e->gpu] & e->type) {
            devices[e->gpu].index = e->gpu;
            *data = (struct nvmlEventData){&devices[e->gpu], e->type, e->data, 0xFFFFFFFFu, 0xFFFFFFFFu};
            return NVML_SUCCESS;
        }
    }
    for (int i = 0; i < MAX_GPUS; i++)
        if (set->types[i] && s.gpus[i].lost) return NVML_ERROR_GPU_IS_LOST;
    return NVML_ERROR_TIMEOUT;
}

nvmlReturn_t nvmlEventSetFree(struct nvmlEventSet *set) {
    free(set);
    return NVML_SUCCESS;
}
