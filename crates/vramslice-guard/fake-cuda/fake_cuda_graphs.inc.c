/*
 * CUDA graphs for the fake driver: included by fake_cuda.c (one translation unit, so every
 * build of the fake stays one `cc fake_cuda.c`). Not thread-safe: the graph tests are
 * single-threaded.
 *
 * The model follows the CUDA programming guide's graph memory nodes: an allocation node gets its
 * address when it is made (capturing cuMemAllocAsync on a stream makes one too); physical memory
 * comes from the device's graph pool when an executable graph is first launched or uploaded,
 * stays mapped to it between launches, and stays in the pool after the graph is destroyed until
 * cuDeviceGraphMemTrim. Mapping a graph needing N bytes on a device grows the pool by
 * N - (reserved - used), charged to the device like any allocation (so it can fail with
 * CUDA_ERROR_OUT_OF_MEMORY); a trim unmaps every graph of the device and gives back all the pool
 * holds beyond what mapped graphs use.
 */

static CUresult async_free(CUdeviceptr q); /* fake_cuda.c */

#define NODE_GRAPH 4
#define NODE_MEM_ALLOC 10
#define NODE_MEM_FREE 11
#define ERR_CAPTURE_UNSUPPORTED 900
#define ERR_CAPTURE_INVALIDATED 901

struct fake_graph;
typedef struct fake_node { int type; int dev; long long bytes; CUdeviceptr dptr; struct fake_graph *child; } fake_node;
typedef struct fake_graph { fake_node *nodes[256]; int n; } fake_graph;
typedef struct fake_exec { long long need[MAXDEV]; int mapped[MAXDEV]; CUdeviceptr frees[16]; int nfrees; struct fake_exec *next; } fake_exec;
typedef struct { int type; int handleTypes; struct { int type; int id; } location; void *win32; size_t maxSize;
                 unsigned short usage; unsigned char reserved[54]; } POOL_PROPS_FULL;
typedef struct { POOL_PROPS_FULL poolProps; const void *accessDescs; size_t accessDescCount; size_t bytesize;
                 CUdeviceptr dptr; } MEM_ALLOC_NODE_PARAMS;
typedef struct { unsigned long long flags; CUstream hUploadStream; void *hErrNode_out; int result_out; } INSTANTIATE_PARAMS;

static long long graph_reserved[MAXDEV], graph_used[MAXDEV], graph_reserved_high[MAXDEV], graph_used_high[MAXDEV];
static fake_exec *execs;
#define MAXCAPTURE 16
static struct { CUstream stream; fake_graph *graph; int invalidated; } captures[MAXCAPTURE];
/* The graph of the last invalidated capture, destroyed by the driver: the next capture gets the
   same handle back, as a real driver's allocator may. */
static fake_graph *recycled_graph;

static fake_graph *capture_graph(CUstream s) {
    for (int i = 0; i < MAXCAPTURE; i++)
        if (s && captures[i].stream == s) return captures[i].graph;
    return NULL;
}
/* CU_STREAM_CAPTURE_STATUS_{NONE,ACTIVE,INVALIDATED} of stream s. */
static int capture_status(CUstream s) {
    for (int i = 0; i < MAXCAPTURE; i++)
        if (s && captures[i].stream == s) return captures[i].invalidated ? 2 : 1;
    return 0;
}

static CUresult add_node(fake_graph *g, fake_node **out, int type, int dev, long long bytes, CUdeviceptr dptr, fake_graph *child) {
    if (!g || g->n >= (int)(sizeof g->nodes / sizeof g->nodes[0])) return ERR_INVALID_VALUE;
    fake_node *n = calloc(1, sizeof *n);
    if (!n) return ERR_OOM;
    n->type = type; n->dev = dev; n->bytes = bytes; n->dptr = dptr; n->child = child;
    g->nodes[g->n++] = n;
    if (out) *out = n;
    return OK;
}

/* A graph allocation's address: a distinct host stub charged nothing (its header says 0 bytes). */
static CUdeviceptr graph_address(int dev) {
    long long *p = malloc(16 + 64);
    if (!p) return 0;
    p[0] = 0;
    p[1] = dev;
    return (CUdeviceptr)(p + 2);
}

static CUresult capture_alloc(fake_graph *g, CUdeviceptr *dptr, size_t n, int dev) {
    if (!dptr) return ERR_INVALID_VALUE;
    CUdeviceptr a = graph_address(dev);
    if (!a) return ERR_OOM;
    *dptr = a;
    return add_node(g, NULL, NODE_MEM_ALLOC, dev, (long long)n, a, NULL);
}

/* A stream belongs to the context current when it was made. */
CUresult cuStreamCreate(CUstream *s, unsigned flags) {
    (void)flags;
    if (!s) return ERR_INVALID_VALUE;
    CUcontext *owner = malloc(sizeof *owner);
    if (!owner) return ERR_OOM;
    *owner = current_ctx;
    *s = owner;
    return OK;
}
CUresult cuStreamGetCtx(CUstream s, CUcontext *c) {
    if (!c) return ERR_INVALID_VALUE;
    *c = ((uintptr_t)s <= 2) ? current_ctx : *(CUcontext *)s;
    return *c ? OK : ERR_INVALID_CONTEXT;
}
/* The device a stream's work runs on: the default streams' is the current context's. */
static int stream_device(CUstream s) {
    CUcontext c = ((uintptr_t)s <= 2) ? current_ctx : *(CUcontext *)s;
    return c ? device_of(c) : current_device();
}
CUresult cuStreamDestroy_v2(CUstream s) { free(s); return OK; }
/* Synchronizing a capturing stream is illegal during capture: it invalidates the capture. */
CUresult cuStreamSynchronize(CUstream s) {
    for (int i = 0; i < MAXCAPTURE; i++)
        if (s && captures[i].stream == s) {
            captures[i].invalidated = 1;
            return ERR_CAPTURE_UNSUPPORTED;
        }
    return OK;
}
CUresult cuStreamBeginCapture_v2(CUstream s, int mode) {
    (void)mode;
    if (!s) return ERR_CAPTURE_UNSUPPORTED; /* the legacy stream cannot capture */
    if (capture_graph(s)) return ERR_INVALID_VALUE;
    for (int i = 0; i < MAXCAPTURE; i++)
        if (!captures[i].stream) {
            captures[i].graph = recycled_graph ? recycled_graph : calloc(1, sizeof(fake_graph));
            recycled_graph = NULL;
            if (!captures[i].graph) return ERR_OOM;
            captures[i].stream = s;
            captures[i].invalidated = 0;
            return OK;
        }
    return ERR_INVALID_VALUE;
}
CUresult cuStreamEndCapture(CUstream s, fake_graph **g) {
    if (!g) return ERR_INVALID_VALUE;
    for (int i = 0; i < MAXCAPTURE; i++)
        if (s && captures[i].stream == s) {
            fake_graph *made = captures[i].graph;
            int invalidated = captures[i].invalidated;
            captures[i].stream = NULL;
            captures[i].graph = NULL;
            if (invalidated) {
                /* No graph: the driver destroys the one it was capturing into. */
                *g = NULL;
                for (int k = 0; k < made->n; k++) free(made->nodes[k]);
                memset(made, 0, sizeof *made);
                free(recycled_graph);
                recycled_graph = made;
                return ERR_CAPTURE_INVALIDATED;
            }
            *g = made;
            return OK;
        }
    return ERR_INVALID_VALUE;
}
CUresult cuStreamEndCapture_ptsz(CUstream s, fake_graph **g) { return cuStreamEndCapture(s, g); }
CUresult cuStreamIsCapturing(CUstream s, int *status) { if (!status) return ERR_INVALID_VALUE; *status = capture_status(s); return OK; }
CUresult cuStreamIsCapturing_ptsz(CUstream s, int *status) { return cuStreamIsCapturing(s, status); }
CUresult cuStreamGetCaptureInfo_v2(CUstream s, int *status, unsigned long long *id, fake_graph **g, const void **deps, size_t *n) {
    if (!status) return ERR_INVALID_VALUE;
    /* As the driver: the graph is told only for a live (active) capture. */
    *status = capture_status(s);
    fake_graph *c = *status == 1 ? capture_graph(s) : NULL;
    if (id) *id = (unsigned long long)(uintptr_t)c;
    if (g) *g = c;
    if (deps) *deps = NULL;
    if (n) *n = 0;
    return OK;
}
CUresult cuStreamGetCaptureInfo_v2_ptsz(CUstream s, int *status, unsigned long long *id, fake_graph **g, const void **deps, size_t *n) {
    return cuStreamGetCaptureInfo_v2(s, status, id, g, deps, n);
}
CUresult cuStreamGetCaptureInfo_v3(CUstream s, int *status, unsigned long long *id, fake_graph **g, const void **deps,
                                   const void **edges, size_t *n) {
    if (edges) *edges = NULL;
    return cuStreamGetCaptureInfo_v2(s, status, id, g, deps, n);
}
CUresult cuStreamGetCaptureInfo_v3_ptsz(CUstream s, int *status, unsigned long long *id, fake_graph **g, const void **deps,
                                        const void **edges, size_t *n) {
    return cuStreamGetCaptureInfo_v3(s, status, id, g, deps, edges, n);
}

CUresult cuGraphCreate(fake_graph **g, unsigned flags) { (void)flags; if (!g) return ERR_INVALID_VALUE; *g = calloc(1, sizeof(fake_graph)); return *g ? OK : ERR_OOM; }
CUresult cuGraphDestroy(fake_graph *g) {
    if (!g) return ERR_INVALID_VALUE;
    for (int i = 0; i < g->n; i++) free(g->nodes[i]);
    free(g);
    return OK;
}
CUresult cuGraphAddMemAllocNode(fake_node **node, fake_graph *g, fake_node **deps, size_t ndeps, MEM_ALLOC_NODE_PARAMS *p) {
    (void)deps; (void)ndeps;
    if (!node || !p || p->poolProps.location.type != 1 || !valid_device(p->poolProps.location.id)) return ERR_INVALID_VALUE;
    CUdeviceptr a = graph_address(p->poolProps.location.id);
    if (!a) return ERR_OOM;
    p->dptr = a;
    return add_node(g, node, NODE_MEM_ALLOC, p->poolProps.location.id, (long long)p->bytesize, a, NULL);
}
CUresult cuGraphAddMemFreeNode(fake_node **node, fake_graph *g, fake_node **deps, size_t ndeps, CUdeviceptr dptr) {
    (void)deps; (void)ndeps;
    return add_node(g, node, NODE_MEM_FREE, 0, 0, dptr, NULL);
}
CUresult cuGraphAddChildGraphNode(fake_node **node, fake_graph *g, fake_node **deps, size_t ndeps, fake_graph *child) {
    (void)deps; (void)ndeps;
    if (!child) return ERR_INVALID_VALUE;
    return add_node(g, node, NODE_GRAPH, 0, 0, 0, child);
}
CUresult cuGraphGetNodes(fake_graph *g, fake_node **nodes, size_t *count) {
    if (!g || !count) return ERR_INVALID_VALUE;
    if (!nodes) { *count = (size_t)g->n; return OK; }
    size_t k = *count < (size_t)g->n ? *count : (size_t)g->n;
    for (size_t i = 0; i < k; i++) nodes[i] = g->nodes[i];
    *count = k;
    return OK;
}
CUresult cuGraphNodeGetType(fake_node *n, int *type) { if (!n || !type) return ERR_INVALID_VALUE; *type = n->type; return OK; }
CUresult cuGraphMemAllocNodeGetParams(fake_node *n, MEM_ALLOC_NODE_PARAMS *p) {
    if (!n || !p || n->type != NODE_MEM_ALLOC) return ERR_INVALID_VALUE;
    memset(p, 0, sizeof *p);
    p->poolProps.type = 1; /* CU_MEM_ALLOCATION_TYPE_PINNED */
    p->poolProps.location.type = 1;
    p->poolProps.location.id = n->dev;
    p->bytesize = (size_t)n->bytes;
    p->dptr = n->dptr;
    return OK;
}
CUresult cuGraphChildGraphNodeGetGraph(fake_node *n, fake_graph **g) {
    if (!n || !g || n->type != NODE_GRAPH) return ERR_INVALID_VALUE;
    *g = n->child;
    return OK;
}

/* What an executable graph maps (memory nodes) and frees when it first runs (free nodes of
 * ordinary allocations: their header charges bytes, a graph allocation's charges none). */
static void add_needs(const fake_graph *g, fake_exec *e, int depth) {
    if (depth > 8) return;
    for (int i = 0; i < g->n; i++) {
        const fake_node *n = g->nodes[i];
        if (n->type == NODE_MEM_ALLOC) e->need[n->dev] += n->bytes;
        if (n->type == NODE_GRAPH) add_needs(n->child, e, depth + 1);
        if (n->type == NODE_MEM_FREE && n->dptr && ((long long *)n->dptr)[-2] > 0 &&
            e->nfrees < (int)(sizeof e->frees / sizeof e->frees[0]))
            e->frees[e->nfrees++] = n->dptr;
    }
}
static void note_graph_highs(int d) {
    if (graph_reserved[d] > graph_reserved_high[d]) graph_reserved_high[d] = graph_reserved[d];
    if (graph_used[d] > graph_used_high[d]) graph_used_high[d] = graph_used[d];
}
/* Maps an executable graph's memory on every device it needs (all or nothing). */
static CUresult map_exec(fake_exec *e) {
    long long growth[MAXDEV] = { 0 };
    for (int d = 0; d < ndev; d++) {
        if (e->mapped[d] || !e->need[d]) continue;
        long long unused = graph_reserved[d] - graph_used[d];
        growth[d] = e->need[d] > unused ? e->need[d] - unused : 0;
        if (growth[d] && !take(d, growth[d])) {
            for (int k = 0; k < d; k++) give(k, growth[k]);
            return ERR_OOM;
        }
    }
    for (int d = 0; d < ndev; d++) {
        if (e->mapped[d] || !e->need[d]) continue;
        graph_reserved[d] += growth[d];
        graph_used[d] += e->need[d];
        e->mapped[d] = 1;
        note_graph_highs(d);
    }
    return OK;
}
static CUresult instantiate(fake_exec **out, fake_graph *g) {
    if (!out || !g) return ERR_INVALID_VALUE;
    fake_exec *e = calloc(1, sizeof *e);
    if (!e) return ERR_OOM;
    add_needs(g, e, 0);
    e->next = execs;
    execs = e;
    *out = e;
    return OK;
}
static int known_exec(fake_exec *e) {
    for (fake_exec *x = execs; x; x = x->next)
        if (x == e) return 1;
    return 0;
}
CUresult cuGraphInstantiateWithFlags(fake_exec **e, fake_graph *g, unsigned long long flags) { (void)flags; return instantiate(e, g); }
CUresult cuGraphInstantiate(fake_exec **e, fake_graph *g, void **err, char *log, size_t n) { (void)err; (void)log; (void)n; return instantiate(e, g); }
CUresult cuGraphInstantiate_v2(fake_exec **e, fake_graph *g, void **err, char *log, size_t n) { (void)err; (void)log; (void)n; return instantiate(e, g); }
CUresult cuGraphInstantiateWithParams(fake_exec **e, fake_graph *g, INSTANTIATE_PARAMS *p) {
    if (!p) return ERR_INVALID_VALUE;
    CUresult rc = instantiate(e, g);
    if (rc == OK && (p->flags & 2) && (rc = map_exec(*e)) != OK) {
        execs = (*e)->next; /* just pushed: take it off again */
        free(*e);
        *e = NULL;
    }
    p->result_out = rc == OK ? 0 : 1;
    return rc;
}
CUresult cuGraphInstantiateWithParams_ptsz(fake_exec **e, fake_graph *g, INSTANTIATE_PARAMS *p) { return cuGraphInstantiateWithParams(e, g, p); }
/* A launch maps, then runs: free nodes of ordinary allocations free them (once). */
CUresult cuGraphLaunch(fake_exec *e, CUstream s) {
    (void)s;
    if (!known_exec(e)) return ERR_INVALID_VALUE;
    CUresult rc = map_exec(e);
    if (rc != OK) return rc;
    for (int i = 0; i < e->nfrees; i++) async_free(e->frees[i]);
    e->nfrees = 0;
    return OK;
}
CUresult cuGraphLaunch_ptsz(fake_exec *e, CUstream s) { return cuGraphLaunch(e, s); }
CUresult cuGraphUpload(fake_exec *e, CUstream s) { (void)s; return known_exec(e) ? map_exec(e) : ERR_INVALID_VALUE; }
CUresult cuGraphUpload_ptsz(fake_exec *e, CUstream s) { return cuGraphUpload(e, s); }
CUresult cuGraphExecDestroy(fake_exec *e) {
    for (fake_exec **x = &execs; *x; x = &(*x)->next)
        if (*x == e) {
            for (int d = 0; d < ndev; d++)
                if (e->mapped[d]) graph_used[d] -= e->need[d];
            *x = e->next;
            free(e);
            return OK;
        }
    return ERR_INVALID_VALUE;
}
CUresult cuDeviceGraphMemTrim(CUdevice d) {
    if (!valid_device(d)) return ERR_INVALID_VALUE;
    for (fake_exec *x = execs; x; x = x->next)
        if (x->mapped[d]) { x->mapped[d] = 0; graph_used[d] -= x->need[d]; }
    give(d, graph_reserved[d] - graph_used[d]);
    graph_reserved[d] = graph_used[d];
    return OK;
}
CUresult cuDeviceGetGraphMemAttribute(CUdevice d, int attr, void *value) {
    if (!valid_device(d) || !value) return ERR_INVALID_VALUE;
    long long v;
    switch (attr) {
    case 0: v = graph_used[d]; break;
    case 1: v = graph_used_high[d]; break;
    case 2: v = graph_reserved[d]; break;
    case 3: v = graph_reserved_high[d]; break;
    default: return ERR_INVALID_VALUE;
    }
    *(unsigned long long *)value = (unsigned long long)v;
    return OK;
}
