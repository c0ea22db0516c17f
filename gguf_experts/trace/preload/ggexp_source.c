/* The sources of the data: the eval callback, and the keep-alive flags read once per ubatch. */
#include "ggexp.h"

/* ggml-backend entry points, found at run time (REAL) */
typedef void *(*tensor_backend_t)(void *sched, const struct gt *t);
typedef void (*tensor_get_async_t)(void *backend, const struct gt *t, void *data, size_t offset, size_t size);
typedef void (*tensor_get_2d_async_t)(void *backend, const struct gt *t, void *data, size_t offset, size_t size,
                                      size_t n_copies, size_t stride_tensor, size_t stride_data);
typedef void (*backend_sync_t)(void *backend);

typedef void *(*get_device_t)(void *backend);
typedef void *(*host_buft_t)(void *dev);
typedef void *(*buft_alloc_t)(void *buft, size_t size);
typedef void *(*buffer_base_t)(void *buffer);
typedef void (*buffer_free_t)(void *buffer);

/* ---- per-scheduler state: one ubatch's data ------------------------------------------------------------- */
#define MAX_SCHED 64
static struct sched_st *g_scheds[MAX_SCHED];
static int g_n_scheds;

struct sched_st *sched_of(void *sched, int create) {
    struct sched_st *s = NULL, *free_ent = NULL;
    static int warned;
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < g_n_scheds; i++) {
        if (g_scheds[i]->sched == sched) s = g_scheds[i];
        else if (!free_ent && !g_scheds[i]->sched) free_ent = g_scheds[i];
    }
    if (!s && create && sched) {
        if (free_ent) { /* a freed scheduler's entry (sched_release): a process that makes and frees many contexts */
            s = free_ent;
            s->sched = sched;
        } else if (g_n_scheds < MAX_SCHED) {
            s = calloc(1, sizeof *s);
            if (s) {
                s->sched = sched;
                g_scheds[g_n_scheds++] = s;
            }
        } else if (!warned) {
            warned = 1;
            say("gguf-experts: more than 64 llama.cpp schedulers alive at once; the newer ones are not traced\n",
                NULL, NULL);
        }
    }
    pthread_mutex_unlock(&g_lock);
    return s;
}

static void slots_free(struct sched_st *s, bool wait);
static void place_slots(struct sched_st *s);

/* The scheduler was freed: its entry becomes free for the next one (its grown scratch arrays are kept), its
 * device memory (pinned host buffer, top-k slots) is given back. */
static void sched_release(struct sched_st *s) {
    REAL(buffer_free_t, bfree, "ggml_backend_buffer_free");
    slots_free(s, false);
    if (s->pinned && bfree) bfree(s->pinned);
    s->pinned = NULL;
    s->pinned_base = NULL;
    s->cap_pinned = 0;
    s->active = s->keep_pending = s->copy_state = s->deferred = 0;
    s->n_keep = s->n_flagged = s->n_kept_meta = 0;
    if (s->prev) s->prev->active = 0;
    s->ctx = NULL;
    s->gf = NULL;
    s->gf_nodes = 0;
    s->gf_first = NULL;
    s->prog_cb = NULL;
    s->prog_ud = NULL;
    s->my_need = s->their_need = false;
    pthread_mutex_lock(&g_lock);
    s->sched = NULL;
    pthread_mutex_unlock(&g_lock);
}

/* A new in-process trace (ggexp_inproc.c): schedulers still alive start from a clean state (no pending ubatch). */
void sched_reset_all(void) {
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < g_n_scheds; i++) {
        g_scheds[i]->active = g_scheds[i]->keep_pending = g_scheds[i]->copy_state = g_scheds[i]->deferred = 0;
        if (g_scheds[i]->prev) g_scheds[i]->prev->active = 0;
        g_scheds[i]->ctx = NULL;
    }
    pthread_mutex_unlock(&g_lock);
}

/* ---- the callback source ------------------------------------------------------------------------------------ */
static bool ggexp_cb(struct gt *t, bool ask, void *ud) {
    struct sched_st *s = ud;
    if (ask) {
        int layer;
        s->my_need = s->active && !g_keepalive && !g_cost_probe && t->name[0] == 'f' && classify(t->name, &layer) >= 0;
        s->their_need = s->prog_cb ? s->prog_cb(t, true, s->prog_ud) : false;
        return s->my_need || s->their_need || paging_wants(t);
    }
    paging_topk(t); /* prefetch mode: this layer's selected experts are known (ggexp_paging.c) */
    if (s->my_need) {
        int layer, what = classify(t->name, &layer);
        if (what >= 0) take(s, t, what, layer, NULL, false);
    }
    if (s->their_need) return s->prog_cb(t, false, s->prog_ud);
    return true;
}

EXPORT void ggml_backend_sched_set_eval_callback(void *sched, eval_cb_t cb, void *ud) {
    REAL(set_cb_t, real, "ggml_backend_sched_set_eval_callback");
    if (!real) return;
    int paging = paging_observes(); /* prefetch observes the top-k nodes, traced or not */
    struct sched_st *s = g_enabled || paging ? sched_of(sched, 1) : NULL;
    if (!s) {
        real(sched, cb, ud);
        return;
    }
    s->prog_cb = cb;
    s->prog_ud = ud;
    /* keepalive installs no callback at all unless the program has one: the graph runs as untraced */
    if ((!g_enabled || g_keepalive) && !cb && !paging) real(sched, NULL, NULL);
    else real(sched, ggexp_cb, s);
}

/* ---- the keep-alive source: flag each layer's argsort (and weight stage) as a graph output ------------------ */
static void flag_graph(struct sched_st *s, void *gf) {
    REAL(graph_n_nodes_t, n_nodes, "ggml_graph_n_nodes");
    REAL(graph_node_t, node, "ggml_graph_node");
    if (!n_nodes || !node) return;
    int nn = n_nodes(gf);
    int last_stage[4096];
    if (g_weights) memset(last_stage, 0xff, sizeof last_stage);
    for (int pass = g_weights ? 0 : 1; pass < 2; pass++) {
        if (s && pass == 1) s->n_keep = s->n_flagged = 0;
        for (int i = 0; i < nn; i++) {
            struct gt *t = node(gf, i);
            int layer, what;
            if (!t || t->name[0] != 'f' || (what = classify(t->name, &layer)) < 0) continue;
            if (pass == 0) {
                if (what > 0 && what - 1 > last_stage[layer]) last_stage[layer] = what - 1;
                continue;
            }
            if (what > 0 && what - 1 != last_stage[layer]) continue;
            /* a named node may be a view (ffn_moe_topk of the argsort; gpt-oss's ffn_moe_weights_softmax is a
             * reshape of the unnamed softmax): keep its source alive, or its memory is reused */
            struct gt *keep = t->view_src ? t->view_src : t;
            if (s && !(keep->flags & FLAG_OUTPUT)) { /* ours to clear again before the compute */
                size_t capf = (size_t)s->cap_flagged;
                struct gt **f = grow(s->flagged, &capf, (size_t)s->n_flagged + 1, sizeof *f);
                if (f) {
                    s->flagged = f;
                    s->cap_flagged = (int)capf;
                    s->flagged[s->n_flagged++] = keep;
                }
            }
            keep->flags |= FLAG_OUTPUT;
            if (s) {
                size_t cap = (size_t)s->cap_keep;
                struct gt **v = grow(s->keep, &cap, (size_t)s->n_keep + 1, sizeof *v);
                if (!v) continue;
                s->keep = v;
                s->cap_keep = (int)cap;
                s->keep[s->n_keep++] = t;
            }
        }
    }
    if (s) place_slots(s);
}

/* ---- device slots: every kept argsort and weight stage of a graph computed into one buffer of ours ----------
 * Flagged as outputs, the kept tensors lie wherever the allocator put them, apart (prefill: one 2-D copy per
 * layer), and the allocator plans the graph around tensors that never free. Placed by us, side by side in one
 * device buffer before the scheduler allocates the graph (ggml-alloc leaves allocated tensors alone; the scheduler
 * runs a pre-allocated node on its buffer's backend), the graph is planned as untraced and a ubatch's ids are one
 * range (decode) or one 2-D copy (prefill). Measured on H100s (docs/capture.md, "Device slots"): decode 0.2-4.6
 * points faster than the flags alone. Only where the router runs on a device that can compute them (the buffer of
 * its weight is not host memory); elsewhere the flags stay. GGUF_EXPERTS_SLOTS=0 turns it off (measurements); =host places them in
 * host memory too (the CPU tests of this path). */
typedef void *(*buffer_type_t)(void *buffer);
typedef bool (*buft_is_host_t)(void *buft);
typedef int (*sched_n_backends_t)(void *sched);
typedef void *(*sched_backend_t)(void *sched, int i);
typedef bool (*supports_buft_t)(void *backend, void *buft);
typedef bool (*supports_op_t)(void *backend, const struct gt *op);
typedef void *(*default_buft_t)(void *backend);
typedef size_t (*buft_size_t)(void *buft);
typedef size_t (*buft_alloc_size_t)(void *buft, const struct gt *t);
typedef int (*tensor_alloc_t)(void *buffer, struct gt *t, void *addr);

static int slots_mode(void) {
    static int mode = -1;
    if (mode < 0) {
        const char *e = getenv("GGUF_EXPERTS_SLOTS");
        mode = e && strcmp(e, "0") == 0 ? 0 : e && strcmp(e, "host") == 0 ? 2 : 1;
        if (e && *e && mode == 1 && strcmp(e, "1") != 0)
            say("gguf-experts: GGUF_EXPERTS_SLOTS=%s is not 0, 1 or host; using 1 (slots on a device)\n", e, NULL);
    }
    return mode;
}

/* The buffer of the model weight nearest above t (the router's ffn_gate_inp, a few ops up): it decides where the
 * scheduler runs the router, and so the argsort. */
static void *router_buffer(const struct gt *t) {
    const struct gt *q[64];
    int n = 0, depth[64];
    q[n] = t;
    depth[n++] = 0;
    for (int i = 0; i < n; i++) {
        const struct gt *u = q[i];
        if (u->buffer && u->op == 0 && memcmp(u->name, "blk.", 4) == 0) return u->buffer; /* GGML_OP_NONE: a leaf */
        if (depth[i] >= 6) continue;
        for (int j = 0; j < 10 && n < 64; j++)
            if (u->src[j]) {
                q[n] = u->src[j];
                depth[n++] = depth[i] + 1;
            }
    }
    return NULL;
}

/* ``wait``: the backend is alive and may still compute into the slots or copy from them (a bigger graph); not at
 * the scheduler's free, when llama.cpp may have freed the backend already (the buffer's free needs none). */
static void slots_free(struct sched_st *s, bool wait) {
    REAL(buffer_free_t, bfree, "ggml_backend_buffer_free");
    REAL(backend_sync_t, bsync, "ggml_backend_synchronize");
    if (!s->slot_buf || !bfree) return;
    if (wait && bsync && s->slot_be) bsync(s->slot_be);
    bfree(s->slot_buf);
    s->slot_buf = s->slot_be = NULL;
    s->slot_base = NULL;
    s->slot_cap = 0;
}

static void place_slots(struct sched_st *s) {
    int mode = slots_mode();
    if (!mode || !s->n_keep || !s->sched) return;
    REAL(buffer_type_t, buf_type, "ggml_backend_buffer_get_type");
    REAL(buft_is_host_t, is_host, "ggml_backend_buft_is_host");
    REAL(sched_n_backends_t, n_backends, "ggml_backend_sched_get_n_backends");
    REAL(sched_backend_t, sched_backend, "ggml_backend_sched_get_backend");
    REAL(supports_buft_t, supports_buft, "ggml_backend_supports_buft");
    REAL(supports_op_t, supports_op, "ggml_backend_supports_op");
    REAL(default_buft_t, default_buft, "ggml_backend_get_default_buffer_type");
    REAL(buft_size_t, buft_align, "ggml_backend_buft_get_alignment");
    REAL(buft_alloc_size_t, alloc_size, "ggml_backend_buft_get_alloc_size");
    REAL(buft_alloc_t, alloc, "ggml_backend_buft_alloc_buffer");
    REAL(buffer_base_t, base, "ggml_backend_buffer_get_base");
    REAL(tensor_alloc_t, tensor_alloc, "ggml_backend_tensor_alloc");
    if (!buf_type || !is_host || !n_backends || !sched_backend || !supports_buft || !supports_op || !default_buft
        || !buft_align || !alloc_size || !alloc || !base || !tensor_alloc)
        return;
    /* the backend: that of the first kept tensor's router weight; kept tensors routed elsewhere keep their flags */
    void *be = NULL, *buft = NULL;
    for (int i = 0; i < s->n_keep && !be; i++) {
        void *wb = router_buffer(s->keep[i]);
        if (!wb) continue;
        void *wbt = buf_type(wb);
        if (is_host(wbt) && mode != 2) continue; /* partial offload: the first layers' routers on the CPU */
        int nb = n_backends(s->sched);
        for (int j = 0; j < nb && !be; j++) {
            void *b = sched_backend(s->sched, j);
            if (b && supports_buft(b, wbt)) be = b;
        }
    }
    if (!be || !(buft = default_buft(be))) return;
    if (is_host(buft) && mode != 2) return;
    size_t align = buft_align(buft), total = 0;
    if (!align) align = 64;
    /* the layout: top-ks first, then the weight stages, each in graph (layer) order */
    struct gt **roots = malloc((size_t)s->n_keep * sizeof *roots);
    size_t *offs = malloc((size_t)s->n_keep * sizeof *offs);
    int n = 0;
    if (!roots || !offs) goto done; /* the flags keep them */
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < s->n_keep; i++) {
            int layer, what = classify(s->keep[i]->name, &layer);
            if ((what == 0) != (pass == 0)) continue;
            struct gt *r = s->keep[i]->view_src ? s->keep[i]->view_src : s->keep[i];
            if (r->data || r->buffer || r->view_src || !supports_op(be, r)) continue;
            bool placed = false; /* two kept names over one tensor (a reshape of a weight stage) */
            for (int j = 0; j < n && !placed; j++) placed = roots[j] == r;
            if (placed) continue;
            void *wb = router_buffer(r);
            if (!wb || !supports_buft(be, buf_type(wb))) continue; /* routed on another backend */
            total = (total + align - 1) / align * align;
            roots[n] = r;
            offs[n++] = total;
            total += alloc_size(buft, r);
        }
    if (!n) goto done;
    if (!s->slot_buf || s->slot_be != be || s->slot_cap < total) {
        slots_free(s, true);
        size_t cap = total + total / 4;
        s->slot_buf = alloc(buft, cap);
        if (!s->slot_buf) goto done;
        s->slot_base = base(s->slot_buf);
        s->slot_be = be;
        s->slot_cap = cap;
    }
    for (int i = 0; i < n; i++) tensor_alloc(s->slot_buf, roots[i], s->slot_base + offs[i]);
done:
    free(roots);
    free(offs);
}

/* A host buffer of at least `need` bytes from the device's host buffer type (pinned memory on CUDA): an async
 * copy into pageable memory is a synchronous round trip each. NULL where the device has none (the CPU). */
static uint8_t *pinned_buffer(struct sched_st *s, void *backend, size_t need) {
    if (s->pinned && s->cap_pinned >= need) return s->pinned_base;
    REAL(get_device_t, get_device, "ggml_backend_get_device");
    REAL(host_buft_t, host_buft, "ggml_backend_dev_host_buffer_type");
    REAL(buft_alloc_t, alloc, "ggml_backend_buft_alloc_buffer");
    REAL(buffer_base_t, base, "ggml_backend_buffer_get_base");
    REAL(buffer_free_t, bfree, "ggml_backend_buffer_free");
    if (!get_device || !host_buft || !alloc || !base || !bfree) return NULL;
    void *dev = get_device(backend);
    void *buft = dev ? host_buft(dev) : NULL;
    if (!buft) return NULL;
    if (s->pinned) bfree(s->pinned);
    size_t cap = need < 65536 ? 65536 : need + need / 2;
    s->pinned = alloc(buft, cap);
    s->pinned_base = s->pinned ? base(s->pinned) : NULL;
    s->cap_pinned = s->pinned_base ? cap : 0;
    return s->pinned_base;
}

/* How a kept tensor is copied to the host: `dense` rows of ne[0] values (a strided view such as ffn_moe_topk, the
 * first k columns of the argsort: only those k ids per row, one 2-D copy), or its whole contiguous span. */
static size_t kept_bytes(const struct gt *t, bool *dense) {
    *dense = t->nb[0] == 4 && t->ne[2] == 1 && t->ne[3] == 1 && t->ne[1] > 1 && t->nb[1] != 4 * (size_t)t->ne[0];
    return *dense ? (size_t)(t->ne[0] * t->ne[1]) * 4 : span_bytes(t);
}
#define ALIGN16(n) (((n) + 15) & ~(size_t)15)

/* Contiguous kept tensors (decode's one-row top-k, the weights) closer than this in one device buffer are copied as
 * one range: a small device-to-host copy costs ~2 us of the stream whatever its size, 16 KB of gap less than that. */
#define COALESCE_GAP 16384

struct kspan { uintptr_t start; size_t n; void *be, *buf; int i; };

static int kspan_cmp(const void *a, const void *b) {
    const struct kspan *x = a, *y = b;
    if (x->be != y->be) return (uintptr_t)x->be < (uintptr_t)y->be ? -1 : 1;
    if (x->buf != y->buf) return (uintptr_t)x->buf < (uintptr_t)y->buf ? -1 : 1;
    return x->start < y->start ? -1 : x->start > y->start;
}

/* A 1-D tensor of 4-byte elements that describes `len` bytes at `start` of a kept tensor's buffer: the source of
 * one copy that covers several kept tensors. */
static void describe_range(struct gt *r, const struct gt *like, void *buf, uintptr_t start, size_t len) {
    memcpy(r, like, sizeof *r);
    r->type = GGML_TYPE_I32;
    r->ne[0] = (int64_t)((len + 3) / 4);
    r->ne[1] = r->ne[2] = r->ne[3] = 1;
    r->nb[0] = 4;
    r->nb[1] = r->nb[2] = r->nb[3] = (size_t)r->ne[0] * 4;
    r->buffer = buf;
    r->view_src = NULL;
    r->view_offs = 0;
    r->data = (void *)start;
}

/* Where the dense run [a, b) of sorted strided top-k views ends (b): views of one backend and buffer with the same
 * k and row stride, each starting a whole number of rows after the last one's end (within COALESCE_GAP): then
 * one 2-D copy reads them all, the rows in between (slot padding) included. */
static int dense_run(const struct sched_st *s, const struct kspan *sp, int n, int a) {
    const struct gt *t0 = s->keep[sp[a].i];
    uintptr_t end = sp[a].start + (size_t)t0->ne[1] * t0->nb[1];
    int b = a + 1;
    for (; b < n; b++) {
        const struct gt *t = s->keep[sp[b].i];
        if (sp[b].be != sp[a].be || sp[b].buf != sp[a].buf || t->ne[0] != t0->ne[0] || t->nb[1] != t0->nb[1]
            || sp[b].start < end || sp[b].start - end > COALESCE_GAP || (sp[b].start - end) % t0->nb[1])
            break;
        end = sp[b].start + (size_t)t->ne[1] * t->nb[1];
    }
    return b;
}

/* The rows a dense run [a, b) spans, from its first view's first row to its last view's last (padding included). */
static size_t dense_rows(const struct sched_st *s, const struct kspan *sp, int a, int b) {
    return (sp[b - 1].start - sp[a].start) / s->keep[sp[a].i]->nb[1] + (size_t)s->keep[sp[b - 1].i]->ne[1];
}

/* Where the run [a, b) of sorted contiguous kept tensors ends: gaps within COALESCE_GAP are copied along. */
static int range_run(const struct kspan *sp, int n, int a, uintptr_t *end) {
    *end = sp[a].start + sp[a].n;
    int b = a + 1;
    for (; b < n && sp[b].be == sp[a].be && sp[b].buf == sp[a].buf && sp[b].start <= *end + COALESCE_GAP; b++)
        if (sp[b].start + sp[b].n > *end) *end = sp[b].start + sp[b].n;
    return b;
}

/* Queue the copies of every kept layer of the ubatch just computed, right after the scheduler queued the graph,
 * into one pinned host buffer: strided top-k views (prefill) as 2-D copies of their k ids per row, contiguous ones
 * (decode's top-k, the weights) as ranges, both sorted by address and merged where the layout allows (in device
 * slots, place_slots: one copy for all layers). They run on the device's stream after the graph, so the
 * scheduler's next synchronisation finds them done: no extra round trip. Backends without async copies (the CPU)
 * copy at once, which is right: a CPU split is done when compute_async returns. s->koff[i]: where kept tensor i
 * lands in the host buffer (for a strided view, its k ids per row, packed). */
void issue_kept(struct sched_st *s) {
    s->copy_state = 0;
    if (!s->active || g_cost_probe == COST_FLAGS || s->n_keep == 0) return;
    REAL(tensor_backend_t, backend_of, "ggml_backend_sched_get_tensor_backend");
    REAL(tensor_get_async_t, get_async, "ggml_backend_tensor_get_async");
    REAL(tensor_get_2d_async_t, get_2d_async, "ggml_backend_tensor_get_2d_async");
    REAL(backend_sync_t, bsync, "ggml_backend_synchronize");
    if (!backend_of || !get_async || !bsync || !s->sched) return;
    size_t cap = (size_t)s->cap_koff;
    size_t *koff = grow(s->koff, &cap, (size_t)s->n_keep, sizeof *koff);
    if (!koff) return;
    s->koff = koff;
    s->cap_koff = (int)cap;
    cap = (size_t)s->cap_spans;
    struct kspan *sp = grow(s->spans, &cap, 2 * (size_t)s->n_keep, sizeof *sp);
    if (!sp) return;
    s->spans = sp;
    s->cap_spans = (int)cap;
    struct kspan *dsp = sp + s->n_keep; /* the strided views */
    int n_sp = 0, n_dsp = 0;
    for (int i = 0; i < s->n_keep; i++) {
        const struct gt *t = s->keep[i];
        bool dense;
        size_t n = kept_bytes(t, &dense);
        koff[i] = 0;
        if (!n) continue;
        void *be = backend_of(s->sched, t);
        if (!be) return; /* not the scheduler's: read synchronously at the flush */
        if (dense && !get_2d_async) return; /* an older ggml: synchronous strided reads at the flush */
        struct kspan k = {(uintptr_t)t->data, n, be, t->view_src ? t->view_src->buffer : t->buffer, i};
        if (dense) dsp[n_dsp++] = k;
        else sp[n_sp++] = k;
    }
    qsort(dsp, (size_t)n_dsp, sizeof *dsp, kspan_cmp);
    qsort(sp, (size_t)n_sp, sizeof *sp, kspan_cmp);
    /* the layout: the dense runs' packed rows first, then the ranges */
    size_t total = 0;
    for (int a = 0, b; a < n_dsp; a = b) {
        b = dense_run(s, dsp, n_dsp, a);
        const struct gt *t0 = s->keep[dsp[a].i];
        size_t row = 4 * (size_t)t0->ne[0];
        for (int j = a; j < b; j++) koff[dsp[j].i] = total + (dsp[j].start - dsp[a].start) / t0->nb[1] * row;
        total += ALIGN16(dense_rows(s, dsp, a, b) * row);
    }
    for (int a = 0, b; a < n_sp; a = b) {
        uintptr_t end;
        b = range_run(sp, n_sp, a, &end);
        for (int j = a; j < b; j++) koff[sp[j].i] = total + (sp[j].start - sp[a].start);
        total += ALIGN16(end - sp[a].start);
    }
    if (!total) return;
    uint8_t *buf = NULL;
    void *be0 = n_dsp ? dsp[0].be : sp[0].be;
    buf = pinned_buffer(s, be0, total); /* pinned memory where the kept tensors' device offers it */
    if (!buf) {
        size_t c2 = s->cap_kbuf;
        buf = grow(s->kbuf, &c2, total, 1);
        if (!buf) return;
        s->kbuf = buf;
        s->cap_kbuf = c2;
    }
    s->n_copy_backends = 0;
#define NOTE_BACKEND(be) do { \
        int seen_ = 0; \
        __atomic_add_fetch(&g_copy_calls, 1L, __ATOMIC_RELAXED); \
        for (int j_ = 0; j_ < s->n_copy_backends; j_++) seen_ |= s->copy_backends[j_] == (be); \
        if (!seen_ && s->n_copy_backends < 16) s->copy_backends[s->n_copy_backends++] = (be); \
    } while (0)
    for (int a = 0, b; a < n_dsp; a = b) {
        b = dense_run(s, dsp, n_dsp, a);
        const struct gt *t0 = s->keep[dsp[a].i];
        size_t row = 4 * (size_t)t0->ne[0], rows = dense_rows(s, dsp, a, b);
        struct gt r; /* the run's bytes, from its first view's data */
        describe_range(&r, t0, dsp[a].buf, dsp[a].start, (rows - 1) * t0->nb[1] + row);
        get_2d_async(dsp[a].be, &r, buf + koff[dsp[a].i], 0, row, rows, t0->nb[1], row);
        NOTE_BACKEND(dsp[a].be);
    }
    for (int a = 0, b; a < n_sp; a = b) {
        uintptr_t end;
        b = range_run(sp, n_sp, a, &end);
        size_t len = end - sp[a].start;
        struct gt r;
        describe_range(&r, s->keep[sp[a].i], sp[a].buf, sp[a].start, len);
        get_async(sp[a].be, &r, buf + koff[sp[a].i], 0, len);
        NOTE_BACKEND(sp[a].be);
    }
#undef NOTE_BACKEND
    s->copy_buf = buf;
    s->copy_state = 1;
    __atomic_add_fetch(&g_copy_ubatches, 1L, __ATOMIC_RELAXED);
}

static void emit_prev(struct sched_st *s);

/* Read every kept layer of the ubatch computed last, once the scheduler has synchronised: the copies queued by
 * issue_kept (one synchronisation per backend, normally already done), or, where they could not be queued, one
 * synchronous copy per layer (ggml_backend_tensor_get, honouring the view's strides). */
void read_kept(struct sched_st *s) {
    emit_prev(s); /* records in ubatch order */
    s->keep_pending = 0;
    if (!s->active) return;
    if (g_cost_probe == COST_FLAGS) { /* measurement: the flags' cost alone */
        for (int l = 0; l < s->n_layers; l++) s->layers[l].have = 0;
        s->active = 0;
        return;
    }
    REAL(backend_sync_t, bsync, "ggml_backend_synchronize");
    bool copied = s->copy_state == 1 && bsync;
    if (copied)
        for (int j = 0; j < s->n_copy_backends; j++) bsync(s->copy_backends[j]);
    s->copy_state = 0;
    for (int i = 0; i < s->n_keep; i++) {
        bool dense;
        kept_bytes(s->keep[i], &dense);
        int layer, what = classify(s->keep[i]->name, &layer);
        if (what >= 0) take(s, s->keep[i], what, layer, copied ? s->copy_buf + s->koff[i] : NULL, copied && dense);
    }
    emit(s);
}

void flush_pending(struct sched_st *s, void *sched) {
    if (!s || !s->keep_pending) return;
    REAL(sync_t, sync, "ggml_backend_sched_synchronize");
    if (sync && g_cost_probe != COST_FLAGS) sync(sched); /* the flags' cost alone reads nothing: no wait */
    read_kept(s);
}

/* ---- deferred reading (prefill): the next graph is built while the last ubatch's copies are in flight ---------
 * llama.cpp resets the scheduler before it builds each new graph; reading there (a synchronisation, then the
 * records) would keep the host from building, allocating and filling the next graph while the device computes the
 * last one, which an untraced run overlaps. Where the copies were queued into our own host buffer (issue_kept), the
 * data needs nothing from the graph but the kept tensors' shapes: keep copies of those and read later, at the
 * next graph's compute (whose scheduler waits for the device there anyway), and write the records at the next
 * point that needs them, before it waits (emit_prev), so that the CRC and the write() overlap the device too. */
static void defer_pending(struct sched_st *s) {
    size_t cap = (size_t)s->cap_kept_meta;
    struct gt *m = grow(s->kept_meta, &cap, (size_t)(s->n_keep > 0 ? s->n_keep : 1), sizeof *m);
    if (!m) return; /* the caller reads now */
    s->kept_meta = m;
    s->cap_kept_meta = (int)cap;
    for (int i = 0; i < s->n_keep; i++) memcpy(&m[i], s->keep[i], sizeof *m);
    s->n_kept_meta = s->n_keep;
    s->keep_pending = 0;
    s->deferred = 1;
}

/* Wait for the deferred ubatch's copies (queued after its graph: the device is done with it). */
static void wait_deferred(struct sched_st *s) {
    REAL(backend_sync_t, bsync, "ggml_backend_synchronize");
    if (bsync)
        for (int j = 0; j < s->n_copy_backends; j++) bsync(s->copy_backends[j]);
}

/* The deferred ubatch's data from the host buffer into its layers, its copies done; no records yet. */
static void take_deferred(struct sched_st *s) {
    s->deferred = 0;
    s->copy_state = 0;
    if (!s->active) return;
    for (int i = 0; i < s->n_kept_meta; i++) {
        bool dense;
        kept_bytes(&s->kept_meta[i], &dense);
        int layer, what = classify(s->kept_meta[i].name, &layer);
        if (what >= 0) take(s, &s->kept_meta[i], what, layer, s->copy_buf + s->koff[i], dense);
    }
}

static void complete_deferred(struct sched_st *s) {
    emit_prev(s);
    if (!s || !s->deferred) return;
    wait_deferred(s);
    take_deferred(s);
    if (s->active) emit(s);
}

/* The state of one ubatch (what prepare fills and emit reads), exchanged between s and s->prev. */
static void swap_ubatch(struct sched_st *a, struct sched_st *b) {
#define SW(f) do { __typeof__(a->f) t_ = a->f; a->f = b->f; b->f = t_; } while (0)
    SW(active); SW(ctx); SW(n_tok); SW(n_out); SW(cap_tok); SW(tok); SW(pos); SW(out_ids); SW(row_seq);
    SW(row_phase); SW(layers); SW(n_layers); SW(touched_any); SW(io0); SW(io1); SW(seq_resolved);
#undef SW
}

/* The records of the ubatch read at the last compute (s->prev, pending while its active is set), written at the
 * next point that needs them in order: before the next synchronisation waits (the device computes meanwhile), or
 * before anything else reads or resets. */
static void emit_prev(struct sched_st *s) {
    if (!s || !s->prev || !s->prev->active) return;
    swap_ubatch(s, s->prev);
    PROF(4, emit(s));
    swap_ubatch(s, s->prev);
}

EXPORT bool ggml_backend_sched_reserve(void *sched, void *graph) {
    REAL(alloc_t, real, "ggml_backend_sched_reserve");
    if (!real) return false;
    if (g_enabled && g_keepalive) { /* the allocator plans here: flags set only at alloc time are ignored */
        emit_prev(sched_of(sched, 0));
        complete_deferred(sched_of(sched, 0));
        flush_pending(sched_of(sched, 0), sched);
        flag_graph(NULL, graph);
    }
    return real(sched, graph);
}

EXPORT bool ggml_backend_sched_alloc_graph(void *sched, void *graph) {
    REAL(alloc_t, real, "ggml_backend_sched_alloc_graph");
    if (!real) return false;
    if (g_enabled && g_keepalive) {
        struct sched_st *s = sched_of(sched, 1);
        flush_pending(s, sched);
        if (s && (!g_inproc || tl_decode)) PROF(7, flag_graph(s, graph));
    }
    return real(sched, graph);
}

EXPORT void ggml_backend_sched_synchronize(void *sched) {
    REAL(sync_t, real, "ggml_backend_sched_synchronize");
    if (!real) return;
    if (g_enabled && g_keepalive) emit_prev(sched_of(sched, 0)); /* while the device still computes */
    real(sched);
    if (g_enabled && g_keepalive) {
        struct sched_st *s = sched_of(sched, 0);
        complete_deferred(s);
        if (s && s->keep_pending) read_kept(s);
    }
}

EXPORT void ggml_backend_sched_reset(void *sched) {
    REAL(sync_t, real, "ggml_backend_sched_reset");
    if (!real) return;
    if (g_enabled && g_keepalive) {
        struct sched_st *s = sched_of(sched, 0);
        emit_prev(s);
        complete_deferred(s); /* two resets without a compute between them */
        if (s && s->keep_pending && s->copy_state == 1) PROF(0, defer_pending(s));
        PROF(1, flush_pending(s, sched)); /* not deferred: read now */
    }
    real(sched);
    PROF_MARK();
}

EXPORT void ggml_backend_sched_free(void *sched) {
    REAL(sync_t, real, "ggml_backend_sched_free");
    if (!real) return;
    if (g_enabled && sched) {
        struct sched_st *s = sched_of(sched, 0);
        if (g_keepalive) {
            emit_prev(s);
            complete_deferred(s);
            flush_pending(s, sched);
        }
        if (s) sched_release(s); /* the address may be reused by a new scheduler; the entry by any */
    }
    real(sched);
}

EXPORT int ggml_backend_sched_graph_compute_async(void *sched, void *graph) {
    REAL(compute_t, real, "ggml_backend_sched_graph_compute_async");
    if (!real) return 1;
    if (g_paging) paging_graph(graph);
    if (!g_enabled) return real(sched, graph);
    PROF_SINCE_MARK(8);
    struct sched_st *s = sched_of(sched, g_keepalive);
    if (!s) return real(sched, graph);
    emit_prev(s);
    PROF(1, flush_pending(s, sched));
    /* a deferred ubatch: its data now (the scheduler would wait for its graph before ours anyway), its trace
     * sequences numbered before ours is prepared, its records written later from its own state (emit_prev) */
    if (s->deferred) {
        PROF(2, wait_deferred(s); take_deferred(s));
        if (!s->prev) s->prev = calloc(1, sizeof *s->prev);
        if (s->active && s->prev) { /* s->prev is free: emit_prev above */
            PROF(3, resolve_seqs(s));
            swap_ubatch(s, s->prev);
        } else if (s->active) {
            emit(s);
        }
    }
    PROF(5, prepare(s, graph));
    if (g_keepalive) {
        /* The allocator planned this graph with our flags (kept alive, never reused in place); the flags have
         * done their work. Cleared now, the backend sees the graph as untraced: a flagged argsort or weight
         * stage would stop ggml-cuda's fused top-k MoE kernel (ggml_can_fuse refuses intermediate outputs). */
        for (int i = 0; i < s->n_flagged; i++) s->flagged[i]->flags &= ~FLAG_OUTPUT;
        s->n_flagged = 0;
    }
    int st = real(sched, graph);
    if (s->active) io_snap(&s->io1); /* synchronous on the CPU; a GPU backend may return before it finished */
    if (s->active) {
        if (st != 0) s->active = 0;
        else if (g_keepalive) {
            s->keep_pending = 1;
            PROF(6, issue_kept(s));
        } else {
            emit(s);
        }
    }
    return st;
}

