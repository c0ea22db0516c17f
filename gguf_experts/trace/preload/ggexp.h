/* gguf-experts run (shared declarations): an LD_PRELOAD tracer of llama.cpp's expert routing, in plain C (no C++ runtime, no libpython).
 *
 * Why a preload: llama.cpp calls ggml_backend_sched_set_eval_callback (libllama -> libggml-base, through the
 * PLT) every time it builds a graph, so defining that symbol here installs our callback in any program built
 * with shared libraries (llama-server, llama-cli, llama-cpp-python apps), unchanged. See docs/run.md.
 *
 * Environment (set by `gguf-experts run`, or by hand):
 *   GGUF_EXPERTS_TRACE=path   the trace.bin to write (unset: the library only forwards, it records nothing)
 *   GGUF_EXPERTS_WEIGHTS=1    also record the gate weights the model applies (the last weight stage)
 *   GGUF_EXPERTS_MODE=callback|keepalive   how the data is obtained (the "source"; records are the same)
 *   GGUF_EXPERTS_MEASURE=0    no measurement records (measured I/O per ubatch is on by default; for benchmarks)
 *
 * Structure: "sources" get each MoE layer's top-k ids (and weights) of one ubatch into a sched_st (callback:
 * the eval callback observes ffn_moe_topk-N; keepalive: the argsort is flagged as a graph output so it stays
 * alive, and is read after the compute). The "reading" part maps ubatch rows to token, position, sequence and
 * phase and appends CRC'd trace.bin v2 records (docs/trace-format.md), one write() per ubatch: every MoE layer's
 * record, then the ubatch's measured I/O (ggexp_io.c).
 */
#ifndef GGEXP_H
#define GGEXP_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
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
#include <sys/types.h>

#include "ggexp_format.h" /* the trace.bin layout: trace/format.py in C */

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the trace is little-endian and the tracer writes its structs as they are in memory"
#endif

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

typedef void *(*dlsym_t)(void *, const char *);
#define REAL(type, var, name) \
    static type var; \
    if (!var) var = (type)find_real(name)

struct model_ent {
    char path[PATH_MAX];
    char arch[64];
    uint32_t n_layer, n_expert, k, n_embd;
    void *model; /* the llama_model bound to this file (first model whose metadata matches) */
    int traced;
};
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
/* what llama_decode was given, for the ubatches it computes (thread-local: one decode per thread at a time) */
struct decode_st {
    void *ctx;
    int n;
    int32_t *tok, *pos, *seq, *cnt;
    uint8_t *used, *allout; /* allout: every row of this row's sequence in the batch asks for an output */
    int last_j;
    int skip; /* llama.cpp's start-up probes (warm-up, seq_rm check): not a request, not recorded */
};
struct layer_buf {
    int rows, wrows, wstage, cap;
    int32_t *ids;
    float *w;
    uint8_t have;
};
/* measured I/O (ggexp_io.c): the process's counters at one moment (-1: unknown) */
struct io_snap { int64_t read_bytes, majflt, ns; };
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
    /* the tensors this graph's flags were set on by us (not by the program), to clear before the compute */
    struct gt **flagged;
    int n_flagged, cap_flagged;
    /* scratch */
    uint8_t *scratch, *kbuf;
    size_t cap_scratch, cap_kbuf;
    /* keepalive: a pinned host buffer (the device's host buffer type) for the async copies, when there is one */
    void *pinned; /* ggml_backend_buffer_t */
    uint8_t *pinned_base;
    size_t cap_pinned;
    /* keepalive: the copies queued right after the compute (issue_kept), read at the next flush (read_kept) */
    int copy_state; /* 1: queued into copy_buf */
    uint8_t *copy_buf;
    void *copy_backends[16];
    int n_copy_backends;
    size_t *koff; /* where kept tensor i lands in copy_buf */
    int cap_koff;
    struct kspan *spans; /* scratch of issue_kept */
    int cap_spans;
    uint8_t *out;
    size_t n_outbuf, cap_outbuf;
    /* measured I/O of this ubatch: before the graph compute, and when the compute returned */
    struct io_snap io0, io1;
    /* keepalive, deferred (ggexp_source.c, defer_pending): the next graph is being built while the last ubatch's
     * copies are in flight. kept_meta: copies of its kept tensors' descriptions (the graph that held them is
     * rebuilt); prev: its ubatch state while the next ubatch is prepared, written once the next one is queued */
    int deferred, n_kept_meta, cap_kept_meta, seq_resolved;
    struct gt *kept_meta;
    struct sched_st *prev;
    /* keepalive on a device (ggexp_source.c, place_slots): the kept argsorts and weight stages computed into one
     * device buffer of ours, side by side, so that a ubatch's copies to the host are one or two, not one per layer */
    void *slot_buf, *slot_be; /* ggml_backend_buffer_t, the backend that computes into it */
    uint8_t *slot_base;
    size_t slot_cap;
};
struct llama_embd { const float *data; size_t n_rows, n_embd; };

/* ---- shared state (defined in ggexp_core.c) ---------------------------------------------------------- */
extern char g_path[PATH_MAX];
extern int g_enabled, g_weights, g_keepalive;
/* measurement knob GGUF_EXPERTS_COST=noop|flags (docs/capture.md, "GPU check"): the callback observes nothing, or
 * keep-alive flags the nodes but reads nothing; the trace then holds no records. 0: normal. */
extern int g_cost_probe;
#define COST_NOOP 1
#define COST_FLAGS 2
extern pthread_mutex_t g_lock;
extern int g_fd, g_seq_fd, g_header_done, g_failed;
extern int32_t g_next_seq;
extern long g_unmatched, g_warmup;
/* records written (in-process capture reports the count) and the in-process caller's phase for the next decode
 * (-1: inferred, as under `run`); see ggexp_inproc.c */
extern long g_records;
/* keep-alive's device-to-host copies (issue_kept) and the ubatches they read: the sidecar's "copies" line, the
 * trace's meta.keepalive_copies (how well the kept tensors were merged: 1-2 per ubatch in device slots) */
extern long g_copy_calls, g_copy_ubatches;
/* The sidecar's closing lines: "dropped N" (when rows were dropped, or always) and "copies U C" (keep-alive). */
void write_end_counts(int fd, bool dropped_always);
extern int g_hint_phase;
/* in-process (ggexp_inproc.c): only contexts decoded through our llama_decode wrapper are traced, so an untraced
 * context of the same process (a benchmark's plain peer) runs unflagged and unread */
extern int g_inproc;
/* rows (token x MoE layer) not recorded because an allocation failed: reported at exit, on stderr and in the
 * .seqs sidecar ("dropped\tN"), which the Python side puts into the header's meta.dropped_rows */
extern long g_dropped;
/* fault injection for the test of that count (GGUF_EXPERTS_TEST_NOMEM=records): the record buffer never grows */
extern int g_test_nomem;
#define DROP(n) __atomic_add_fetch(&g_dropped, (long)(n), __ATOMIC_RELAXED)
/* host time per step (scripts/bench_host_ubatch.py builds the library with -DGGEXP_HOSTPROF): nanoseconds and counts */
#ifdef GGEXP_HOSTPROF
#define PROF_N 10
extern int64_t g_prof_ns[PROF_N], g_prof_n[PROF_N];
int64_t prof_now(void);
#define PROF(i, stmt) do { int64_t t0_ = prof_now(); stmt; g_prof_ns[i] += prof_now() - t0_; g_prof_n[i]++; } while (0)
extern int64_t g_prof_mark; /* the end of the last reset: llama.cpp's own host work until the compute is slot 8 */
#define PROF_MARK() (g_prof_mark = prof_now())
#define PROF_SINCE_MARK(i) do { if (g_prof_mark) { g_prof_ns[i] += prof_now() - g_prof_mark; g_prof_n[i]++; g_prof_mark = 0; } } while (0)
#else
#define PROF_MARK() do { } while (0)
#define PROF_SINCE_MARK(i) do { } while (0)
#define PROF(i, stmt) do { stmt; } while (0)
#endif
#define MAX_MODELS 16
extern struct model_ent g_models[MAX_MODELS];
extern int g_n_models, g_main;
extern struct ctx_st g_noctx;
extern __thread struct decode_st *tl_decode;
extern decode_t g_real_decode;

/* ---- functions shared between the files ------------------------------------------------------------------ */
void *find_real(const char *name);
void say(const char *fmt, const char *a, const char *b);
void *grow(void *p, size_t *cap, size_t need, size_t elem);
struct model_ent *model_of(void *model);
struct seq_st *seq_of(struct ctx_st *c, int32_t seq);
struct ctx_st *ctx_of(void *ctx);
int32_t llama_decode(void *ctx, llama_batch batch);
struct sched_st *sched_of(void *sched, int create);
size_t span_bytes(const struct gt *t);
int read_rows(struct sched_st *s, const struct gt *t, int k, void *dst, int max_rows, const uint8_t *span, bool dense);
int classify(const char *name, int *layer);
struct layer_buf *layer_buf(struct sched_st *s, int layer);
void take(struct sched_st *s, const struct gt *t, int what, int layer, const uint8_t *span, bool dense);
void prepare(struct sched_st *s, void *gf);
void emit(struct sched_st *s);
void resolve_seqs(struct sched_st *s);
/* ggexp_io.c */
int io_enabled(void); /* GGUF_EXPERTS_MEASURE=0 turns measuring off */
void io_snap(struct io_snap *s);
void io_start_capture(const char *model_path);
void io_start_freeze(void);
int io_json(char *dst, size_t cap, const struct io_snap *first);
int64_t device_queue_kb(dev_t dev, const char *attr); /* /sys/dev/block/MAJ:MIN/queue/ATTR, or -1 */

/* ---- paging (ggexp_paging.c; independent of tracing, env GGUF_EXPERTS_PAGING) ---------------------------- */
#define PAGING_STOCK 0
#define PAGING_RANDOM 1
#define PAGING_PREFETCH 2
#define PAGING_AUTO 3 /* the env form's auto, resolved at the model's mmap */
extern int g_paging;
dlsym_t rdlsym(void);
void paging_graph(void *gf);            /* before a graph computes: learn the *_exps tensors, MADV_RANDOM */
bool paging_observes(void);             /* prefetch observes the top-k (the model's load pass was dropped) */
bool paging_wants(const struct gt *t);  /* the eval callback's ask: a top-k node, in prefetch mode */
void paging_topk(const struct gt *t);   /* the top-k was computed: read the selected experts ahead */

#endif
