/* The sources of the data: the eval callback, and the keep-alive flags read once per ubatch. */
#include "ggexp.h"

/* ---- per-scheduler state: one ubatch's data ------------------------------------------------------------- */
#define MAX_SCHED 64
static struct sched_st *g_scheds[MAX_SCHED];
static int g_n_scheds;

struct sched_st *sched_of(void *sched, int create) {
    struct sched_st *s = NULL;
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < g_n_scheds; i++)
        if (g_scheds[i]->sched == sched) s = g_scheds[i];
    if (!s && create && g_n_scheds < MAX_SCHED) {
        s = calloc(1, sizeof *s);
        if (s) {
            s->sched = sched;
            g_scheds[g_n_scheds++] = s;
        }
    }
    pthread_mutex_unlock(&g_lock);
    return s;
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
}

/* Read every kept layer of the ubatch computed last, once the scheduler has synchronised. */
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

/* Queue the copies of every kept layer of the ubatch just computed, right after the scheduler queued the graph,
 * into one pinned host buffer: a strided top-k view (prefill) as one 2-D copy of its k ids per row; contiguous ones
 * (decode's top-k, the weights) sorted by address and copied as few ranges as their layout allows. They run on the
 * device's stream after the graph, so the scheduler's next synchronisation finds them done: no extra round trip.
 * Backends without async copies (the CPU) copy at once, which is right: a CPU split is done when compute_async
 * returns. s->koff[i]: where kept tensor i lands in the host buffer. */
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
    struct kspan *sp = grow(s->spans, &cap, (size_t)s->n_keep, sizeof *sp);
    if (!sp) return;
    s->spans = sp;
    s->cap_spans = (int)cap;
    /* the layout: dense copies first, then the contiguous tensors as merged ranges */
    size_t total = 0;
    int n_sp = 0;
    for (int i = 0; i < s->n_keep; i++) {
        const struct gt *t = s->keep[i];
        bool dense;
        size_t n = kept_bytes(t, &dense);
        void *be = n ? backend_of(s->sched, t) : NULL;
        if (n && !be) return; /* not the scheduler's: read synchronously at the flush */
        if (dense && !get_2d_async) return; /* an older ggml: synchronous strided reads at the flush */
        if (dense || !n) {
            koff[i] = total;
            total += ALIGN16(n);
        } else {
            sp[n_sp++] = (struct kspan){(uintptr_t)t->data, n, be, t->view_src ? t->view_src->buffer : t->buffer, i};
        }
    }
    qsort(sp, (size_t)n_sp, sizeof *sp, kspan_cmp);
    size_t range_total = 0;
    for (int a = 0, b; a < n_sp; a = b) { /* ranges [a, b): one backend and buffer, gaps within COALESCE_GAP */
        uintptr_t end = sp[a].start + sp[a].n;
        for (b = a + 1; b < n_sp && sp[b].be == sp[a].be && sp[b].buf == sp[a].buf && sp[b].start <= end + COALESCE_GAP; b++)
            if (sp[b].start + sp[b].n > end) end = sp[b].start + sp[b].n;
        for (int j = a; j < b; j++) koff[sp[j].i] = total + range_total + (sp[j].start - sp[a].start);
        range_total += ALIGN16(end - sp[a].start);
    }
    size_t dense_total = total;
    total += range_total;
    if (!total) return;
    uint8_t *buf = NULL;
    void *be0 = backend_of(s->sched, s->keep[0]);
    if (be0) buf = pinned_buffer(s, be0, total); /* pinned memory where the kept tensors' device offers it */
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
        for (int j_ = 0; j_ < s->n_copy_backends; j_++) seen_ |= s->copy_backends[j_] == (be); \
        if (!seen_ && s->n_copy_backends < 16) s->copy_backends[s->n_copy_backends++] = (be); \
    } while (0)
    for (int i = 0; i < s->n_keep; i++) {
        const struct gt *t = s->keep[i];
        bool dense;
        size_t n = kept_bytes(t, &dense);
        if (!dense || !n) continue;
        void *be = backend_of(s->sched, t);
        get_2d_async(be, t, buf + koff[i], 0, 4 * (size_t)t->ne[0], (size_t)t->ne[1], t->nb[1], 4 * (size_t)t->ne[0]);
        NOTE_BACKEND(be);
    }
    size_t off = dense_total;
    for (int a = 0, b; a < n_sp; a = b) {
        uintptr_t end = sp[a].start + sp[a].n;
        for (b = a + 1; b < n_sp && sp[b].be == sp[a].be && sp[b].buf == sp[a].buf && sp[b].start <= end + COALESCE_GAP; b++)
            if (sp[b].start + sp[b].n > end) end = sp[b].start + sp[b].n;
        size_t len = end - sp[a].start;
        if (b == a + 1) {
            get_async(sp[a].be, s->keep[sp[a].i], buf + off, 0, len);
        } else { /* a tensor that describes the range: the first one's buffer, 1-D, 4-byte elements */
            struct gt r;
            memcpy(&r, s->keep[sp[a].i], sizeof r);
            r.type = GGML_TYPE_I32;
            r.ne[0] = (int64_t)(len / 4);
            r.ne[1] = r.ne[2] = r.ne[3] = 1;
            r.nb[0] = 4;
            r.nb[1] = r.nb[2] = r.nb[3] = len;
            r.buffer = sp[a].buf;
            r.view_src = NULL;
            r.view_offs = 0;
            r.data = (void *)sp[a].start;
            get_async(sp[a].be, &r, buf + off, 0, len);
        }
        NOTE_BACKEND(sp[a].be);
        off += ALIGN16(len);
    }
#undef NOTE_BACKEND
    s->copy_buf = buf;
    s->copy_state = 1;
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
        if (s) s->sched = NULL; /* the address may be reused by a new scheduler */
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

