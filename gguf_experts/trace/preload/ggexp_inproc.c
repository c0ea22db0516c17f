/* In-process use of the tracer (`gguf-experts capture`): the same library, dlopen()ed into a Python process whose
 * llama.cpp libraries are already loaded, so that capture and run share one implementation (keep-alive included).
 *
 * Why not LD_PRELOAD: a library loaded after libllama does not interpose its calls (they were bound to
 * libggml-base at load). Instead ggexp_inproc_begin rewrites the GOT slots (JUMP_SLOT / GLOB_DAT relocations) of
 * every loaded object that calls the functions we define, the way a preload would have bound them. Our functions
 * forward to the real ones (find_real) and do nothing else while tracing is off, so the hooks stay installed for
 * the life of the process; begin/end switch tracing on and off around one Recorder (one trace file at a time).
 */
#include "ggexp.h"
#include <elf.h>
#include <sys/mman.h>

static const char *const HOOKED[] = {
    "ggml_backend_sched_set_eval_callback", "ggml_backend_sched_reserve", "ggml_backend_sched_alloc_graph",
    "ggml_backend_sched_synchronize", "ggml_backend_sched_reset", "ggml_backend_sched_free",
    "ggml_backend_sched_graph_compute_async", "gguf_init_from_file", NULL};

#if defined(__x86_64__)
#define R_JUMP_SLOT R_X86_64_JUMP_SLOT
#define R_GLOB_DAT R_X86_64_GLOB_DAT
#elif defined(__aarch64__)
#define R_JUMP_SLOT R_AARCH64_JUMP_SLOT
#define R_GLOB_DAT R_AARCH64_GLOB_DAT
#endif

struct patch_ctx {
    void *self;            /* our load base: never patched */
    char dir[PATH_MAX];    /* only objects under this directory (llama-cpp-python's libraries), "" for all */
    void *ours[16];        /* our definition of HOOKED[i] */
    int patched;
};

#ifdef R_JUMP_SLOT
static uintptr_t dyn_ptr(const struct dl_phdr_info *info, uintptr_t v) {
    /* glibc relocates most d_ptr entries in place; a value below the load base is still an offset */
    return v < (uintptr_t)info->dlpi_addr ? v + (uintptr_t)info->dlpi_addr : v;
}

static void patch_relocs(const struct dl_phdr_info *info, const ElfW(Rela) *rel, size_t n, const ElfW(Sym) *symtab,
                         const char *strtab, struct patch_ctx *pc) {
    long page = sysconf(_SC_PAGESIZE);
    for (size_t i = 0; i < n; i++) {
        unsigned type = (unsigned)ELF64_R_TYPE(rel[i].r_info), sym = (unsigned)ELF64_R_SYM(rel[i].r_info);
        if ((type != R_JUMP_SLOT && type != R_GLOB_DAT) || sym == 0) continue;
        const char *name = strtab + symtab[sym].st_name;
        if (name[0] != 'g') continue;
        for (int h = 0; HOOKED[h]; h++) {
            if (strcmp(name, HOOKED[h]) != 0 || !pc->ours[h]) continue;
            void **slot = (void **)((uintptr_t)info->dlpi_addr + rel[i].r_offset);
            if (*slot == pc->ours[h]) { /* already ours (the process runs with the library preloaded) */
                pc->patched++;
                break;
            }
            uintptr_t pg = (uintptr_t)slot & ~(uintptr_t)(page - 1);
            /* RELRO pages are read-only after loading: open the one page, write, close it again */
            if (mprotect((void *)pg, (size_t)page, PROT_READ | PROT_WRITE) != 0) break;
            *slot = pc->ours[h];
            int relro = 0;
            for (int p = 0; p < info->dlpi_phnum; p++) {
                const ElfW(Phdr) *ph = &info->dlpi_phdr[p];
                uintptr_t a = (uintptr_t)info->dlpi_addr + ph->p_vaddr;
                if (ph->p_type == PT_GNU_RELRO && (uintptr_t)slot >= a && (uintptr_t)slot < a + ph->p_memsz) relro = 1;
            }
            if (relro) mprotect((void *)pg, (size_t)page, PROT_READ);
            pc->patched++;
            break;
        }
    }
}

static int patch_object(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    struct patch_ctx *pc = data;
    if ((void *)info->dlpi_addr == pc->self || !info->dlpi_name || !info->dlpi_name[0]) return 0;
    if (strstr(info->dlpi_name, "linux-vdso") || strstr(info->dlpi_name, "ld-linux")) return 0;
    if (pc->dir[0]) { /* another copy of ggml in the process (another binding) keeps its own calls */
        char rp[PATH_MAX];
        size_t n = strlen(pc->dir);
        if (!realpath(info->dlpi_name, rp) || strncmp(rp, pc->dir, n) != 0 || (rp[n] != '/' && rp[n] != 0)) return 0;
    }
    const ElfW(Dyn) *dyn = NULL;
    for (int p = 0; p < info->dlpi_phnum; p++)
        if (info->dlpi_phdr[p].p_type == PT_DYNAMIC)
            dyn = (const ElfW(Dyn) *)((uintptr_t)info->dlpi_addr + info->dlpi_phdr[p].p_vaddr);
    if (!dyn) return 0;
    const ElfW(Sym) *symtab = NULL;
    const char *strtab = NULL;
    const ElfW(Rela) *jmprel = NULL, *rela = NULL;
    size_t jmpsz = 0, relasz = 0;
    int pltrel_rela = 1;
    for (const ElfW(Dyn) *d = dyn; d->d_tag != DT_NULL; d++) {
        switch (d->d_tag) {
        case DT_SYMTAB: symtab = (const ElfW(Sym) *)dyn_ptr(info, d->d_un.d_ptr); break;
        case DT_STRTAB: strtab = (const char *)dyn_ptr(info, d->d_un.d_ptr); break;
        case DT_JMPREL: jmprel = (const ElfW(Rela) *)dyn_ptr(info, d->d_un.d_ptr); break;
        case DT_PLTRELSZ: jmpsz = d->d_un.d_val; break;
        case DT_RELA: rela = (const ElfW(Rela) *)dyn_ptr(info, d->d_un.d_ptr); break;
        case DT_RELASZ: relasz = d->d_un.d_val; break;
        case DT_PLTREL: pltrel_rela = d->d_un.d_val == DT_RELA; break;
        default: break;
        }
    }
    if (!symtab || !strtab) return 0;
    if (jmprel && pltrel_rela) patch_relocs(info, jmprel, jmpsz / sizeof *jmprel, symtab, strtab, pc);
    if (rela) patch_relocs(info, rela, relasz / sizeof *rela, symtab, strtab, pc);
    return 0;
}
#endif

void sched_reset_all(void);
void ctx_reset_all(void);
void io_reset(void);

static long g_records_base;

/* Start tracing into `path`. keepalive: 1 keep-alive, 0 callback. libdir: the directory of the llama.cpp libraries
 * to hook (NULL or "": every loaded object). Returns 0, or -1 when this process is already traced by
 * `gguf-experts run` (the environment's GGUF_EXPERTS_TRACE), -2 when this platform cannot be hooked, -3 when no
 * library there calls the scheduler (llama.cpp not loaded yet, or linked statically), -4 bad path. */
EXPORT int ggexp_inproc_begin(const char *path, int weights, int keepalive, const char *libdir) {
    static int hooked;
    const char *env = getenv("GGUF_EXPERTS_TRACE");
    if (env && *env && g_enabled) return -1;
    if (!path || strlen(path) >= sizeof g_path) return -4;
#ifndef R_JUMP_SLOT
    (void)weights;
    (void)keepalive;
    (void)hooked;
    (void)libdir;
    return -2;
#else
    if (!hooked) {
        static struct patch_ctx pc;
        memset(&pc, 0, sizeof pc);
        if (libdir && *libdir && !realpath(libdir, pc.dir)) return -4;
        Dl_info di;
        if (!dladdr((void *)ggexp_inproc_begin, &di)) return -2;
        pc.self = di.dli_fbase;
        void *h = dlopen(di.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
        dlsym_t ds = rdlsym();
        for (int i = 0; HOOKED[i] && h && ds; i++) pc.ours[i] = ds(h, HOOKED[i]); /* ours: our handle first */
        if (h) dlclose(h);
        dl_iterate_phdr(patch_object, &pc);
        if (!pc.patched) return -3;
        hooked = 1;
    }
    pthread_mutex_lock(&g_lock);
    strcpy(g_path, path);
    g_weights = weights != 0;
    g_keepalive = keepalive != 0;
    const char *c = getenv("GGUF_EXPERTS_COST");
    g_cost_probe = !c || !*c ? 0 : strcmp(c, "noop") == 0 ? COST_NOOP : strcmp(c, "flags") == 0 ? COST_FLAGS : 0;
    g_fd = g_seq_fd = -1;
    g_header_done = g_failed = 0;
    g_next_seq = 0;
    g_unmatched = g_warmup = g_dropped = g_copy_calls = g_copy_ubatches = 0;
    g_n_models = 0;
    g_main = -1;
    memset(&g_noctx, 0, sizeof g_noctx);
    g_records_base = __atomic_load_n(&g_records, __ATOMIC_RELAXED);
    g_hint_phase = -1;
    g_inproc = 1;
    pthread_mutex_unlock(&g_lock);
    ctx_reset_all();
    sched_reset_all();
    io_reset();
    if (!g_real_decode) g_real_decode = (decode_t)find_real("llama_decode");
    g_enabled = 1;
    return 0;
#endif
}

/* The phase of the rows the next llama_decode computes (0 prefill, 1 decode; -1: inferred as under `run`). The
 * in-process caller knows it, so `capture --all-outputs` with several ubatches is recorded as prefill. */
EXPORT void ggexp_inproc_phase(int phase) { g_hint_phase = phase; }

#ifdef GGEXP_HOSTPROF
int64_t g_prof_ns[PROF_N], g_prof_n[PROF_N], g_prof_mark;
int64_t prof_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}
/* The host time of each step so far (ns[i], n[i]); zeroed by the call. */
EXPORT int ggexp_inproc_hostprof(int64_t *ns, int64_t *n) {
    memcpy(ns, g_prof_ns, sizeof g_prof_ns);
    memcpy(n, g_prof_n, sizeof g_prof_n);
    memset(g_prof_ns, 0, sizeof g_prof_ns);
    memset(g_prof_n, 0, sizeof g_prof_n);
    return PROF_N;
}
#endif

/* Records written since begin (CaptureResult.records). */
EXPORT long ggexp_inproc_records(void) { return __atomic_load_n(&g_records, __ATOMIC_RELAXED) - g_records_base; }

/* Stop tracing: the contexts are freed (their last ubatch flushed); close the trace and its sidecar (the caller
 * finalises the header). Returns the rows dropped for lack of memory. */
EXPORT long ggexp_inproc_end(void) {
    if (!g_enabled) return 0;
    pthread_mutex_lock(&g_lock);
    long dropped = __atomic_load_n(&g_dropped, __ATOMIC_RELAXED);
    if (g_seq_fd >= 0) {
        write_end_counts(g_seq_fd, true);
        close(g_seq_fd);
        g_seq_fd = -1;
    }
    if (g_fd >= 0) {
        close(g_fd);
        g_fd = -1;
    }
    g_enabled = 0;
    pthread_mutex_unlock(&g_lock);
    return dropped;
}
