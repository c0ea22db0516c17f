/* Symbol resolution, configuration, models, contexts and sequences, and the dlsym hook (see ggexp.h). */
#include "ggexp.h"

/* ---- symbol resolution ---------------------------------------------------------------------------------- */
typedef void *(*dlsym_t)(void *, const char *);
static dlsym_t real_dlsym_fn;
static __thread int in_dlsym;
/* The dlsym hook runs inside a sanitizer runtime's own start-up (its interceptors look themselves up with
 * dlsym), before the shadow memory exists: in a sanitized build (the tests') it must not be instrumented. */
#define NO_SANITIZE __attribute__((no_sanitize("address", "undefined")))

NO_SANITIZE dlsym_t rdlsym(void) {
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
void *find_real(const char *name) {
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


/* ---- configuration ---------------------------------------------------------------------------------------- */
char g_path[PATH_MAX];
int g_enabled, g_weights, g_keepalive, g_cost_probe;
pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
int g_fd = -1, g_seq_fd = -1, g_header_done, g_failed;
int32_t g_next_seq;
long g_unmatched, g_warmup, g_dropped, g_records;
long g_copy_calls, g_copy_ubatches;

void write_end_counts(int fd, bool dropped_always) {
    if (fd < 0) return;
    long d = __atomic_load_n(&g_dropped, __ATOMIC_RELAXED);
    long u = __atomic_load_n(&g_copy_ubatches, __ATOMIC_RELAXED), c = __atomic_load_n(&g_copy_calls, __ATOMIC_RELAXED);
    char line[160];
    int ln = 0;
    if (d || dropped_always) ln += snprintf(line, sizeof line, "dropped\t%ld\n", d);
    if (u) ln += snprintf(line + ln, sizeof line - (size_t)ln, "copies\t%ld\t%ld\n", u, c);
    ssize_t wr = ln ? write(fd, line, (size_t)ln) : 0;
    (void)wr;
}
int g_hint_phase = -1, g_inproc;
int g_test_nomem;

void say(const char *fmt, const char *a, const char *b) {
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
    /* keep-alive by default: no graph splits, and the backend fuses as untraced (docs/run.md, "Modes") */
    g_keepalive = !(m && strcmp(m, "callback") == 0);
    if (m && *m && strcmp(m, "keepalive") != 0 && strcmp(m, "callback") != 0)
        say("gguf-experts: GGUF_EXPERTS_MODE=%s is not callback or keepalive; using keepalive\n", m, NULL);
    const char *c = getenv("GGUF_EXPERTS_COST");
    g_cost_probe = !c || !*c ? 0 : strcmp(c, "noop") == 0 ? COST_NOOP : strcmp(c, "flags") == 0 ? COST_FLAGS : 0;
    const char *t = getenv("GGUF_EXPERTS_TEST_NOMEM");
    g_test_nomem = t && strcmp(t, "records") == 0;
    rdlsym();
    g_enabled = 1;
}

/* ---- models ------------------------------------------------------------------------------------------------- */
struct model_ent g_models[MAX_MODELS];
int g_n_models, g_main = -1;

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
    if (g_enabled && fname && g_n_models == 0) io_start_capture(fname); /* before its header is read */
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
    if (g_n_models == 0) io_start_freeze(); /* the first MoE model's: a later file does not replace it */
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
struct model_ent *model_of(void *model) {
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

void *grow(void *p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return p;
    size_t n = *cap ? *cap : 64;
    while (n < need) n *= 2;
    void *q = realloc(p, n * elem);
    if (!q) return NULL;
    *cap = n;
    return q;
}

/* ---- contexts and sequences ---------------------------------------------------------------------------- */
#define MAX_CTX 64
static struct ctx_st g_ctxs[MAX_CTX];
static int g_n_ctxs;
struct ctx_st g_noctx; /* rows decoded through a llama_decode we did not see */

/* A new in-process trace (ggexp_inproc.c): forget the contexts of the previous one (all freed by then). */
void ctx_reset_all(void) {
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < g_n_ctxs; i++) free(g_ctxs[i].seqs);
    memset(g_ctxs, 0, sizeof g_ctxs);
    g_n_ctxs = 0;
    pthread_mutex_unlock(&g_lock);
}

struct seq_st *seq_of(struct ctx_st *c, int32_t seq) {
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

struct ctx_st *ctx_of(void *ctx) {
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

/* Python (ctypes) resolves llama_decode with dlsym on libllama's own handle, which a preload does not
 * intercept: hand back our wrapper for that one name. Everything else is the real dlsym's answer. */
EXPORT NO_SANITIZE void *dlsym(void *handle, const char *name) {
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

__attribute__((destructor)) static void ggexp_fini(void) {
    if (!g_enabled) return;
    pthread_mutex_lock(&g_lock);
    if (g_unmatched) {
        char n[32];
        snprintf(n, sizeof n, "%ld", g_unmatched);
        say("gguf-experts: %s rows did not match a llama_decode batch row; they were recorded as sequence 0%s\n",
            n, " (see docs/run.md)");
    }
    long dropped = __atomic_load_n(&g_dropped, __ATOMIC_RELAXED);
    if (dropped) {
        char n[32];
        snprintf(n, sizeof n, "%ld", dropped);
        say("gguf-experts: out of memory: %s rows (token x layer) were not recorded%s\n", n,
            " (the trace's meta.dropped_rows says so too)");
    }
    write_end_counts(g_seq_fd, false);
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

