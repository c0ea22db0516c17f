/* What the program decodes: llama_decode and the extended batch API (llama_batch_ext_*, llama_process). */
#include "ggexp.h"

__thread struct decode_st *tl_decode;
decode_t g_real_decode;

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

