/* Paging modes (docs/paging.md, PAGING_SPEC): make an unchanged llama.cpp read only the experts it uses when the
 * model does not fit in the page cache. Independent of tracing: GGUF_EXPERTS_PAGING works without
 * GGUF_EXPERTS_TRACE.
 *
 *   GGUF_EXPERTS_PAGING=stock|random|prefetch|auto   (unset or stock: nothing here does anything)
 *   GGUF_EXPERTS_PAGING_LOAD=auto|keep|skip           the load pass (MAP_POPULATE, whole-file WILLNEED) of a .gguf:
 *                                                     auto drops it when the file does not fit (size > MemAvailable
 *                                                     at mmap time minus GGUF_EXPERTS_PAGING_RESERVE, default 1 GiB)
 *   GGUF_EXPERTS_PREFETCH_WHOLE=0.5                   prefetch: the fraction of a layer's experts selected by a
 *                                                     ubatch at or above which whole tensors are read
 *   GGUF_EXPERTS_PREFETCH_ASYNC=1|0                   prefetch: issue the reads from a helper thread (default), or
 *                                                     inline in the eval callback before the matmul starts
 *   GGUF_EXPERTS_PREFETCH_AHEAD=0|1                   prefetch: a layer read whole also reads the next layer whole
 *
 * How: `mmap` is wrapped to drop MAP_POPULATE for a .gguf mapping (mode not stock, load pass skipped) and
 * `posix_madvise(WILLNEED)` over such a mapping is skipped. Before each graph computes, its nodes' sources are
 * scanned for the `blk.L.*_exps*` tensors whose data lies in a recorded mapping (the weights llama.cpp reads
 * from the file): each gets MADV_RANDOM once (random, prefetch). In prefetch mode the eval callback observes
 * `ffn_moe_topk-L`; when it is computed, the union of the selected experts over the ubatch's rows is read
 * ahead (MADV_WILLNEED per run of consecutive ids) in every *_exps tensor of layer L, in graph order; a ubatch
 * selecting at least PREFETCH_WHOLE of the experts reads the whole tensors instead (sequential WILLNEED in
 * steps of the device's read-ahead cap). Nothing here touches the data the program computes with: results are unchanged.
 */
#include "ggexp.h"
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>

int g_paging; /* PAGING_* */
static int g_load = 0; /* 0 auto, 1 keep, 2 skip */
static double g_whole = 0.5;
static int g_async = 1;
/* A layer read whole also reads the next layer whole (GGUF_EXPERTS_PREFETCH_AHEAD=0 turns it off): a prefill ubatch
 * that selects most of one layer's experts selects most of the next one's too. On the flat-router 29.6 GiB model
 * at ~9 GiB it cut prefill from 30.5-30.7 s to 22.9-25.1 s (stock: 28.2-30.2 s), decode unchanged. */
static int g_ahead = 1;
/* While a layer is read whole, its expert tensors are MADV_SEQUENTIAL instead of MADV_RANDOM, so the matmul's own
 * faults on pages the read has not reached yet read ahead in large pieces instead of 4 KiB; the next ubatch that
 * selects few experts puts MADV_RANDOM back (GGUF_EXPERTS_PREFETCH_SEQ=0 turns it off). On the flat-router 29.6 GiB
 * model at ~9 GiB, measured back to back: prefill 25.1 / 19.9 s with it, 27.0 / 24.8 s without, major faults
 * 1.5-1.6k instead of 77-143k per request, decode the same. */
static int g_seq = 1;
static unsigned char g_seq_on[4096]; /* per layer: its tensors are MADV_SEQUENTIAL now */
static unsigned g_ubatch;           /* graphs computed (paging_graph), to read a tensor whole once per ubatch */
static unsigned g_whole_at[4096];   /* per layer: 1 + the ubatch whose whole read was submitted */
static long long g_reserve = 1LL << 30;
static int g_warned;
static long g_page = 4096;

#define MAX_MAPS 64
struct gmap { uint8_t *base; size_t len; int skip_load; };
static struct gmap g_maps[MAX_MAPS];
static int g_n_maps;
static pthread_mutex_t g_plock = PTHREAD_MUTEX_INITIALIZER;

#define MAX_EXPS 8192
struct exps { uint8_t *data; size_t stride; int n_exp, layer; };
static struct exps g_exps[MAX_EXPS];
static int g_n_exps, g_n_exps_outside;
static void *g_scanned_gf;
static int g_scanned_nodes;

typedef void *(*mmap_t)(void *, size_t, int, int, int, off_t);
typedef int (*pmadv_t)(void *, size_t, int);

static void warn_once(const char *why) {
    if (__atomic_exchange_n(&g_warned, 1, __ATOMIC_RELAXED)) return;
    const char *m = g_paging == PAGING_RANDOM ? "random" : "prefetch";
    char buf[512];
    snprintf(buf, sizeof buf, "gguf-experts: warning: --paging %s cannot apply: %s; running as stock\n", m, why);
    say("%s", buf, NULL);
}

__attribute__((constructor)) static void paging_init(void) {
    const char *p = getenv("GGUF_EXPERTS_PAGING");
    long pg = sysconf(_SC_PAGESIZE);
    if (pg > 0) g_page = pg;
    if (!p || !*p || strcmp(p, "stock") == 0) return;
    if (strcmp(p, "random") == 0) g_paging = PAGING_RANDOM;
    else if (strcmp(p, "prefetch") == 0) g_paging = PAGING_PREFETCH;
    else if (strcmp(p, "auto") == 0) g_paging = PAGING_AUTO;
    else {
        say("gguf-experts: GGUF_EXPERTS_PAGING=%s is not stock, random, prefetch or auto; using stock\n", p, NULL);
        return;
    }
    const char *l = getenv("GGUF_EXPERTS_PAGING_LOAD");
    if (l && strcmp(l, "keep") == 0) g_load = 1;
    else if (l && strcmp(l, "skip") == 0) g_load = 2;
    const char *w = getenv("GGUF_EXPERTS_PREFETCH_WHOLE");
    if (w && *w) {
        char *end;
        double v = strtod(w, &end);
        if (end != w && v >= 0) g_whole = v;
    }
    const char *a = getenv("GGUF_EXPERTS_PREFETCH_ASYNC");
    g_async = !(a && strcmp(a, "0") == 0);
    const char *ah = getenv("GGUF_EXPERTS_PREFETCH_AHEAD");
    g_ahead = !(ah && strcmp(ah, "0") == 0);
    const char *sq = getenv("GGUF_EXPERTS_PREFETCH_SEQ");
    g_seq = !(sq && strcmp(sq, "0") == 0);
    const char *r = getenv("GGUF_EXPERTS_PAGING_RESERVE");
    if (r && *r) g_reserve = atoll(r);
}

static long long mem_available(void) {
    FILE *f = fopen("/proc/meminfo", "re");
    if (!f) return -1;
    char line[256];
    long long kb = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lld kB", &kb) == 1) break;
    fclose(f);
    return kb < 0 ? -1 : kb * 1024;
}

/* A mapping of a .gguf file (read-only, shared or private, whole file or a fragment): record it, decide the
 * load pass. Called only when paging is on. Returns the flags to map with. */
/* The most one MADV_WILLNEED reads: the kernel cuts each call to max(io_pages, ra_pages) of the file's device
 * (mm/readahead.c force_page_cache_ra: max(max_sectors_kb, read_ahead_kb)), so a longer call reads only its
 * start. Prefetch issues calls of this size, back to back. 128 KiB (the kernel's default read-ahead) if unknown. */
static size_t g_step = 128u << 10;

static void set_step(dev_t dev) {
    int64_t ra = device_queue_kb(dev, "read_ahead_kb"), ms = device_queue_kb(dev, "max_sectors_kb");
    int64_t kb = ra > ms ? ra : ms;
    if (kb >= 4) g_step = (size_t)kb << 10;
}

static int on_gguf_map(int flags, int fd, size_t len, int *record) {
    *record = 0;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 5) return flags;
    path[n] = 0;
    if (strcmp(path + n - 5, ".gguf") != 0) return flags;
    struct statfs sf;
    if (fstatfs(fd, &sf) == 0 && (sf.f_type == 0x01021994 /* tmpfs */ || sf.f_type == 0x858458f6 /* ramfs */)) {
        warn_once("the model is on tmpfs (already in memory)");
        return flags;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) return flags;
    set_step(st.st_dev);
    long long size = (long long)st.st_size;
    int no, of;
    if (n > 20 && sscanf(path + n - 20, "-%5d-of-%5d.gguf", &no, &of) == 2 && of > 1 && of < 10000) {
        size = 0; /* a split model: all of its shards count */
        for (int i = 1; i <= of; i++) {
            char sib[PATH_MAX];
            snprintf(sib, sizeof sib, "%.*s-%05d-of-%05d.gguf", (int)(n - 20), path, i, of);
            if (stat(sib, &st) == 0) size += (long long)st.st_size;
        }
    }
    int skip = g_load == 2;
    if (g_load == 0) {
        long long avail = mem_available();
        skip = avail >= 0 && size > avail - g_reserve;
    }
    if (g_paging == PAGING_AUTO) { /* the env form's auto: stock when the file fits, else prefetch */
        g_paging = skip ? PAGING_PREFETCH : PAGING_STOCK;
        say("gguf-experts: paging %s (GGUF_EXPERTS_PAGING=auto: %s)\n", skip ? "prefetch" : "stock",
            skip ? "the model does not fit in MemAvailable minus the reserve" : "the model fits in memory");
        if (!skip) return flags;
    }
    (void)len;
    *record = 1 + skip;
    return skip ? (flags & ~MAP_POPULATE) : flags;
}

static void *do_mmap(const char *name, void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    static mmap_t real;
    if (!real) {
        dlsym_t ds = rdlsym();
        real = ds ? (mmap_t)ds(RTLD_NEXT, name) : NULL;
        if (!real) {
            errno = ENOSYS;
            return MAP_FAILED;
        }
    }
    int record = 0;
    if (g_paging != PAGING_STOCK && fd >= 0 && !(prot & PROT_WRITE && flags & MAP_SHARED) && len >= (size_t)g_page)
        flags = on_gguf_map(flags, fd, len, &record);
    void *r = real(addr, len, prot, flags, fd, off);
    if (record && r != MAP_FAILED) {
        pthread_mutex_lock(&g_plock);
        if (g_n_maps < MAX_MAPS) g_maps[g_n_maps++] = (struct gmap){(uint8_t *)r, len, record == 2};
        pthread_mutex_unlock(&g_plock);
    }
    return r;
}

EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    return do_mmap("mmap", addr, len, prot, flags, fd, off);
}
EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    return do_mmap("mmap64", addr, len, prot, flags, fd, off);
}

/* A recorded mapping unmapped whole is forgotten (its addresses may be reused); a fragment unmapped (llama.cpp
 * unmaps the unused head and tail of its mapping) leaves the record, which only widens where advice may go. */
typedef int (*munmap_t)(void *, size_t);
EXPORT int munmap(void *addr, size_t len) {
    static munmap_t real;
    if (!real) {
        dlsym_t ds = rdlsym();
        real = ds ? (munmap_t)ds(RTLD_NEXT, "munmap") : NULL;
        if (!real) {
            errno = ENOSYS;
            return -1;
        }
    }
    if (g_n_maps > 0) {
        pthread_mutex_lock(&g_plock);
        for (int i = 0; i < g_n_maps; i++)
            if (g_maps[i].base >= (uint8_t *)addr && g_maps[i].base + g_maps[i].len <= (uint8_t *)addr + len) {
                for (int j = 0; j < g_n_exps; j++) /* the model is gone (freed between computes) */
                    if (g_exps[j].data >= g_maps[i].base && g_exps[j].data < g_maps[i].base + g_maps[i].len)
                        g_exps[j--] = g_exps[--g_n_exps];
                g_scanned_gf = NULL;
                g_maps[i--] = g_maps[--g_n_maps];
            }
        pthread_mutex_unlock(&g_plock);
    }
    return real(addr, len);
}

static struct gmap *map_of(const void *p, size_t len) {
    const uint8_t *b = p;
    for (int i = 0; i < g_n_maps; i++)
        if (b >= g_maps[i].base && b + len <= g_maps[i].base + g_maps[i].len) return &g_maps[i];
    return NULL;
}

/* llama.cpp's whole-file WILLNEED over a mapping whose load pass is skipped: not issued. */
EXPORT int posix_madvise(void *addr, size_t len, int advice) {
    static pmadv_t real;
    if (!real) {
        dlsym_t ds = rdlsym();
        real = ds ? (pmadv_t)ds(RTLD_NEXT, "posix_madvise") : NULL;
        if (!real) return ENOSYS;
    }
    if (g_paging != PAGING_STOCK && advice == POSIX_MADV_WILLNEED) {
        pthread_mutex_lock(&g_plock);
        struct gmap *m = NULL;
        for (int i = 0; i < g_n_maps && !m; i++) /* any overlap with a skipped mapping */
            if ((uint8_t *)addr < g_maps[i].base + g_maps[i].len && (uint8_t *)addr + len > g_maps[i].base)
                m = &g_maps[i];
        int skip = m && m->skip_load;
        pthread_mutex_unlock(&g_plock);
        if (skip) return 0;
    }
    return real(addr, len, advice);
}

static void advise(const uint8_t *p, size_t len, int advice) {
    uintptr_t b = (uintptr_t)p & ~(uintptr_t)(g_page - 1);
    uintptr_t e = ((uintptr_t)p + len + (uintptr_t)g_page - 1) & ~(uintptr_t)(g_page - 1);
    if (e > b) madvise((void *)b, e - b, advice);
}

/* ---- the expert tensors: learned from the graph, before it computes ----------------------------------------- */
/* "blk.L.<anything>_exps<anything>": the layer, or -1 */
static int exps_layer(const char *name) {
    if (memcmp(name, "blk.", 4) != 0 || !strstr(name, "_exps")) return -1;
    char *end;
    long l = strtol(name + 4, &end, 10);
    return end != name + 4 && *end == '.' && l >= 0 && l < 4096 ? (int)l : -1;
}

static void note_exps(struct gt *w) {
    int layer = exps_layer(w->name);
    if (layer < 0 || !w->data) return;
    for (int i = 0; i < g_n_exps; i++)
        if (g_exps[i].data == w->data) return;
    int dim = w->ne[2] > 1 ? 2 : 1; /* weights [in, out, n_expert]; biases/scales [out, n_expert] */
    size_t stride = w->nb[dim];
    int n_exp = (int)w->ne[dim];
    size_t bytes = stride * (size_t)n_exp;
    pthread_mutex_lock(&g_plock);
    struct gmap *m = map_of(w->data, bytes);
    pthread_mutex_unlock(&g_plock);
    if (!m) {
        g_n_exps_outside++;
        return;
    }
    if (g_n_exps >= MAX_EXPS) return;
    g_exps[g_n_exps++] = (struct exps){(uint8_t *)w->data, stride, n_exp, layer};
    advise(w->data, bytes, MADV_RANDOM);
}

/* Called before each graph computes (ggml_backend_sched_graph_compute_async), by the thread that computes it. */
void paging_graph(void *gf) {
    if (g_paging == PAGING_STOCK || g_paging == PAGING_AUTO || g_warned) return;
    REAL(graph_n_nodes_t, n_nodes, "ggml_graph_n_nodes");
    REAL(graph_node_t, node, "ggml_graph_node");
    if (!n_nodes || !node) return;
    int nn = n_nodes(gf);
    g_ubatch++;
    if (gf == g_scanned_gf && nn == g_scanned_nodes) return;
    g_scanned_gf = gf;
    g_scanned_nodes = nn;
    int before = g_n_exps;
    for (int i = 0; i < nn; i++) {
        struct gt *t = node(gf, i);
        for (int j = 0; t && j < 10 && t->src[j]; j++) {
            struct gt *w = t->src[j];
            if (w->name[0] == 'b' && !w->src[0] && !w->view_src) note_exps(w);
        }
    }
    if (g_n_exps == 0 && before == 0 && g_n_exps_outside > 0)
        warn_once(g_n_maps == 0 ? "the program does not memory-map the model (--load-mode none, --no-mmap?)"
                                : "the expert tensors are not in the model's mapping (repacked or offloaded)");
}

/* ---- prefetch: the helper thread and the jobs ------------------------------------------------------------ */
#define QCAP 16384
struct job { uint8_t *p; size_t len; };
static struct job g_q[QCAP];
static unsigned g_qhead, g_qtail; /* tail: next to take; head: next free */
static pthread_mutex_t g_qlock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_qcond = PTHREAD_COND_INITIALIZER;
static int g_helper; /* 1 running, -1 could not start */
static void run_job(struct job j) {
    size_t step = g_step;
    for (size_t off = 0; off < j.len; off += step) /* in order, each call no longer than the kernel reads */
        advise(j.p + off, j.len - off < step ? j.len - off : step, MADV_WILLNEED);
}

static void *helper(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&g_qlock);
        while (g_qtail == g_qhead) pthread_cond_wait(&g_qcond, &g_qlock);
        struct job j = g_q[g_qtail % QCAP];
        g_qtail++;
        pthread_mutex_unlock(&g_qlock);
        run_job(j);
    }
    return NULL;
}

static void submit(uint8_t *p, size_t len) {
    if (g_async && g_helper == 0) {
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        g_helper = pthread_create(&th, &at, helper, NULL) == 0 ? 1 : -1;
        pthread_attr_destroy(&at);
    }
    if (!g_async || g_helper < 0) {
        run_job((struct job){p, len});
        return;
    }
    pthread_mutex_lock(&g_qlock);
    int full = g_qhead - g_qtail >= QCAP;
    if (!full) g_q[g_qhead++ % QCAP] = (struct job){p, len};
    pthread_cond_signal(&g_qcond);
    pthread_mutex_unlock(&g_qlock);
    if (full) run_job((struct job){p, len});
}

/* Whether prefetch observes the top-k at all: only for a model whose load pass was dropped (it does not fit, or
 * GGUF_EXPERTS_PAGING_LOAD=skip). A model that fits is read whole at load: observing would only split the graph. */
static int g_observe = -1;
bool paging_observes(void) {
    if (g_paging != PAGING_PREFETCH || g_warned) return false;
    if (g_observe < 0) {
        pthread_mutex_lock(&g_plock);
        int any = 0;
        for (int i = 0; i < g_n_maps; i++) any |= g_maps[i].skip_load;
        if (g_n_maps > 0) g_observe = any;
        pthread_mutex_unlock(&g_plock);
        if (g_n_maps == 0) return true; /* not mapped yet (or never: then paging_graph warns) */
    }
    return g_observe;
}

/* The fault-path advice of every *_exps tensor of `layer` (GGUF_EXPERTS_PREFETCH_SEQ): sequential while it is read
 * whole, random otherwise. Changed only on a transition, in the thread that computes (before the matmul). */
static void layer_advice(int layer, int sequential) {
    if (!g_seq || layer < 0 || layer >= 4096 || g_seq_on[layer] == sequential) return;
    g_seq_on[layer] = (unsigned char)sequential;
    for (int i = 0; i < g_n_exps; i++)
        if (g_exps[i].layer == layer)
            advise(g_exps[i].data, g_exps[i].stride * (size_t)g_exps[i].n_exp,
                   sequential ? MADV_SEQUENTIAL : MADV_RANDOM);
}

/* Every *_exps tensor of `layer`, whole (the read-ahead of a next layer; marked so its own top-k skips it). */
static void submit_whole(int layer) {
    if (layer < 0) return;
    if (layer < 4096) g_whole_at[layer] = g_ubatch + 1;
    layer_advice(layer, 1);
    for (int i = 0; i < g_n_exps; i++)
        if (g_exps[i].layer == layer) submit(g_exps[i].data, g_exps[i].stride * (size_t)g_exps[i].n_exp);
}

/* The eval callback asks: observe this node? (the top-k of a layer, in prefetch mode) */
bool paging_wants(const struct gt *t) {
    return t->name[0] == 'f' && memcmp(t->name, "ffn_moe_topk-", 13) == 0 && paging_observes();
}

/* A layer's top-k has been computed: read ahead the selected experts' slices of every *_exps tensor of it. */
void paging_topk(const struct gt *t) {
    if (!paging_wants(t) || g_n_exps == 0) return;
    int layer = atoi(t->name + 13);
    int n_exp = 0;
    for (int i = 0; i < g_n_exps; i++)
        if (g_exps[i].layer == layer && g_exps[i].n_exp > n_exp) n_exp = g_exps[i].n_exp;
    if (n_exp <= 0 || t->type != GGML_TYPE_I32) return;
    REAL(tensor_get_t, tget, "ggml_backend_tensor_get");
    size_t nbytes = span_bytes(t);
    if (!tget || !nbytes || !t->buffer) return;
    static __thread uint8_t *buf;
    static __thread size_t cap;
    uint8_t *b = grow(buf, &cap, nbytes, 1);
    if (!b) return;
    buf = b;
    tget(t, b, 0, nbytes);
    uint8_t sel[4096];
    if (n_exp > (int)sizeof sel) return;
    memset(sel, 0, (size_t)n_exp);
    int count = 0;
    for (int64_t i3 = 0; i3 < t->ne[3]; i3++)
        for (int64_t i2 = 0; i2 < t->ne[2]; i2++)
            for (int64_t i1 = 0; i1 < t->ne[1]; i1++)
                for (int64_t i0 = 0; i0 < t->ne[0]; i0++) {
                    int32_t e;
                    memcpy(&e, b + i3 * t->nb[3] + i2 * t->nb[2] + i1 * t->nb[1] + i0 * t->nb[0], 4);
                    if (e >= 0 && e < n_exp && !sel[e]) sel[e] = 1, count++;
                }
    int whole = count >= g_whole * n_exp;
    if (whole) { /* this layer (unless read ahead already), then, with AHEAD, the next: the queue is in order */
        if (layer >= 4096 || g_whole_at[layer] != g_ubatch + 1) submit_whole(layer);
        if (g_ahead) submit_whole(layer + 1);
        return;
    }
    layer_advice(layer, 0);
    for (int i = 0; i < g_n_exps; i++) {
        struct exps *x = &g_exps[i];
        if (x->layer != layer) continue;
        for (int e = 0; e < x->n_exp && e < n_exp;) {
            if (!sel[e]) {
                e++;
                continue;
            }
            int e1 = e;
            while (e1 + 1 < x->n_exp && e1 + 1 < n_exp && sel[e1 + 1]) e1++;
            submit(x->data + (size_t)e * x->stride, (size_t)(e1 - e + 1) * x->stride);
            e = e1 + 1;
        }
    }
}
