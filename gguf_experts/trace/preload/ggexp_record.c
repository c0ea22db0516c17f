/* The reading: ubatch rows to token, position, sequence and phase; tensors to rows; CRC'd records. */
#include "ggexp.h"

/* Copy a graph tensor (any backend) as [rows, k], honouring its own ne/nb (ffn_moe_topk is a strided view). */
size_t span_bytes(const struct gt *t) {
    if (t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3] == 0) return 0;
    return 4 + (size_t)(t->ne[0] - 1) * t->nb[0] + (size_t)(t->ne[1] - 1) * t->nb[1]
           + (size_t)(t->ne[2] - 1) * t->nb[2] + (size_t)(t->ne[3] - 1) * t->nb[3];
}

/* Copy a graph tensor (any backend) as [rows, k], honouring its own ne/nb (ffn_moe_topk is a strided view).
 * ``span``: the tensor's bytes already copied to the host (keep-alive's async copies), or NULL to copy here;
 * ``dense``: ``span`` holds the rows packed (a 2-D copy of the view), not the tensor's strided span. */
int read_rows(struct sched_st *s, const struct gt *t, int k, void *dst, int max_rows, const uint8_t *span, bool dense) {
    REAL(tensor_get_t, tget, "ggml_backend_tensor_get");
    if ((!tget && !span) || (t->type != GGML_TYPE_I32 && t->type != GGML_TYPE_F32) || k <= 0) return -1;
    int64_t total = t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
    if (total % k || total / k > max_rows) return -1;
    if (total == 0) return 0;
    size_t nbytes = span_bytes(t);
    bool contiguous = t->nb[0] == 4 && t->nb[1] == 4 * (size_t)t->ne[0] && t->nb[2] == t->nb[1] * (size_t)t->ne[1]
                      && t->nb[3] == t->nb[2] * (size_t)t->ne[2];
    if (span && dense) {
        memcpy(dst, span, (size_t)total * 4);
        return (int)(total / k);
    }
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
int classify(const char *name, int *layer) {
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

struct layer_buf *layer_buf(struct sched_st *s, int layer) {
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
void take(struct sched_st *s, const struct gt *t, int what, int layer, const uint8_t *span, bool dense) {
    struct model_ent *m = s->ctx->m;
    int k = (int)m->k;
    if (what == 0 && t->ne[0] != k) { /* warm-up graph: n_expert_used = n_expert */
        __atomic_add_fetch(&g_warmup, 1, __ATOMIC_RELAXED);
        return;
    }
    if (layer >= (int)m->n_layer) return;
    struct layer_buf *lb = layer_buf(s, layer);
    if (!lb) {
        if (what == 0) DROP(s->n_tok);
        return;
    }
    if (what == 0) {
        int rows = read_rows(s, t, k, lb->ids, s->n_tok, span, dense);
        if (rows < 0) return;
        lb->rows = rows;
        lb->have = 1;
        s->touched_any = 1;
    } else if (what - 1 >= lb->wstage) { /* the last stage the graph builds is the one the model applies */
        if (t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3] % k) return;
        int rows = read_rows(s, t, k, lb->w, s->n_tok, span, dense);
        if (rows < 0) return;
        lb->wrows = rows;
        lb->wstage = what - 1;
    }
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
void prepare(struct sched_st *s, void *gf) {
    s->active = 0;
    s->touched_any = 0;
    s->seq_resolved = 0;
    struct decode_st *d = tl_decode;
    if ((d && d->skip) || (g_inproc && !d)) return;
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
            DROP((long)n * c->m->n_layer);
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
        if (!q) {
            DROP((long)n * c->m->n_layer);
            return;
        }
        int32_t p = s->pos[r];
        /* generated: the next position after a token whose output was read, in a run of rows that all ask
         * for outputs (one decode step, or a speculative draft being verified); a prompt asks for its last */
        bool gen = q->seen && p == q->last_pos + 1 && q->last_out && allout;
        bool new_req = !q->seen || p <= q->last_pos || (q->last_phase == 1 && !gen);
        uint8_t ph = (!new_req && gen) ? 1 : 0;
        int hint = g_hint_phase;
        if (hint >= 0) { /* the in-process caller says which phase; a sequence restarts only where positions do */
            new_req = !q->seen || p <= q->last_pos;
            ph = (uint8_t)hint;
        }
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
    io_snap(&s->io0); /* last: the measured span is the compute, not our bookkeeping */
    s->io1 = s->io0;
}

/* ---- records (ggexp_format.h; byte-identical to gguf_experts.trace.writer) --------------------------------- */
/* CRC-32 (zlib's) by slicing-by-8: a prefill ubatch writes ~1 MB of records (48 layers x 512 rows), which a
 * byte-at-a-time table takes milliseconds over, on the thread that launches the next ubatch. */
static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;
static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int j = 0; j < 8; j++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
}
static uint32_t crc32_of(const uint8_t *p, size_t n) {
    pthread_once(&crc_once, crc_init);
    uint32_t c = 0xFFFFFFFFu;
    while (n >= 8) {
        uint32_t a, b;
        memcpy(&a, p, 4);
        memcpy(&b, p + 4, 4);
        a ^= c;
        c = crc_table[7][a & 0xFF] ^ crc_table[6][(a >> 8) & 0xFF] ^ crc_table[5][(a >> 16) & 0xFF] ^ crc_table[4][a >> 24]
            ^ crc_table[3][b & 0xFF] ^ crc_table[2][(b >> 8) & 0xFF] ^ crc_table[1][(b >> 16) & 0xFF] ^ crc_table[0][b >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) c = crc_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

#define JSON_RESERVE 4092 /* header space for `run`'s finalize to fill in place: 4112 bytes in all */

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

/* The header (version 2): the fingerprint's structural digests are left empty and meta.fingerprint_pending set; the
 * Python side fills them from model_path (gguf-experts run at exit, or the reader). Called under g_lock. */
static int write_header(struct model_ent *m, const struct io_snap *first) {
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
    static char json[4 * PATH_MAX + 2048], io_js[1024];
    io_json(io_js, sizeof io_js, first);
    int len = snprintf(json, sizeof json,
                       "{\"format\": \"gguf-experts trace\", \"fingerprint\": {\"architecture\": \"%s\", \"n_layer\": %u, "
                       "\"n_expert\": %u, \"n_expert_used\": %u, \"tensor_digest\": \"\", \"type_digest\": \"\"}, "
                       "\"meta\": {\"tool\": \"gguf-experts run\", \"fingerprint_pending\": true, \"model\": \"%s\", "
                       "\"model_path\": \"%s\", \"weights\": %s, \"mode\": \"%s\", \"pid\": %d, "
                       "\"sequences_file\": \"%s\", %s}}",
                       arch_js, m->n_layer, m->n_expert, m->k, name, path_js, g_weights ? "true" : "false",
                       g_keepalive ? "keepalive" : "callback", (int)getpid(), base_js, io_js);
    if (len < 0 || (size_t)len >= sizeof json - 16) return -1;
    size_t total = ggexp_header_length((size_t)(len > JSON_RESERVE ? len : JSON_RESERVE));
    size_t json_len = total - sizeof(struct ggexp_header_prefix) - GGEXP_CRC_BYTES; /* space-padded */
    uint8_t *h = malloc(total);
    if (!h) return -1;
    struct ggexp_header_prefix pre = {.version = GGEXP_VERSION, .json_len = (uint32_t)json_len};
    memcpy(pre.magic, GGEXP_MAGIC, GGEXP_MAGIC_LEN);
    memcpy(h, &pre, sizeof pre);
    uint8_t *body = h + sizeof pre;
    memset(body, ' ', json_len);
    memcpy(body, json, (size_t)len);
    uint32_t crc = crc32_of(h, sizeof pre + json_len);
    memcpy(body + json_len, &crc, GGEXP_CRC_BYTES);
    ssize_t w = write(g_fd, h, total);
    free(h);
    return w == (ssize_t)total ? 0 : -1;
}

static uint8_t *out_reserve(struct sched_st *s, size_t add) {
    size_t cap = s->cap_outbuf;
    if (g_test_nomem) return NULL;
    uint8_t *b = grow(s->out, &cap, s->n_outbuf + add, 1);
    if (!b) return NULL;
    s->out = b;
    s->cap_outbuf = cap;
    return b + s->n_outbuf;
}

static void put_record(struct sched_st *s, int32_t seq, int phase, int layer, const int *rows, int n,
                       const struct layer_buf *lb, int k, bool with_w) {
    size_t len = ggexp_record_length((size_t)n, (size_t)k, with_w);
    uint8_t *p = out_reserve(s, len);
    if (!p) {
        DROP(n);
        return;
    }
    struct ggexp_record_fixed hdr = {.marker = GGEXP_REC_MARKER, .rec_len = (uint32_t)len, .seq = seq,
                                     .phase = (uint8_t)phase, .flags = with_w ? GGEXP_FLAG_WEIGHTS : 0u,
                                     .reserved = 0, .layer = layer, .n_tokens = (uint32_t)n,
                                     .n_expert_used = (uint32_t)k};
    memcpy(p, &hdr, sizeof hdr);
    int32_t *w = (int32_t *)(p + sizeof hdr);
    /* rows[] index the layer's rows; the ubatch row of layer row i is i (all rows) or out_ids[i] */
    bool all = lb->rows == s->n_tok;
    for (int i = 0; i < n; i++) w[i] = s->pos[all ? rows[i] : s->out_ids[rows[i]]];
    w += n;
    for (int i = 0; i < n; i++) w[i] = s->tok[all ? rows[i] : s->out_ids[rows[i]]];
    w += n;
    for (int i = 0; i < n; i++, w += k) memcpy(w, lb->ids + (size_t)rows[i] * k, 4 * (size_t)k);
    if (with_w)
        for (int i = 0; i < n; i++, w += k) memcpy(w, lb->w + (size_t)rows[i] * k, 4 * (size_t)k);
    uint32_t crc = crc32_of(p, len - GGEXP_CRC_BYTES);
    memcpy(p + len - GGEXP_CRC_BYTES, &crc, GGEXP_CRC_BYTES);
    s->n_outbuf += len;
    __atomic_add_fetch(&g_records, 1, __ATOMIC_RELAXED);
}

/* The ubatch's measurement (docs/trace-format.md): deltas from before the compute to its return; a counter that
 * could not be read sets its flag (bit 0 read_bytes, bit 1 majflt) and is stored as 0. */
static void put_measure(struct sched_st *s, int32_t seq, int phase, int n_tokens) {
    if (!io_enabled()) return;
    uint8_t *p = out_reserve(s, GGEXP_MEAS_LEN);
    if (!p) return;
    const struct io_snap *a = &s->io0, *b = &s->io1;
    struct ggexp_meas_fixed m = {.marker = GGEXP_MEAS_MARKER, .rec_len = (uint32_t)GGEXP_MEAS_LEN, .seq = seq,
                                 .phase = (uint8_t)phase, .n_tokens = (uint32_t)n_tokens};
    m.wall_ns = b->ns > a->ns ? (uint64_t)(b->ns - a->ns) : 0;
    if (a->read_bytes < 0 || b->read_bytes < 0) m.flags |= GGEXP_MEAS_NO_READ_BYTES;
    else if (b->read_bytes > a->read_bytes) m.read_bytes = (uint64_t)(b->read_bytes - a->read_bytes);
    if (a->majflt < 0 || b->majflt < 0) m.flags |= GGEXP_MEAS_NO_MAJFLT;
    else if (b->majflt > a->majflt) m.majflt = (uint64_t)(b->majflt - a->majflt);
    memcpy(p, &m, sizeof m);
    uint32_t crc = crc32_of(p, sizeof m);
    memcpy(p + sizeof m, &crc, GGEXP_CRC_BYTES);
    s->n_outbuf += GGEXP_MEAS_LEN;
}

/* A llama sequence's first rows in the trace: its trace sequence number, and its line in the sequence map. */
static void number_seq(const struct ctx_st *c, struct seq_st *q, int32_t sid) {
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

/* Number the ubatch's new trace sequences now, as emit would (the header first: it opens the sequence map), and
 * store them in row_seq: a deferred ubatch's records are written after the next ubatch is prepared, which may start
 * a new request on the same llama sequence (ggexp_source.c, defer_pending). */
void resolve_seqs(struct sched_st *s) {
    if (!s->touched_any || s->seq_resolved) return;
    struct ctx_st *c = s->ctx;
    pthread_mutex_lock(&g_lock);
    int ok = write_header(c->m, &s->io0) == 0;
    pthread_mutex_unlock(&g_lock);
    if (!ok) return;
    for (int a = 0, b; a < s->n_tok; a = b) {
        int32_t sid = s->row_seq[a];
        uint8_t ph = s->row_phase[a];
        for (b = a + 1; b < s->n_tok && s->row_seq[b] == sid && s->row_phase[b] == ph; b++) {}
        struct seq_st *q = seq_of(c, sid);
        if (q && q->trace_seq < 0) number_seq(c, q, sid);
        int32_t tseq = q ? q->trace_seq : 0;
        for (int r = a; r < b; r++) s->row_seq[r] = tseq;
    }
    s->seq_resolved = 1;
}

/* Write the ubatch: for each run of rows of one (sequence, phase), every MoE layer's record, in layer order;
 * one write() for the whole ubatch (kill -9 loses at most the ubatch being computed). */
void emit(struct sched_st *s) {
    s->active = 0;
    if (!s->touched_any) return;
    struct ctx_st *c = s->ctx;
    struct model_ent *m = c->m;
    int n = s->n_tok, k = (int)m->k;
    pthread_mutex_lock(&g_lock);
    int ok = write_header(m, &s->io0) == 0;
    pthread_mutex_unlock(&g_lock);
    if (!ok) return;
    int *rows = malloc(sizeof(int) * (size_t)(n > 0 ? n : 1));
    if (!rows) {
        for (int l = 0; l < s->n_layers; l++)
            if (s->layers[l].have) DROP(s->layers[l].rows);
        return;
    }
    s->n_outbuf = 0;
    int32_t m_seq = 0;
    int m_phase = -1;
    for (int a = 0; a < n;) {
        int32_t sid = s->row_seq[a];
        uint8_t ph = s->row_phase[a];
        int b = a + 1;
        while (b < n && s->row_seq[b] == sid && s->row_phase[b] == ph) b++;
        struct seq_st *q = s->seq_resolved ? NULL : seq_of(c, sid);
        if (q && q->trace_seq < 0) number_seq(c, q, sid);
        int32_t tseq = s->seq_resolved ? sid : q ? q->trace_seq : 0;
        if (m_phase < 0) m_seq = tseq, m_phase = ph; /* the measurement's: -1 for several sequences, 2 mixed */
        else {
            if (m_seq != tseq) m_seq = -1;
            if (m_phase != ph) m_phase = 2;
        }
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
    put_measure(s, m_seq, m_phase < 0 ? 0 : m_phase, n);
    for (int l = 0; l < s->n_layers; l++) s->layers[l].have = 0;
    s->seq_resolved = 0;
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

