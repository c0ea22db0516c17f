/* gguf-experts run: an LD_PRELOAD tracer of llama.cpp's expert routing, in plain C (no C++ runtime, no libpython).
 *
 * Why a preload: llama.cpp calls ggml_backend_sched_set_eval_callback (libllama -> libggml-base, through the
 * PLT) every time it builds a graph, so defining that symbol here installs our callback in any program built
 * with shared libraries (llama-server, llama-cli, llama-cpp-python apps), unchanged. See docs/run.md.
 *
 * Environment (set by `gguf-experts run`, or by hand):
 *   GGUF_EXPERTS_TRACE=path   the trace.bin to write (unset: the library only forwards, it records nothing)
 *   GGUF_EXPERTS_WEIGHTS=1    also record the gate weights the model applies (the last weight stage)
 *   GGUF_EXPERTS_MODE=callback|keepalive   how the data is obtained (the "source"; records are the same)
 *
 * Structure: "sources" get each MoE layer's top-k ids (and weights) of one ubatch into a sched_st (callback:
 * the eval callback observes ffn_moe_topk-N; keepalive: the argsort is flagged as a graph output so it stays
 * alive, and is read after the compute). The "reading" part maps ubatch rows to token, position, sequence and
 * phase and appends CRC'd trace.bin v1 records (docs/trace-format.md), one write() per ubatch.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <link.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

/* ---- the few ggml / llama declarations we need (stable ABI, 64-bit) ------------------------------------ */
struct gt { /* struct ggml_tensor */
    int32_t type;
    void *buffer;
    int64_t ne[4];
    size_t nb[4];
    int32_t op;
    int32_t op_params[16];
    int32_t flags;
    struct gt *src[10];
    struct gt *view_src;
    size_t view_offs;
    void *data;
    char name[64];
    void *extra;
    char padding[8];
};
_Static_assert(offsetof(struct gt, ne) == 16, "ggml_tensor.ne");
_Static_assert(offsetof(struct gt, flags) == 148, "ggml_tensor.flags");
_Static_assert(offsetof(struct gt, view_src) == 232, "ggml_tensor.view_src");
_Static_assert(offsetof(struct gt, name) == 256, "ggml_tensor.name");
_Static_assert(sizeof(struct gt) == 336, "ggml_tensor size");

#define GGML_TYPE_F32 0
#define GGML_TYPE_I32 26
#define FLAG_OUTPUT 2

typedef struct llama_batch {
    int32_t n_tokens;
    int32_t *token;
    float *embd;
    int32_t *pos;
    int32_t *n_seq_id;
    int32_t **seq_id;
    int8_t *logits;
} llama_batch;

struct gguf_init_params { bool no_alloc; void **ctx; };

typedef bool (*eval_cb_t)(struct gt *t, bool ask, void *ud);
typedef void (*set_cb_t)(void *sched, eval_cb_t cb, void *ud);
typedef int (*compute_t)(void *sched, void *graph);
typedef bool (*alloc_t)(void *sched, void *graph);
typedef void (*sync_t)(void *sched);
typedef int32_t (*decode_t)(void *ctx, llama_batch batch);
typedef void *(*gguf_init_t)(const char *fname, struct gguf_init_params p);
typedef void (*tensor_get_t)(const struct gt *t, void *data, size_t offset, size_t size);
typedef struct gt *(*graph_get_t)(void *graph, const char *name);
typedef int (*graph_n_nodes_t)(void *graph);
typedef struct gt *(*graph_node_t)(void *graph, int i);
typedef void *(*get_model_t)(void *ctx);
typedef int32_t (*meta_str_t)(const void *model, const char *key, char *buf, size_t size);
typedef int64_t (*gguf_find_t)(const void *g, const char *key);
typedef int (*gguf_kvtype_t)(const void *g, int64_t id);
typedef uint32_t (*gguf_u32_t)(const void *g, int64_t id);
typedef uint16_t (*gguf_u16_t)(const void *g, int64_t id);
typedef const char *(*gguf_str_t)(const void *g, int64_t id);

/* ---- symbol resolution ---------------------------------------------------------------------------------- */
typedef void *(*dlsym_t)(void *, const char *);
static dlsym_t real_dlsym_fn;
static __thread int in_dlsym;

static dlsym_t rdlsym(void) {
    if (!real_dlsym_fn) {
        static const char *versions[] = {"GLIBC_2.34", "GLIBC_2.2.5", "GLIBC_2.17", "GLIBC_2.0", NULL};
        for (int i = 0; versions[i] && !real_dlsym_fn; i++)
            real_dlsym_fn = (dlsym_t)dlvsym(RTLD_NEXT, "dlsym", versions[i]);
    }
    return real_dlsym_fn;
}

static void *self_base(void) {
    Dl_info di;
    return dladdr((void *)rdlsym, &di) ? di.dli_fbase : NULL;
}

struct names { char *v[256]; int n; };
static int collect_cb(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    struct names *w = data;
    if (info->dlpi_name && info->dlpi_name[0] && w->n < 256) w->v[w->n++] = strdup(info->dlpi_name);
    return 0;
}

/* The definition of `name` that is not ours: RTLD_NEXT first (programs linked against the libraries), then
 * every loaded object (libraries a program dlopen()ed with RTLD_LOCAL are not in the global scope). */
static void *find_real(const char *name) {
    dlsym_t ds = rdlsym();
    if (!ds) return NULL;
    void *me = self_base();
    void *p = ds(RTLD_NEXT, name);
    Dl_info di;
    if (p && !(dladdr(p, &di) && di.dli_fbase == me)) return p;
    struct names w = {.n = 0};
    dl_iterate_phdr(collect_cb, &w);
    void *found = NULL;
    for (int i = 0; i < w.n; i++) {
        if (!found) {
            void *h = dlopen(w.v[i], RTLD_LAZY | RTLD_NOLOAD);
            if (h) {
                void *q = ds(h, name);
                if (q && !(dladdr(q, &di) && di.dli_fbase == me)) found = q;
                dlclose(h);
            }
        }
        free(w.v[i]);
    }
    return found;
}

#define REAL(type, var, name) \
    static type var; \
    if (!var) var = (type)find_real(name)

/* ---- configuration ---------------------------------------------------------------------------------------- */
static char g_path[PATH_MAX];
static int g_enabled, g_weights, g_keepalive;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_fd = -1, g_seq_fd = -1, g_header_done, g_failed;
static int32_t g_next_seq;
static long g_unmatched, g_warmup, g_rows;

static void say(const char *fmt, const char *a, const char *b) {
    char buf[1024];
    int n = snprintf(buf, sizeof buf, fmt, a ? a : "", b ? b : "");
    if (n > 0) {
        if (n > (int)sizeof buf - 1) n = sizeof buf - 1;
        ssize_t r = write(2, buf, (size_t)n);
        (void)r;
    }
}

__attribute__((constructor)) static void ggexp_init(void) {
    const char *p = getenv("GGUF_EXPERTS_TRACE");
    if (!p || !*p) return;
    if (strlen(p) >= sizeof g_path) {
        say("gguf-experts: GGUF_EXPERTS_TRACE is too long a path; not tracing\n", NULL, NULL);
        return;
    }
    strcpy(g_path, p);
    const char *w = getenv("GGUF_EXPERTS_WEIGHTS");
    g_weights = w && *w && strcmp(w, "0") != 0;
    const char *m = getenv("GGUF_EXPERTS_MODE");
    g_keepalive = m && strcmp(m, "keepalive") == 0;
    if (m && *m && !g_keepalive && strcmp(m, "callback") != 0)
        say("gguf-experts: GGUF_EXPERTS_MODE=%s is not callback or keepalive; using callback\n", m, NULL);
    rdlsym();
    g_enabled = 1;
}

/* ---- models ------------------------------------------------------------------------------------------------- */
struct model_ent {
    char path[PATH_MAX];
    char arch[64];
    uint32_t n_layer, n_expert, k, n_embd;
    void *model; /* the llama_model bound to this file (first model whose metadata matches) */
    int traced;
};
#define MAX_MODELS 16
static struct model_ent g_models[MAX_MODELS];
static int g_n_models, g_main = -1;

static long gguf_uint(void *g, const char *key) {
    REAL(gguf_find_t, find, "gguf_find_key");
    REAL(gguf_kvtype_t, kvtype, "gguf_get_kv_type");
    REAL(gguf_u32_t, u32, "gguf_get_val_u32");
    REAL(gguf_u16_t, u16, "gguf_get_val_u16");
    if (!find || !kvtype || !u32 || !u16) return -1;
    int64_t id = find(g, key);
    if (id < 0) return -1;
    int t = kvtype(g, id);
    if (t == 4 || t == 5) return (long)u32(g, id); /* UINT32, INT32 (same bits) */
    if (t == 2 || t == 3) return (long)u16(g, id);
    if (t == 10 || t == 11) { /* (U)INT64: read through the u32 getter is refused by ggml; rare for these keys */
        return -1;
    }
    return -1;
}

/* Every GGUF llama.cpp opens comes through here (libllama -> libggml-base): remember MoE model files. */
EXPORT void *gguf_init_from_file(const char *fname, struct gguf_init_params params) {
    REAL(gguf_init_t, real, "gguf_init_from_file");
    if (!real) return NULL;
    void *g = real(fname, params);
    if (!g || !g_enabled || !fname) return g;
    REAL(gguf_find_t, find, "gguf_find_key");
    REAL(gguf_str_t, str, "gguf_get_val_str");
    if (!find || !str) return g;
    int64_t id = find(g, "general.architecture");
    if (id < 0) return g;
    long split_no = gguf_uint(g, "split.no");
    if (split_no > 0) return g; /* later shards of a split model: the first shard names the model */
    const char *arch = str(g, id);
    char key[160];
    snprintf(key, sizeof key, "%s.expert_count", arch);
    long n_expert = gguf_uint(g, key);
    snprintf(key, sizeof key, "%s.expert_used_count", arch);
    long k = gguf_uint(g, key);
    if (n_expert <= 0 || k <= 0) return g;
    pthread_mutex_lock(&g_lock);
    if (g_n_models < MAX_MODELS) {
        struct model_ent *m = &g_models[g_n_models++];
        memset(m, 0, sizeof *m);
        if (!realpath(fname, m->path)) snprintf(m->path, sizeof m->path, "%s", fname);
        snprintf(m->arch, sizeof m->arch, "%s", arch);
        snprintf(key, sizeof key, "%s.block_count", arch);
        m->n_layer = (uint32_t)gguf_uint(g, key);
        snprintf(key, sizeof key, "%s.embedding_length", arch);
        m->n_embd = (uint32_t)gguf_uint(g, key);
        m->n_expert = (uint32_t)n_expert;
        m->k = (uint32_t)k;
    }
    pthread_mutex_unlock(&g_lock);
    return g;
}

static uint32_t meta_u32(void *model, const char *arch, const char *what) {
    REAL(meta_str_t, meta, "llama_model_meta_val_str");
    char key[160], buf[64];
    if (!meta) return 0;
    snprintf(key, sizeof key, "%s.%s", arch, what);
    if (meta(model, key, buf, sizeof buf) < 0) return 0;
    return (uint32_t)strtoul(buf, NULL, 10);
}

/* The model entry of a llama_model: bind it to the first unbound file with the same metadata. Only the first
 * MoE model is traced; any other (a speculative draft) is skipped with one message. Called under g_lock. */
static struct model_ent *model_of(void *model) {
    for (int i = 0; i < g_n_models; i++)
        if (g_models[i].model == model) return &g_models[i];
    REAL(meta_str_t, meta, "llama_model_meta_val_str");
    char arch[64];
    if (!model || !meta || meta(model, "general.architecture", arch, sizeof arch) < 0) return NULL;
    for (int i = 0; i < g_n_models; i++) {
        struct model_ent *m = &g_models[i];
        if (m->model || strcmp(m->arch, arch) != 0) continue;
        if (meta_u32(model, arch, "expert_count") != m->n_expert || meta_u32(model, arch, "expert_used_count") != m->k
            || meta_u32(model, arch, "block_count") != m->n_layer
            || meta_u32(model, arch, "embedding_length") != m->n_embd)
            continue;
        m->model = model;
        if (g_main < 0) {
            g_main = i;
            m->traced = 1;
        } else if (strcmp(m->path, g_models[g_main].path) == 0) {
            m->traced = 1; /* the same file loaded again (another instance): the same model, traced */
        } else {
            say("gguf-experts: not tracing a second model, %s (e.g. a speculative draft); the trace holds %s\n",
                m->path, g_models[g_main].path);
        }
        return m;
    }
    return NULL;
}

static void *grow(void *p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return p;
    size_t n = *cap ? *cap : 64;
    while (n < need) n *= 2;
    void *q = realloc(p, n * elem);
    if (!q) return NULL;
    *cap = n;
    return q;
}

/* ---- contexts and sequences ---------------------------------------------------------------------------- */
struct seq_st {
    int32_t last_pos, trace_seq, requests, first_pos;
    uint8_t seen, last_phase, last_out;
};
struct ctx_st {
    void *ctx;
    struct model_ent *m;
    int index;
    struct seq_st *seqs;
    int n_seqs;
    int n_decodes;
};
#define MAX_CTX 64
static struct ctx_st g_ctxs[MAX_CTX];
static int g_n_ctxs;
static struct ctx_st g_noctx; /* rows decoded through a llama_decode we did not see */

static struct seq_st *seq_of(struct ctx_st *c, int32_t seq) {
    if (seq < 0) seq = 0;
    if (seq >= c->n_seqs) {
        int n = c->n_seqs ? c->n_seqs : 8;
        while (n <= seq) n *= 2;
        struct seq_st *v = realloc(c->seqs, (size_t)n * sizeof *v);
        if (!v) return NULL;
        memset(v + c->n_seqs, 0, (size_t)(n - c->n_seqs) * sizeof *v);
        c->seqs = v;
        c->n_seqs = n;
    }
    return &c->seqs[seq];
}

static struct ctx_st *ctx_of(void *ctx) {
    for (int i = 0; i < g_n_ctxs; i++)
        if (g_ctxs[i].ctx == ctx) return &g_ctxs[i];
    if (g_n_ctxs >= MAX_CTX) return NULL;
    REAL(get_model_t, get_model, "llama_get_model");
    struct ctx_st *c = &g_ctxs[g_n_ctxs];
    memset(c, 0, sizeof *c);
    c->ctx = ctx;
    c->index = g_n_ctxs++;
    c->m = get_model ? model_of(get_model(ctx)) : NULL;
    return c;
}

/* what llama_decode was given, for the ubatches it computes (thread-local: one decode per thread at a time) */
struct decode_st {
    void *ctx;
    int n;
    int32_t *tok, *pos, *seq, *cnt;
    uint8_t *used, *allout; /* allout: every row of this row's sequence in the batch asks for an output */
    int last_j;
    int skip; /* llama.cpp's start-up probes (warm-up, seq_rm check): not a request, not recorded */
};
static __thread struct decode_st *tl_decode;
static decode_t g_real_decode;

/* Rows of one llama_decode / llama_process call, copied (tok/pos may be NULL: not given) before the call. */
static int decode_begin(struct decode_st *d, void *ctx, int n) {
    memset(d, 0, sizeof *d);
    d->ctx = ctx;
    d->n = n;
    d->last_j = -1;
    int32_t *mem = malloc((size_t)n * (4 * sizeof(int32_t) + 3));
    if (!mem) return -1;
    d->tok = mem;
    d->pos = mem + n;
    d->seq = mem + 2 * n;
    d->cnt = mem + 3 * n;
    d->used = (uint8_t *)(mem + 4 * n);
    d->allout = d->used + n;
    memset(d->used, 0, (size_t)n);
    return 0;
}

typedef void *(*get_vocab_t)(const void *model);
typedef int32_t (*vocab_tok_t)(const void *vocab);

/* out[i]: row i asks for an output. Fills cnt/allout, and flags llama.cpp's start-up probes: common's warm-up
 * decodes [bos, eos] and its partial-removal check decodes [0, 0], each as a context's first decodes, on
 * sequence 0 at positions 0, 1, and clears the memory right after; they are not requests. */
static void decode_finish(struct decode_st *d, const uint8_t *out) {
    int n = d->n;
    for (int i = 0; i < n; i++) {
        int c = 0, o = 0;
        if (i > 0 && d->seq[i] == d->seq[i - 1]) {
            d->cnt[i] = d->cnt[i - 1];
            d->allout[i] = d->allout[i - 1];
            continue;
        }
        for (int j = 0; j < n; j++) {
            if (d->seq[j] != d->seq[i]) continue;
            c++;
            o += out[j];
        }
        d->cnt[i] = c;
        d->allout[i] = o == c;
    }
    pthread_mutex_lock(&g_lock);
    struct ctx_st *c = ctx_of(d->ctx);
    int early = c && c->n_decodes++ < 3;
    pthread_mutex_unlock(&g_lock);
    if (!early || n > 2 || d->seq[0] != 0 || (n == 2 && d->seq[1] != 0) || d->pos[0] > 0) return;
    REAL(get_model_t, get_model, "llama_get_model");
    REAL(get_vocab_t, get_vocab, "llama_model_get_vocab");
    REAL(vocab_tok_t, bos_of, "llama_vocab_bos");
    REAL(vocab_tok_t, eos_of, "llama_vocab_eos");
    if (!get_model || !get_vocab || !bos_of || !eos_of) return;
    void *vocab = get_vocab(get_model(d->ctx));
    int32_t bos = bos_of(vocab), eos = eos_of(vocab);
    bool warmup = (n == 2 && d->tok[0] == bos && d->tok[1] == eos) || (n == 1 && (d->tok[0] == bos || d->tok[0] == eos));
    bool probe = n == 2 && d->tok[0] == 0 && d->tok[1] == 0;
    if (warmup || probe) {
        d->skip = 1;
        __atomic_add_fetch(&g_warmup, 1, __ATOMIC_RELAXED);
    }
}

EXPORT int32_t llama_decode(void *ctx, llama_batch batch) {
    if (!g_real_decode) g_real_decode = (decode_t)find_real("llama_decode");
    if (!g_real_decode) return -1;
    int n = batch.n_tokens;
    struct decode_st d;
    if (!g_enabled || n <= 0 || decode_begin(&d, ctx, n) < 0) return g_real_decode(ctx, batch);
    uint8_t *out = d.used + 2 * n;
    for (int i = 0; i < n; i++) {
        d.tok[i] = batch.token ? batch.token[i] : -1;
        d.pos[i] = batch.pos ? batch.pos[i] : -1; /* -1: llama.cpp infers it; matched on the token only */
        d.seq[i] = (batch.seq_id && batch.n_seq_id && batch.n_seq_id[i] > 0) ? batch.seq_id[i][0] : 0;
        out[i] = batch.logits ? batch.logits[i] != 0 : i == n - 1; /* no logits array: the last row only */
    }
    decode_finish(&d, out);
    struct decode_st *prev = tl_decode;
    tl_decode = &d;
    int32_t r = g_real_decode(ctx, batch);
    tl_decode = prev;
    free(d.tok);
    return r;
}

/* ---- the extended batch API (llama_batch_ext_*, llama_process): an opaque C++ object, so we keep a shadow
 * of what the program put in it, through the C functions it uses to fill it ------------------------------- */
struct shadow {
    void *batch;
    int n, cap;
    int32_t *tok, *pos, *seq;
    uint8_t *out;
};
#define MAX_SHADOWS 64
static struct shadow g_shadows[MAX_SHADOWS];
static pthread_mutex_t g_shadow_lock = PTHREAD_MUTEX_INITIALIZER;

static struct shadow *shadow_of(void *batch) {
    struct shadow *free_slot = NULL;
    for (int i = 0; i < MAX_SHADOWS; i++) {
        if (g_shadows[i].batch == batch) return &g_shadows[i];
        if (!g_shadows[i].batch && !free_slot) free_slot = &g_shadows[i];
    }
    if (free_slot) {
        free_slot->batch = batch;
        free_slot->n = 0;
    }
    return free_slot;
}

static void shadow_put(void *batch, int32_t idx, int32_t seq, int32_t tok) {
    if (!g_enabled || idx < 0) return;
    pthread_mutex_lock(&g_shadow_lock);
    struct shadow *b = shadow_of(batch);
    if (b && idx >= b->cap) {
        size_t c = (size_t)b->cap, c2 = c, c3 = c, c4 = c;
        b->tok = grow(b->tok, &c, (size_t)idx + 1, 4);
        b->pos = grow(b->pos, &c2, (size_t)idx + 1, 4);
        b->seq = grow(b->seq, &c3, (size_t)idx + 1, 4);
        b->out = grow(b->out, &c4, (size_t)idx + 1, 1);
        if (!b->tok || !b->pos || !b->seq || !b->out) b->batch = NULL, b = NULL;
        else b->cap = (int)c;
    }
    if (b) {
        b->tok[idx] = tok;
        b->pos[idx] = -1;
        b->seq[idx] = seq;
        b->out[idx] = 0;
        if (idx >= b->n) b->n = idx + 1;
    }
    pthread_mutex_unlock(&g_shadow_lock);
}

typedef int32_t (*bx_add_tok_t)(void *, int32_t, int32_t);
typedef int32_t (*bx_add_t)(void *, int32_t);
struct llama_embd { const float *data; size_t n_rows, n_embd; };
typedef int32_t (*bx_add_embd_t)(void *, int32_t, struct llama_embd);
typedef bool (*bx_set_pos_t)(void *, int32_t, const int32_t *);
typedef bool (*bx_set_out_t)(void *, int32_t, bool);
typedef void (*bx_void_t)(void *);
typedef int32_t (*process_t)(void *ctx, int type, void *batch);

EXPORT int32_t llama_batch_ext_add_token(void *batch, int32_t seq, int32_t id) {
    REAL(bx_add_tok_t, real, "llama_batch_ext_add_token");
    int32_t idx = real ? real(batch, seq, id) : -1;
    shadow_put(batch, idx, seq, id);
    return idx;
}

EXPORT int32_t llama_batch_ext_add(void *batch, int32_t seq) {
    REAL(bx_add_t, real, "llama_batch_ext_add");
    int32_t idx = real ? real(batch, seq) : -1;
    shadow_put(batch, idx, seq, -1);
    return idx;
}

EXPORT int32_t llama_batch_ext_add_embd(void *batch, int32_t seq, struct llama_embd embd) {
    REAL(bx_add_embd_t, real, "llama_batch_ext_add_embd");
    int32_t idx = real ? real(batch, seq, embd) : -1;
    shadow_put(batch, idx, seq, -1);
    return idx;
}

EXPORT bool llama_batch_ext_set_pos(void *batch, int32_t idx, const int32_t *pos) {
    REAL(bx_set_pos_t, real, "llama_batch_ext_set_pos");
    bool ok = real ? real(batch, idx, pos) : false;
    if (ok && g_enabled && pos) {
        pthread_mutex_lock(&g_shadow_lock);
        struct shadow *b = shadow_of(batch);
        if (b && idx >= 0 && idx < b->n) b->pos[idx] = pos[0];
        pthread_mutex_unlock(&g_shadow_lock);
    }
    return ok;
}

static bool set_out(const char *name, void *batch, int32_t idx, bool value) {
    bx_set_out_t real = (bx_set_out_t)find_real(name);
    bool ok = real ? real(batch, idx, value) : false;
    if (ok && g_enabled) {
        pthread_mutex_lock(&g_shadow_lock);
        struct shadow *b = shadow_of(batch);
        if (b && idx >= 0 && idx < b->n) b->out[idx] = value;
        pthread_mutex_unlock(&g_shadow_lock);
    }
    return ok;
}

EXPORT bool llama_batch_ext_set_output_logits(void *batch, int32_t idx, bool value) {
    return set_out("llama_batch_ext_set_output_logits", batch, idx, value);
}

EXPORT bool llama_batch_ext_set_output_embd(void *batch, int32_t idx, bool value) {
    return set_out("llama_batch_ext_set_output_embd", batch, idx, value);
}

static void shadow_reset(void *batch, int drop) {
    if (!g_enabled) return;
    pthread_mutex_lock(&g_shadow_lock);
    for (int i = 0; i < MAX_SHADOWS; i++)
        if (g_shadows[i].batch == batch) {
            g_shadows[i].n = 0;
            if (drop) g_shadows[i].batch = NULL;
        }
    pthread_mutex_unlock(&g_shadow_lock);
}

EXPORT void llama_batch_ext_clear(void *batch) {
    REAL(bx_void_t, real, "llama_batch_ext_clear");
    if (real) real(batch);
    shadow_reset(batch, 0);
}

EXPORT void llama_batch_ext_free(void *batch) {
    REAL(bx_void_t, real, "llama_batch_ext_free");
    shadow_reset(batch, 1);
    if (real) real(batch);
}

EXPORT int32_t llama_process(void *ctx, int type, void *batch) {
    REAL(process_t, real, "llama_process");
    if (!real) return -1;
    if (!g_enabled || type != 1 /* LLAMA_PROCESS_TYPE_DECODE */) return real(ctx, type, batch);
    struct decode_st d;
    pthread_mutex_lock(&g_shadow_lock);
    struct shadow *b = shadow_of(batch);
    int n = b ? b->n : 0;
    int ok = n > 0 && decode_begin(&d, ctx, n) == 0;
    if (ok) {
        memcpy(d.tok, b->tok, 4 * (size_t)n);
        memcpy(d.pos, b->pos, 4 * (size_t)n);
        memcpy(d.seq, b->seq, 4 * (size_t)n);
        memcpy(d.used + 2 * n, b->out, (size_t)n);
    }
    pthread_mutex_unlock(&g_shadow_lock);
    if (!ok) return real(ctx, type, batch);
    decode_finish(&d, d.used + 2 * n);
    struct decode_st *prev = tl_decode;
    tl_decode = &d;
    int32_t r = real(ctx, type, batch);
    tl_decode = prev;
    free(d.tok);
    return r;
}

/* Python (ctypes) resolves llama_decode with dlsym on libllama's own handle, which a preload does not
 * intercept: hand back our wrapper for that one name. Everything else is the real dlsym's answer. */
EXPORT void *dlsym(void *handle, const char *name) {
    dlsym_t ds = rdlsym();
    if (!ds) return NULL;
    void *r = ds(handle, name);
    if (r && g_enabled && !in_dlsym && name[0] == 'l' && strcmp(name, "llama_decode") == 0
        && r != (void *)llama_decode) {
        in_dlsym = 1;
        if (!g_real_decode) g_real_decode = (decode_t)r;
        in_dlsym = 0;
        if (g_real_decode == (decode_t)r) return (void *)llama_decode;
    }
    return r;
}

/* ---- per-scheduler state: one ubatch's data ------------------------------------------------------------- */
struct layer_buf {
    int rows, wrows, wstage, cap;
    int32_t *ids;
    float *w;
    uint8_t have;
};
struct sched_st {
    void *sched;
    eval_cb_t prog_cb;
    void *prog_ud;
    bool my_need, their_need;
    int active; /* this ubatch is traced */
    struct ctx_st *ctx;
    /* graph inputs, cached per graph */
    void *gf;
    int gf_nodes;
    struct gt *gf_first, *t_tok, *t_pos, *t_out;
    /* the ubatch */
    int n_tok, n_out, cap_tok;
    int32_t *tok, *pos, *out_ids;
    int32_t *row_seq; /* llama seq id of each row */
    uint8_t *row_phase;
    struct layer_buf *layers;
    int n_layers;
    int touched_any;
    /* keepalive: the argsort and weight nodes flagged in this graph */
    struct gt **keep;
    int n_keep, cap_keep, keep_pending;
    /* scratch */
    uint8_t *scratch, *kbuf;
    size_t cap_scratch, cap_kbuf;
    uint8_t *out;
    size_t n_outbuf, cap_outbuf;
};
#define MAX_SCHED 64
static struct sched_st *g_scheds[MAX_SCHED];
static int g_n_scheds;

static struct sched_st *sched_of(void *sched, int create) {
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


/* Copy a graph tensor (any backend) as [rows, k], honouring its own ne/nb (ffn_moe_topk is a strided view). */
static size_t span_bytes(const struct gt *t) {
    if (t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3] == 0) return 0;
    return 4 + (size_t)(t->ne[0] - 1) * t->nb[0] + (size_t)(t->ne[1] - 1) * t->nb[1]
           + (size_t)(t->ne[2] - 1) * t->nb[2] + (size_t)(t->ne[3] - 1) * t->nb[3];
}

/* Copy a graph tensor (any backend) as [rows, k], honouring its own ne/nb (ffn_moe_topk is a strided view).
 * ``span``: the tensor's bytes already copied to the host (keep-alive's async copies), or NULL to copy here. */
static int read_rows(struct sched_st *s, const struct gt *t, int k, void *dst, int max_rows, const uint8_t *span) {
    REAL(tensor_get_t, tget, "ggml_backend_tensor_get");
    if ((!tget && !span) || (t->type != GGML_TYPE_I32 && t->type != GGML_TYPE_F32) || k <= 0) return -1;
    int64_t total = t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
    if (total % k || total / k > max_rows) return -1;
    if (total == 0) return 0;
    size_t nbytes = span_bytes(t);
    bool contiguous = t->nb[0] == 4 && t->nb[1] == 4 * (size_t)t->ne[0] && t->nb[2] == t->nb[1] * (size_t)t->ne[1]
                      && t->nb[3] == t->nb[2] * (size_t)t->ne[2];
    if (contiguous) {
        if (span) memcpy(dst, span, nbytes);
        else tget(t, dst, 0, nbytes);
        return (int)(total / k);
    }
    const uint8_t *b = span;
    if (!b) {
        size_t cap = s->cap_scratch;
        uint8_t *sc = grow(s->scratch, &cap, nbytes, 1);
        if (!sc) return -1;
        s->scratch = sc;
        s->cap_scratch = cap;
        tget(t, sc, 0, nbytes);
        b = sc;
    }
    uint32_t *o = dst;
    for (int64_t i3 = 0; i3 < t->ne[3]; i3++)
        for (int64_t i2 = 0; i2 < t->ne[2]; i2++)
            for (int64_t i1 = 0; i1 < t->ne[1]; i1++) {
                const uint8_t *row = b + i3 * t->nb[3] + i2 * t->nb[2] + i1 * t->nb[1];
                for (int64_t i0 = 0; i0 < t->ne[0]; i0++) memcpy(o++, row + i0 * t->nb[0], 4);
            }
    return (int)(total / k);
}

/* ---- which nodes: names ------------------------------------------------------------------------------------ */
static const char *const WEIGHT_STAGES[] = {"weights", "weights_softmax", "weights_norm", "weights_scaled"};
#define N_STAGES 4

/* -1 not observed; 0 top-k; 1 + stage for a weight stage (with --weights). *layer gets the block index. */
static int classify(const char *name, int *layer) {
    if (memcmp(name, "ffn_moe_", 8) != 0) return -1;
    const char *rest = name + 8, *dash = strchr(rest, '-');
    if (!dash || dash[1] < '0' || dash[1] > '9') return -1;
    size_t len = (size_t)(dash - rest);
    int what = -1;
    if (len == 4 && memcmp(rest, "topk", 4) == 0) what = 0;
    else if (g_weights && len >= 7 && memcmp(rest, "weights", 7) == 0) {
        for (int i = 0; i < N_STAGES; i++)
            if (strlen(WEIGHT_STAGES[i]) == len && memcmp(rest, WEIGHT_STAGES[i], len) == 0) what = 1 + i;
    }
    if (what < 0) return -1;
    long l = strtol(dash + 1, NULL, 10);
    if (l < 0 || l >= 4096) return -1;
    *layer = (int)l;
    return what;
}

static struct layer_buf *layer_buf(struct sched_st *s, int layer) {
    if (layer >= s->n_layers) {
        int n = layer + 1;
        struct layer_buf *v = realloc(s->layers, (size_t)n * sizeof *v);
        if (!v) return NULL;
        memset(v + s->n_layers, 0, (size_t)(n - s->n_layers) * sizeof *v);
        s->layers = v;
        s->n_layers = n;
    }
    struct layer_buf *lb = &s->layers[layer];
    size_t cap = (size_t)lb->cap;
    size_t need = (size_t)(s->n_tok > 0 ? s->n_tok : 1) * (size_t)s->ctx->m->k;
    if (need > cap) {
        size_t c2 = cap;
        int32_t *ids = grow(lb->ids, &c2, need, 4);
        if (!ids) return NULL;
        lb->ids = ids;
        float *w = realloc(lb->w, c2 * 4);
        if (!w) return NULL;
        lb->w = w;
        lb->cap = (int)c2;
    }
    return lb;
}

/* The data of one observed node (top-k or a weight stage) of this ubatch. */
static void take(struct sched_st *s, const struct gt *t, int what, int layer, const uint8_t *span) {
    struct model_ent *m = s->ctx->m;
    int k = (int)m->k;
    if (what == 0 && t->ne[0] != k) { /* warm-up graph: n_expert_used = n_expert */
        __atomic_add_fetch(&g_warmup, 1, __ATOMIC_RELAXED);
        return;
    }
    if (layer >= (int)m->n_layer) return;
    struct layer_buf *lb = layer_buf(s, layer);
    if (!lb) return;
    if (what == 0) {
        int rows = read_rows(s, t, k, lb->ids, s->n_tok, span);
        if (rows < 0) return;
        lb->rows = rows;
        lb->have = 1;
        s->touched_any = 1;
    } else if (what - 1 >= lb->wstage) { /* the last stage the graph builds is the one the model applies */
        if (t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3] % k) return;
        int rows = read_rows(s, t, k, lb->w, s->n_tok, span);
        if (rows < 0) return;
        lb->wrows = rows;
        lb->wstage = what - 1;
    }
}

/* ---- the callback source ------------------------------------------------------------------------------------ */
static bool ggexp_cb(struct gt *t, bool ask, void *ud) {
    struct sched_st *s = ud;
    if (ask) {
        int layer;
        s->my_need = s->active && !g_keepalive && t->name[0] == 'f' && classify(t->name, &layer) >= 0;
        s->their_need = s->prog_cb ? s->prog_cb(t, true, s->prog_ud) : false;
        return s->my_need || s->their_need;
    }
    if (s->my_need) {
        int layer, what = classify(t->name, &layer);
        if (what >= 0) take(s, t, what, layer, NULL);
    }
    if (s->their_need) return s->prog_cb(t, false, s->prog_ud);
    return true;
}

EXPORT void ggml_backend_sched_set_eval_callback(void *sched, eval_cb_t cb, void *ud) {
    REAL(set_cb_t, real, "ggml_backend_sched_set_eval_callback");
    if (!real) return;
    struct sched_st *s = g_enabled ? sched_of(sched, 1) : NULL;
    if (!s) {
        real(sched, cb, ud);
        return;
    }
    s->prog_cb = cb;
    s->prog_ud = ud;
    /* keepalive installs no callback at all unless the program has one: the graph runs as untraced */
    if (g_keepalive && !cb) real(sched, NULL, NULL);
    else real(sched, ggexp_cb, s);
}

/* ---- the ubatch: rows -> token, position, sequence, phase ------------------------------------------------- */
static bool row_matches(const struct decode_st *d, int i, const struct sched_st *s, int r) {
    return (!d->tok || !s->t_tok || d->tok[i] < 0 || d->tok[i] == s->tok[r])
           && (!s->t_pos || d->pos[i] < 0 || d->pos[i] == s->pos[r]);
}

static void find_inputs(struct sched_st *s, void *gf) {
    REAL(graph_n_nodes_t, n_nodes, "ggml_graph_n_nodes");
    REAL(graph_node_t, node, "ggml_graph_node");
    REAL(graph_get_t, get, "ggml_graph_get_tensor");
    if (!n_nodes || !node || !get) {
        s->t_tok = s->t_pos = s->t_out = NULL;
        return;
    }
    int nn = n_nodes(gf);
    struct gt *first = nn > 0 ? node(gf, 0) : NULL;
    if (gf == s->gf && nn == s->gf_nodes && first == s->gf_first) return; /* the same graph (reused) */
    s->gf = gf;
    s->gf_nodes = nn;
    s->gf_first = first;
    s->t_tok = get(gf, "inp_tokens");
    s->t_pos = get(gf, "inp_pos");
    s->t_out = get(gf, "out_ids");
}

static int read_i32(const struct gt *t, int32_t *dst, int n) {
    REAL(tensor_get_t, tget, "ggml_backend_tensor_get");
    if (!tget || !t || t->type != GGML_TYPE_I32 || t->ne[0] < n || !t->buffer) return -1;
    tget(t, dst, 0, (size_t)n * 4);
    return 0;
}

/* Map each row of the ubatch about to be computed to the llama_decode batch row it came from (llama.cpp may
 * split a batch into ubatches and, with one KV stream per sequence, group rows by sequence): the batch row after
 * the previous match if it has the same token and position, else the first unused batch row that does. */
static void prepare(struct sched_st *s, void *gf) {
    s->active = 0;
    s->touched_any = 0;
    struct decode_st *d = tl_decode;
    if (d && d->skip) return;
    pthread_mutex_lock(&g_lock);
    struct ctx_st *c = d ? ctx_of(d->ctx) : &g_noctx;
    if (c == &g_noctx && !c->m && g_n_models > 0) { /* a llama_decode we did not see: the first MoE model */
        if (g_main < 0) {
            g_main = 0;
            g_models[0].traced = 1;
        }
        c->m = &g_models[g_main];
    }
    pthread_mutex_unlock(&g_lock);
    if (!c || !c->m || !c->m->traced || g_failed) return;
    s->ctx = c;
    find_inputs(s, gf);
    int n = s->t_tok ? (int)s->t_tok->ne[0] : (s->t_pos ? (int)s->t_pos->ne[0] : 0);
    if (n <= 0) return;
    size_t cap = (size_t)s->cap_tok, need = (size_t)n;
    if (need > cap) {
        size_t c1 = cap, c2 = cap, c3 = cap, c4 = cap, c5 = cap;
        s->tok = grow(s->tok, &c1, need, 4);
        s->pos = grow(s->pos, &c2, need, 4);
        s->out_ids = grow(s->out_ids, &c3, need, 4);
        s->row_seq = grow(s->row_seq, &c4, need, sizeof *s->row_seq);
        s->row_phase = grow(s->row_phase, &c5, need, 2);
        if (!s->tok || !s->pos || !s->out_ids || !s->row_seq || !s->row_phase) {
            s->cap_tok = 0;
            return;
        }
        s->cap_tok = (int)c1;
    }
    s->n_tok = n;
    if (read_i32(s->t_tok, s->tok, n) < 0)
        for (int r = 0; r < n; r++) s->tok[r] = -1;
    if (read_i32(s->t_pos, s->pos, n) < 0)
        for (int r = 0; r < n; r++) s->pos[r] = r;
    s->n_out = s->t_out ? (int)s->t_out->ne[0] : n;
    if (!s->t_out || s->n_out > n || read_i32(s->t_out, s->out_ids, s->n_out) < 0) {
        s->n_out = n;
        for (int r = 0; r < n; r++) s->out_ids[r] = r;
    }
    /* row_phase[r] = phase; row_phase[n + r] = whether row r has an output */
    uint8_t *is_out = s->row_phase + n;
    memset(is_out, 0, (size_t)n);
    for (int i = 0; i < s->n_out; i++)
        if (s->out_ids[i] >= 0 && s->out_ids[i] < n) is_out[s->out_ids[i]] = 1;
    long unmatched = 0;
    for (int r = 0; r < n; r++) {
        int j = -1;
        if (d) {
            int cand = d->last_j + 1;
            if (cand < d->n && !d->used[cand] && row_matches(d, cand, s, r)) j = cand;
            for (int i = 0; j < 0 && i < d->n; i++)
                if (!d->used[i] && row_matches(d, i, s, r)) j = i;
        }
        int32_t sid = 0;
        bool allout = is_out[r];
        if (j >= 0) {
            d->used[j] = 1;
            d->last_j = j;
            sid = d->seq[j];
            allout = d->allout[j];
        } else if (d) {
            unmatched++;
        }
        struct seq_st *q = seq_of(c, sid);
        if (!q) return;
        int32_t p = s->pos[r];
        /* generated: the next position after a token whose output was read, in a run of rows that all ask
         * for outputs (one decode step, or a speculative draft being verified); a prompt asks for its last */
        bool gen = q->seen && p == q->last_pos + 1 && q->last_out && allout;
        bool new_req = !q->seen || p <= q->last_pos || (q->last_phase == 1 && !gen);
        uint8_t ph = (!new_req && gen) ? 1 : 0;
        if (new_req) {
            q->trace_seq = -1;
            q->requests++;
            q->first_pos = p;
        }
        q->seen = 1;
        q->last_pos = p;
        q->last_phase = ph;
        q->last_out = is_out[r];
        s->row_seq[r] = sid; /* resolved to its state at write time */
        s->row_phase[r] = ph;
    }
    if (unmatched) __atomic_add_fetch(&g_unmatched, unmatched, __ATOMIC_RELAXED);
    for (int l = 0; l < s->n_layers; l++) s->layers[l].have = 0, s->layers[l].wstage = 0, s->layers[l].wrows = 0;
    s->active = 1;
}

/* ---- records (docs/trace-format.md; byte-identical to gguf_experts.trace.writer) ------------------------------ */
static uint32_t crc_table[256];
static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int j = 0; j < 8; j++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}
static uint32_t crc32_of(const uint8_t *p, size_t n) {
    if (!crc_table[1]) crc_init();
    uint32_t c = 0xFFFFFFFFu;
    while (n--) c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

#define REC_MARKER 0x52584547u
#define JSON_RESERVE 4092

static void json_str(char *dst, size_t cap, const char *src) {
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)src; *p && o + 8 < cap; p++) {
        if (*p == '"' || *p == '\\') {
            dst[o++] = '\\';
            dst[o++] = (char)*p;
        } else if (*p < 0x20) {
            o += (size_t)snprintf(dst + o, cap - o, "\\u%04x", *p);
        } else {
            dst[o++] = (char)*p;
        }
    }
    dst[o] = 0;
}

/* The header: the fingerprint's structural digests are left empty and meta.fingerprint_pending set; the
 * Python side fills them from model_path (gguf-experts run at exit, or the reader). Called under g_lock. */
static int write_header(struct model_ent *m) {
    if (g_header_done) return g_fd >= 0 ? 0 : -1;
    g_header_done = 1;
    g_fd = open(g_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (g_fd < 0) {
        say("gguf-experts: cannot write the trace %s (%s); not tracing\n", g_path, strerror(errno));
        g_failed = 1;
        return -1;
    }
    char seqpath[PATH_MAX + 8];
    snprintf(seqpath, sizeof seqpath, "%s.seqs", g_path);
    g_seq_fd = open(seqpath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    const char *base = strrchr(seqpath, '/');
    base = base ? base + 1 : seqpath;
    static char path_js[2 * PATH_MAX], base_js[2 * PATH_MAX], arch_js[256];
    json_str(path_js, sizeof path_js, m->path);
    json_str(base_js, sizeof base_js, base);
    json_str(arch_js, sizeof arch_js, m->arch);
    const char *name = strrchr(path_js, '/');
    name = name ? name + 1 : path_js;
    static char json[4 * PATH_MAX + 2048];
    int len = snprintf(json, sizeof json,
                       "{\"format\": \"gguf-experts trace\", \"fingerprint\": {\"architecture\": \"%s\", \"n_layer\": %u, "
                       "\"n_expert\": %u, \"n_expert_used\": %u, \"tensor_digest\": \"\", \"type_digest\": \"\"}, "
                       "\"meta\": {\"tool\": \"gguf-experts run\", \"fingerprint_pending\": true, \"model\": \"%s\", "
                       "\"model_path\": \"%s\", \"weights\": %s, \"mode\": \"%s\", \"pid\": %d, "
                       "\"sequences_file\": \"%s\"}}",
                       arch_js, m->n_layer, m->n_expert, m->k, name, path_js, g_weights ? "true" : "false",
                       g_keepalive ? "keepalive" : "callback", (int)getpid(), base_js);
    if (len < 0 || (size_t)len >= sizeof json - 16) return -1;
    int json_len = len > JSON_RESERVE ? len : JSON_RESERVE;
    while ((16 + json_len + 4) % 8) json_len++;
    size_t total = 16 + (size_t)json_len + 4;
    uint8_t *h = malloc(total);
    if (!h) return -1;
    memcpy(h, "GGEXTRC\0", 8);
    uint32_t v = 1, jl = (uint32_t)json_len;
    memcpy(h + 8, &v, 4);
    memcpy(h + 12, &jl, 4);
    memset(h + 16, ' ', (size_t)json_len);
    memcpy(h + 16, json, (size_t)len);
    uint32_t crc = crc32_of(h, 16 + (size_t)json_len);
    memcpy(h + 16 + json_len, &crc, 4);
    ssize_t w = write(g_fd, h, total);
    free(h);
    return w == (ssize_t)total ? 0 : -1;
}

static uint8_t *out_reserve(struct sched_st *s, size_t add) {
    size_t cap = s->cap_outbuf;
    uint8_t *b = grow(s->out, &cap, s->n_outbuf + add, 1);
    if (!b) return NULL;
    s->out = b;
    s->cap_outbuf = cap;
    return b + s->n_outbuf;
}

static void put_record(struct sched_st *s, int32_t seq, int phase, int layer, const int *rows, int n,
                       const struct layer_buf *lb, int k, bool with_w) {
    size_t len = 28 + 4 * (size_t)n * (2 + (size_t)k * (with_w ? 2 : 1)) + 4;
    uint8_t *p = out_reserve(s, len);
    if (!p) return;
    uint32_t hdr[7] = {REC_MARKER, (uint32_t)len, (uint32_t)seq, (uint32_t)phase | ((with_w ? 1u : 0u) << 8),
                       (uint32_t)layer, (uint32_t)n, (uint32_t)k};
    memcpy(p, hdr, 28);
    int32_t *w = (int32_t *)(p + 28);
    /* rows[] index the layer's rows; the ubatch row of layer row i is i (all rows) or out_ids[i] */
    bool all = lb->rows == s->n_tok;
    for (int i = 0; i < n; i++) w[i] = s->pos[all ? rows[i] : s->out_ids[rows[i]]];
    w += n;
    for (int i = 0; i < n; i++) w[i] = s->tok[all ? rows[i] : s->out_ids[rows[i]]];
    w += n;
    for (int i = 0; i < n; i++, w += k) memcpy(w, lb->ids + (size_t)rows[i] * k, 4 * (size_t)k);
    if (with_w)
        for (int i = 0; i < n; i++, w += k) memcpy(w, lb->w + (size_t)rows[i] * k, 4 * (size_t)k);
    uint32_t crc = crc32_of(p, len - 4);
    memcpy(p + len - 4, &crc, 4);
    s->n_outbuf += len;
    g_rows += n;
}

/* Write the ubatch: for each run of rows of one (sequence, phase), every MoE layer's record, in layer order;
 * one write() for the whole ubatch (kill -9 loses at most the ubatch being computed). */
static void emit(struct sched_st *s) {
    s->active = 0;
    if (!s->touched_any) return;
    struct ctx_st *c = s->ctx;
    struct model_ent *m = c->m;
    int n = s->n_tok, k = (int)m->k;
    pthread_mutex_lock(&g_lock);
    int ok = write_header(m) == 0;
    pthread_mutex_unlock(&g_lock);
    if (!ok) return;
    int *rows = malloc(sizeof(int) * (size_t)(n > 0 ? n : 1));
    if (!rows) return;
    s->n_outbuf = 0;
    for (int a = 0; a < n;) {
        int32_t sid = s->row_seq[a];
        uint8_t ph = s->row_phase[a];
        int b = a + 1;
        while (b < n && s->row_seq[b] == sid && s->row_phase[b] == ph) b++;
        struct seq_st *q = seq_of(c, sid);
        if (q && q->trace_seq < 0) {
            pthread_mutex_lock(&g_lock);
            q->trace_seq = g_next_seq++;
            if (g_seq_fd >= 0) {
                char line[128];
                int ln = snprintf(line, sizeof line, "%d\t%d\t%d\t%d\t%d\n", q->trace_seq, c->index, (int)sid,
                                  q->requests - 1, q->first_pos);
                ssize_t wr = write(g_seq_fd, line, (size_t)ln);
                (void)wr;
            }
            pthread_mutex_unlock(&g_lock);
        }
        int32_t tseq = q ? q->trace_seq : 0;
        for (int l = 0; l < s->n_layers; l++) {
            const struct layer_buf *lb = &s->layers[l];
            if (!lb->have) continue;
            int cnt = 0;
            if (lb->rows == n) {
                for (int r = a; r < b; r++) rows[cnt++] = r;
            } else if (lb->rows == s->n_out) { /* last layer after get_rows(out_ids): the output rows */
                for (int i = 0; i < s->n_out; i++)
                    if (s->out_ids[i] >= a && s->out_ids[i] < b) rows[cnt++] = i;
            } else {
                continue;
            }
            if (cnt) put_record(s, tseq, ph, l, rows, cnt, lb, k, g_weights && lb->wrows == lb->rows);
        }
        a = b;
    }
    free(rows);
    for (int l = 0; l < s->n_layers; l++) s->layers[l].have = 0;
    pthread_mutex_lock(&g_lock);
    size_t off = 0;
    while (off < s->n_outbuf) {
        ssize_t w = write(g_fd, s->out + off, s->n_outbuf - off);
        if (w <= 0) {
            if (w < 0 && errno == EINTR) continue;
            say("gguf-experts: writing the trace %s failed (%s); stopped tracing\n", g_path, strerror(errno));
            g_failed = 1;
            break;
        }
        off += (size_t)w;
    }
    pthread_mutex_unlock(&g_lock);
    s->n_outbuf = 0;
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
        if (s && pass == 1) s->n_keep = 0;
        for (int i = 0; i < nn; i++) {
            struct gt *t = node(gf, i);
            int layer, what;
            if (!t || t->name[0] != 'f' || (what = classify(t->name, &layer)) < 0) continue;
            if (pass == 0) {
                if (what > 0 && what - 1 > last_stage[layer]) last_stage[layer] = what - 1;
                continue;
            }
            if (what > 0 && what - 1 != last_stage[layer]) continue;
            struct gt *keep = what == 0 && t->view_src ? t->view_src : t;
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
typedef void (*backend_sync_t)(void *backend);

/* Read every kept layer of the ubatch computed last: one async copy per layer on the tensor's backend into
 * one host buffer, then one synchronisation per backend (a sync copy per layer costs a round trip each on a
 * GPU). Backends without async copies copy synchronously (ggml's fallback), as the CPU does. */
static void read_kept(struct sched_st *s) {
    s->keep_pending = 0;
    if (!s->active) return;
    REAL(tensor_backend_t, backend_of, "ggml_backend_sched_get_tensor_backend");
    REAL(tensor_get_async_t, get_async, "ggml_backend_tensor_get_async");
    REAL(backend_sync_t, bsync, "ggml_backend_synchronize");
    size_t total = 0;
    for (int i = 0; i < s->n_keep; i++) total += (span_bytes(s->keep[i]) + 15) & ~(size_t)15;
    size_t cap = s->cap_kbuf;
    uint8_t *buf = grow(s->kbuf, &cap, total ? total : 1, 1);
    bool async = buf && backend_of && get_async && bsync && s->sched;
    if (buf) {
        s->kbuf = buf;
        s->cap_kbuf = cap;
    }
    void *backends[16];
    int n_backends = 0;
    if (async) {
        size_t off = 0;
        for (int i = 0; i < s->n_keep && async; i++) {
            const struct gt *t = s->keep[i];
            size_t n = span_bytes(t);
            void *be = n ? backend_of(s->sched, t) : NULL;
            if (n && !be) async = false;
            if (be) {
                get_async(be, t, buf + off, 0, n);
                int seen = 0;
                for (int j = 0; j < n_backends; j++) seen |= backends[j] == be;
                if (!seen && n_backends < 16) backends[n_backends++] = be;
            }
            off += (n + 15) & ~(size_t)15;
        }
        for (int j = 0; j < n_backends; j++) bsync(backends[j]);
    }
    size_t off = 0;
    for (int i = 0; i < s->n_keep; i++) {
        int layer, what = classify(s->keep[i]->name, &layer);
        if (what >= 0) take(s, s->keep[i], what, layer, async ? buf + off : NULL);
        off += (span_bytes(s->keep[i]) + 15) & ~(size_t)15;
    }
    emit(s);
}

static void flush_pending(struct sched_st *s, void *sched) {
    if (!s || !s->keep_pending) return;
    REAL(sync_t, sync, "ggml_backend_sched_synchronize");
    if (sync) sync(sched);
    read_kept(s);
}

EXPORT bool ggml_backend_sched_reserve(void *sched, void *graph) {
    REAL(alloc_t, real, "ggml_backend_sched_reserve");
    if (!real) return false;
    if (g_enabled && g_keepalive) { /* the allocator plans here: flags set only at alloc time are ignored */
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
        if (s) flag_graph(s, graph);
    }
    return real(sched, graph);
}

EXPORT void ggml_backend_sched_synchronize(void *sched) {
    REAL(sync_t, real, "ggml_backend_sched_synchronize");
    if (!real) return;
    real(sched);
    if (g_enabled && g_keepalive) {
        struct sched_st *s = sched_of(sched, 0);
        if (s && s->keep_pending) read_kept(s);
    }
}

EXPORT void ggml_backend_sched_reset(void *sched) {
    REAL(sync_t, real, "ggml_backend_sched_reset");
    if (!real) return;
    if (g_enabled && g_keepalive) flush_pending(sched_of(sched, 0), sched);
    real(sched);
}

EXPORT void ggml_backend_sched_free(void *sched) {
    REAL(sync_t, real, "ggml_backend_sched_free");
    if (!real) return;
    if (g_enabled && sched) {
        struct sched_st *s = sched_of(sched, 0);
        if (g_keepalive) flush_pending(s, sched);
        if (s) s->sched = NULL; /* the address may be reused by a new scheduler */
    }
    real(sched);
}

EXPORT int ggml_backend_sched_graph_compute_async(void *sched, void *graph) {
    REAL(compute_t, real, "ggml_backend_sched_graph_compute_async");
    if (!real) return 1;
    if (!g_enabled) return real(sched, graph);
    struct sched_st *s = sched_of(sched, g_keepalive);
    if (!s) return real(sched, graph);
    flush_pending(s, sched);
    prepare(s, graph);
    int st = real(sched, graph);
    if (s->active) {
        if (st != 0) s->active = 0;
        else if (g_keepalive) s->keep_pending = 1;
        else emit(s);
    }
    return st;
}

__attribute__((destructor)) static void ggexp_fini(void) {
    if (!g_enabled) return;
    pthread_mutex_lock(&g_lock);
    if (g_unmatched) {
        char n[32];
        snprintf(n, sizeof n, "%ld", g_unmatched);
        say("gguf-experts: %s rows did not match a llama_decode batch row; they were recorded as sequence 0%s\n",
            n, " (see docs/run.md)");
    }
    if (g_fd >= 0) {
        fsync(g_fd);
        close(g_fd);
        g_fd = -1;
    }
    if (g_seq_fd >= 0) {
        close(g_seq_fd);
        g_seq_fd = -1;
    }
    pthread_mutex_unlock(&g_lock);
}
