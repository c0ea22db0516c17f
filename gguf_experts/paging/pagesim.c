/* pagesim.c: a model of the Linux page cache under one process's mmap of a model file.
 *
 * Compiled on first use with the system cc into the user cache (gguf_experts/paging/native.py) and driven
 * through ctypes. Units: 4 KiB pages, grouped into blocks of 16 pages (64 KiB = fault_around_bytes): a block
 * carries per-page bit masks (resident, mapped, PG_readahead) and block-wide LRU state (list, active, young,
 * PG_referenced, PG_workingset, VM_RAND_READ). What each function follows in the kernel (v6.18):
 *   fault()         mm/memory.c do_read_fault + do_fault_around (filemap_map_pages: maps cached, uptodate,
 *                   not-PG_readahead pages of the 16-page window; each page mapped from a folio without
 *                   PG_workingset lowers mmap_miss), mm/filemap.c filemap_fault
 *   sync_ra()       mm/filemap.c do_sync_mmap_readahead: VM_RAND_READ -> one page; mmap_miss++ and the
 *                   MMAP_LOTSAMISS (100) cut-off; read-around of ra_pages starting at pgoff - ra_pages/2,
 *                   async_size ra_pages/4 (PG_readahead mark at start + size - async_size)
 *   async_ra()      mm/filemap.c do_async_mmap_readahead (mmap_miss--) + mm/readahead.c page_cache_async_ra
 *                   (expected-index window advance, page_cache_next_miss fallback, get_next_ra_size, the
 *                   window's end aligned down to 1 << min(ra->order, ffs(max_pages) - 1))
 *   read_range()    mm/readahead.c page_cache_ra_unbounded: only pages not cached are read; the mark goes on
 *                   a newly allocated folio only
 *   willneed()      mm/madvise.c madvise_willneed -> mm/fadvise.c generic_fadvise -> force_page_cache_ra:
 *                   at most max(bdi->io_pages, ra_pages) pages per call
 *   reclaim()       mm/vmscan.c shrink_lruvec: inactive_is_low (inactive * int_sqrt(10 * GiB) < active),
 *                   shrink_active_list (file pages deactivated, young cleared, PG_workingset set),
 *                   shrink_folio_list + folio_check_references (young PTE: PG_referenced -> activate, else
 *                   set PG_referenced and keep; not young -> evict; a PTE in a VMA without recency, i.e.
 *                   MADV_RANDOM, does not count: mm/rmap.c invalid_folio_referenced_vma), kswapd's batch
 *                   (balance_pgdat: high - low watermark, one refault snapshot per run), mm/workingset.c workingset_eviction
 *                   (shadow = nonresident age) and workingset_refault (activate when the refault distance
 *                   <= active file pages; no swap, so anon does not count)
 * The retry after I/O (FAULT_FLAG_RETRY_NOWAIT) runs fault-around again and is one major fault.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BSHIFT 4
#define BPAGES 16
#define F_ACTIVE 1u
#define F_YOUNG 2u
#define F_REF 4u
#define F_WS 8u
#define L_NONE 0
#define L_INACT 1
#define L_ACT 2
#define NIL (-1)

enum { C_MAJ, C_MIN, C_RPAGES, C_RREQ, C_TOUCH, C_MISS, C_EVICT, C_IOTIME, C_WILLNEED, NCOUNT };

typedef struct {
    int64_t npages, nblk;
    uint16_t *res, *map, *ram, *rnd; /* rnd: VM_RAND_READ (MADV_RANDOM) per page */
    uint8_t *fl, *lst, *morder; /* morder: folio order of the PG_readahead mark in the block */
    int32_t *prv, *nxt;
    uint64_t *shadow; /* bit0 valid, bit1 workingset, age << 2 */
    int32_t head[3], tail[3];
    int64_t npg[3];
    int64_t resident, budget;
    int64_t batch;             /* pages reclaimed below the budget per reclaim run (kswapd: high - low watermark) */
    uint64_t age;
    int64_t mmap_miss, lotsamiss;
    int64_t refaults;          /* refault activations since the last reclaim (sc->may_deactivate) */
    int64_t ra_start, ra_size, ra_async, ra_pages, io_pages, ra_order, max_order;
    double lat, sec_per_page;
    double c[NCOUNT];
    int64_t *log, log_n, log_cap; /* optional: (kind, a, b) of every touch / willneed / read_seq */
} sim_t;

/* popcount of 16 bits by table: __builtin_popcount is a libgcc call without -mpopcnt (17% of the time) */
static uint8_t PC16[1 << 16];
static int pc16_ready;
static inline int pc16(unsigned v) { return PC16[v & 0xffffu]; }
static void pc16_init(void) {
    if (pc16_ready) return;
    for (unsigned v = 1; v < (1u << 16); v++) PC16[v] = (uint8_t)(PC16[v >> 1] + (v & 1u));
    pc16_ready = 1;
}

static void list_del(sim_t *s, int32_t b) {
    int l = s->lst[b];
    if (l == L_NONE) return;
    int32_t p = s->prv[b], n = s->nxt[b];
    if (p != NIL) s->nxt[p] = n; else s->head[l] = n;
    if (n != NIL) s->prv[n] = p; else s->tail[l] = p;
    s->npg[l] -= pc16(s->res[b]);
    s->lst[b] = L_NONE;
}

static void list_add_head(sim_t *s, int32_t b, int l) {
    s->prv[b] = NIL;
    s->nxt[b] = s->head[l];
    if (s->head[l] != NIL) s->prv[s->head[l]] = b; else s->tail[l] = b;
    s->head[l] = b;
    s->lst[b] = (uint8_t)l;
    s->npg[l] += pc16(s->res[b]);
}

sim_t *sim_new(int64_t npages, int64_t budget_pages, int64_t ra_pages, int64_t io_pages, double lat,
               double sec_per_page) {
    pc16_init();
    sim_t *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->npages = npages;
    s->nblk = (npages + BPAGES - 1) >> BSHIFT;
    size_t n = (size_t)s->nblk + 1;
    s->res = calloc(n, 2); s->map = calloc(n, 2); s->ram = calloc(n, 2); s->rnd = calloc(n, 2);
    s->fl = calloc(n, 1); s->lst = calloc(n, 1); s->morder = calloc(n, 1);
    s->prv = calloc(n, 4); s->nxt = calloc(n, 4);
    s->shadow = calloc(n, 8);
    if (!s->res || !s->map || !s->ram || !s->rnd || !s->fl || !s->lst || !s->morder || !s->prv || !s->nxt || !s->shadow) return NULL;
    for (int l = 0; l < 3; l++) s->head[l] = s->tail[l] = NIL;
    s->budget = budget_pages;
    s->ra_pages = ra_pages;
    s->io_pages = io_pages;
    s->lotsamiss = 100;
    s->max_order = 9; /* MAX_PAGECACHE_ORDER on x86-64 (PMD order): ext4/xfs large folios */
    s->lat = lat;
    s->sec_per_page = sec_per_page;
    return s;
}

static void log_op(sim_t *s, int64_t kind, int64_t a, int64_t b) {
    if (!s->log || s->log_n >= s->log_cap) return;
    int64_t *e = s->log + 3 * s->log_n++;
    e[0] = kind; e[1] = a; e[2] = b;
}

/* Record every operation (0 touch, 1 willneed as asked, 2 sequential read) into buf [cap, 3]. */
void sim_set_log(sim_t *s, int64_t *buf, int64_t cap) { s->log = buf; s->log_cap = cap; s->log_n = 0; }
int64_t sim_log_n(sim_t *s) { return s->log_n; }

void sim_free(sim_t *s) {
    if (!s) return;
    free(s->res); free(s->map); free(s->ram); free(s->rnd); free(s->fl); free(s->morder); free(s->lst); free(s->prv); free(s->nxt);
    free(s->shadow); free(s);
}

void sim_counters(sim_t *s, double *out, int reset) {
    memcpy(out, s->c, sizeof s->c);
    if (reset) memset(s->c, 0, sizeof s->c);
}

int64_t sim_resident(sim_t *s) { return s->resident; }

/* kswapd's hysteresis: woken when free memory falls below the low watermark, it reclaims until it is above the
 * high one (mm/vmscan.c balance_pgdat), and the refaults that decide may_deactivate are counted from one such run
 * to the next (snapshot_refaults at its end). So each reclaim run frees `pages` below the budget. */
void sim_set_reclaim_batch(sim_t *s, int64_t pages) { s->batch = pages > 0 ? pages : 0; }
int64_t sim_mmap_miss(sim_t *s) { return s->mmap_miss; }

/* VM_RAND_READ (MADV_RANDOM) on pages [a, b). */
void sim_set_rand(sim_t *s, int64_t a, int64_t b, int on) {
    if (b > s->npages) b = s->npages;
    for (int64_t p = a < 0 ? 0 : a; p < b; p++) {
        if (on) s->rnd[p >> BSHIFT] |= (uint16_t)(1u << (p & 15));
        else s->rnd[p >> BSHIFT] &= (uint16_t)~(1u << (p & 15));
    }
}

static void evict(sim_t *s, int32_t b) {
    int pages = pc16(s->res[b]);
    list_del(s, b);
    s->shadow[b] = (s->age << 2) | ((s->fl[b] & F_WS) ? 2u : 0u) | 1u;
    s->age += (uint64_t)pages;
    s->resident -= pages;
    s->c[C_EVICT] += pages;
    s->res[b] = s->map[b] = s->ram[b] = 0;
    s->fl[b] = 0;
}

static int64_t isqrt64(int64_t x) {
    int64_t r = 0;
    while ((r + 1) * (r + 1) <= x) r++;
    return r;
}

static int inactive_is_low(sim_t *s) {
    int64_t gb = (s->npg[L_INACT] + s->npg[L_ACT]) >> 18;
    int64_t ratio = gb ? isqrt64(10 * gb) : 1;
    return s->npg[L_INACT] * ratio < s->npg[L_ACT];
}

static void shrink_active(sim_t *s, int64_t nr) {
    while (nr > 0 && s->tail[L_ACT] != NIL) {
        int32_t b = s->tail[L_ACT];
        nr -= pc16(s->res[b]);
        list_del(s, b);
        s->fl[b] &= (uint8_t)~(F_YOUNG | F_ACTIVE);
        s->fl[b] |= F_WS;
        list_add_head(s, b, L_INACT);
    }
}

static void shrink_inactive(sim_t *s, int64_t nr, int64_t target) {
    while (nr > 0 && s->tail[L_INACT] != NIL && s->resident > target) {
        int32_t b = s->tail[L_INACT];
        nr -= pc16(s->res[b]);
        /* folio_referenced skips a VMA without recency (mm/rmap.c invalid_folio_referenced_vma: vma_has_recency
         * is false under VM_RAND_READ or VM_SEQ_READ): a page mapped only through MADV_RANDOM is never referenced
         * for reclaim, so it is evicted at the tail however often it is used (FIFO), and only a refault can
         * activate it. */
        if ((s->fl[b] & F_YOUNG) && (s->map[b] & (uint16_t)~s->rnd[b])) {
            s->fl[b] &= (uint8_t)~F_YOUNG;
            list_del(s, b);
            if (s->fl[b] & F_REF) { /* PG_referenced stays set: a deactivated block used once more returns */
                s->fl[b] |= F_ACTIVE;
                s->age += (uint64_t)pc16(s->res[b]); /* move_folios_to_lru: workingset_age_nonresident */
                list_add_head(s, b, L_ACT);
            } else {
                s->fl[b] |= F_REF;
                list_add_head(s, b, L_INACT);
            }
        } else {
            evict(s, b);
        }
    }
}

/* shrink_lruvec with prepare_scan_control's may_deactivate: the active file list is scanned (in proportion
 * to its size against the inactive list, get_scan_count's SCAN_FILE balance) when the inactive list is low or
 * when file refaults were activated since the last reclaim (the workingset is changing). */
static void reclaim(sim_t *s) {
    int guard = 0;
    int may_deactivate = s->refaults > 0;
    int64_t target = s->budget - s->batch;
    s->refaults = 0;
    while (s->resident > target && guard++ < (1 << 30)) {
        if (s->tail[L_INACT] == NIL) shrink_active(s, 32);
        else if (may_deactivate || inactive_is_low(s)) {
            int64_t nr = s->npg[L_INACT] > 0 ? 32 * s->npg[L_ACT] / s->npg[L_INACT] : 32;
            if (nr < 1) nr = 1;
            shrink_active(s, nr);
        }
        if (s->tail[L_INACT] == NIL && s->tail[L_ACT] == NIL) break;
        shrink_inactive(s, 32, target);
    }
}

/* Pages of [a, b) not cached are read: runs of them are requests, or one request per page (single). */
static void read_range_x(sim_t *s, int64_t a, int64_t b, int single) {
    if (a < 0) a = 0;
    if (b > s->npages) b = s->npages;
    if (a >= b) return;
    int carry = 0;
    int64_t pages = 0, reqs = 0;
    for (int64_t blk = a >> BSHIFT; blk <= (b - 1) >> BSHIFT; blk++) {
        int64_t p0 = blk << BSHIFT;
        int lo = a > p0 ? (int)(a - p0) : 0;
        int hi = b < p0 + BPAGES ? (int)(b - p0) : BPAGES;
        unsigned rng = ((hi >= 16 ? 0xffffu : ((1u << hi) - 1u)) >> lo) << lo;
        unsigned miss = rng & ~(unsigned)s->res[blk];
        if (lo > 0) carry = 0;
        if (miss) {
            unsigned starts = miss & ~((miss << 1) | (unsigned)carry);
            int np = pc16(miss);
            reqs += pc16(starts);
            pages += np;
            int32_t bb = (int32_t)blk;
            if (s->lst[bb] == L_NONE) {
                s->res[bb] |= (uint16_t)miss;
                int act = 0;
                if (s->shadow[bb] & 1u) {
                    uint64_t dist = s->age - (s->shadow[bb] >> 2);
                    if ((int64_t)dist <= s->npg[L_ACT]) {
                        act = 1;
                        s->refaults += np;
                        s->age += (uint64_t)np;
                        if (s->shadow[bb] & 2u) s->fl[bb] |= F_WS;
                    }
                    s->shadow[bb] = 0;
                }
                if (act) { s->fl[bb] |= F_ACTIVE; list_add_head(s, bb, L_ACT); }
                else list_add_head(s, bb, L_INACT);
            } else {
                s->res[bb] |= (uint16_t)miss;
                s->npg[s->lst[bb]] += np;
            }
            s->resident += np;
        }
        carry = (hi == BPAGES) && ((miss >> 15) & 1u);
    }
    if (single) reqs = pages;
    if (pages) {
        s->c[C_RPAGES] += (double)pages;
        /* a request longer than the device's max transfer (io_pages) is split */
        int64_t extra = s->io_pages > 0 ? pages / s->io_pages : 0;
        s->c[C_RREQ] += (double)(reqs + extra);
        s->c[C_IOTIME] += (double)(reqs + extra) * s->lat + (double)pages * s->sec_per_page;
        if (s->resident > s->budget) reclaim(s);
    }
}

static void read_range(sim_t *s, int64_t a, int64_t b) { read_range_x(s, a, b, 0); }

static int all_missing(sim_t *s, int64_t a, int64_t b) {
    for (int64_t p = a; p < b && p < s->npages; p++)
        if ((s->res[p >> BSHIFT] >> (p & 15)) & 1u) return 0;
    return 1;
}

static void set_mark(sim_t *s, int64_t m0, int order) {
    for (int64_t p = m0; p < m0 + ((int64_t)1 << order) && p < s->npages; p++) {
        s->ram[p >> BSHIFT] |= (uint16_t)(1u << (p & 15));
        s->morder[p >> BSHIFT] = (uint8_t)order;
    }
}

static int clear_mark(sim_t *s, int64_t pg) {
    int order = s->morder[pg >> BSHIFT];
    int64_t f0 = pg & ~(((int64_t)1 << order) - 1);
    for (int64_t p = f0; p < f0 + ((int64_t)1 << order) && p < s->npages; p++)
        s->ram[p >> BSHIFT] &= (uint16_t)~(1u << (p & 15));
    return order;
}

static int ilog2_64(int64_t x) { int r = 0; while (x > 1) { x >>= 1; r++; } return r; }

/* page_cache_ra_order: folios of ra_order pages (aligned) from start; the folio holding `mark` gets
 * PG_readahead when it is allocated whole (no page of it cached), else the order-0 fallback marks one page. */
static void ra_read(sim_t *s, int64_t start, int64_t size, int64_t async) {
    int64_t mark = start + size - async;
    int order = (int)s->ra_order;
    if (order > s->max_order) order = (int)s->max_order;
    if (order > ilog2_64(size)) order = ilog2_64(size);
    s->ra_order = order;
    /* the folio holding the mark: folios are allocated from start, each of `order` pages unless start's own
     * alignment is smaller (order = __ffs(index)), so the first folio's order is min(order, ctz(start)) */
    int mo = order;
    if (start > 0 && (start & (((int64_t)1 << mo) - 1))) mo = __builtin_ctzll((unsigned long long)start);
    int64_t m0 = mark & ~(((int64_t)1 << mo) - 1);
    if (m0 < start) { mo = 0; m0 = mark; }
    int whole = mark >= 0 && mark < s->npages && all_missing(s, m0, m0 + ((int64_t)1 << mo));
    int page_missing = mark >= 0 && mark < s->npages && all_missing(s, mark, mark + 1);
    read_range(s, start, start + size);
    if (whole) set_mark(s, m0, mo);
    else if (page_missing) set_mark(s, mark, 0);
}

static int64_t next_size(int64_t cur, int64_t max) {
    if (cur < max / 16) return 4 * cur;
    if (cur <= max / 2) return 2 * cur;
    return max;
}

static int is_resident(sim_t *s, int64_t p) { return (s->res[p >> BSHIFT] >> (p & 15)) & 1u; }

static void async_ra(sim_t *s, int64_t pg, int forder) {
    int64_t max = s->ra_pages;
    int64_t expected = (s->ra_start + s->ra_size - s->ra_async) & ~(((int64_t)1 << forder) - 1);
    if (pg == expected) {
        s->ra_start += s->ra_size;
        s->ra_size = next_size(s->ra_size, max);
        s->ra_async = s->ra_size;
    } else {
        int64_t start = pg + 1;
        while (start < s->npages && start - pg <= max && is_resident(s, start)) start++;
        if (start >= s->npages || start - pg > max) return;
        s->ra_start = start;
        s->ra_size = next_size(start - pg + s->ra_pages, max);
        s->ra_async = s->ra_size;
    }
    /* readit: the order grows by 2, and the window's end is rounded down to 1 << min(order, ffs(max) - 1) pages
     * (when that leaves something), so windows from an unaligned start end a few pages short */
    s->ra_order += 2;
    if (max > 0) {
        int sh = __builtin_ctzll((unsigned long long)max);
        if (s->ra_order < sh) sh = (int)s->ra_order;
        int64_t end = s->ra_start + s->ra_size, aligned_end = end & ~(((int64_t)1 << sh) - 1);
        if (aligned_end > s->ra_start) s->ra_size -= end - aligned_end;
        s->ra_async = s->ra_size;
    }
    ra_read(s, s->ra_start, s->ra_size, s->ra_async);
}

static void fault(sim_t *s, int64_t pg) {
    int32_t b = (int32_t)(pg >> BSHIFT);
    unsigned bit = 1u << (pg & 15);
    int major = 0;
    for (int attempt = 0; attempt < 3; attempt++) {
        unsigned fa = (unsigned)s->res[b] & ~(unsigned)s->ram[b] & ~(unsigned)s->map[b];
        if (fa) {
            s->map[b] |= (uint16_t)fa;
            s->fl[b] |= F_YOUNG;
            if (!(s->fl[b] & F_WS)) {
                int n = pc16(fa);
                s->mmap_miss = s->mmap_miss > n ? s->mmap_miss - n : 0;
            }
        }
        if (s->map[b] & bit) break;
        if (s->res[b] & bit) { /* cached but not mapped by fault-around: PG_readahead */
            if (!major && !(s->rnd[b] & bit) && s->ra_pages) {
                if (s->mmap_miss > 0) s->mmap_miss--;
                if (s->ram[b] & bit) { int o = clear_mark(s, pg); async_ra(s, pg, o); }
            }
            s->map[b] |= (uint16_t)bit;
            s->fl[b] |= F_YOUNG;
            break;
        }
        if (major) break; /* read and evicted before the retry (a budget below one read-around) */
        major = 1;
        s->c[C_MISS] += 1;
        if ((s->rnd[b] & bit) || !s->ra_pages) {
            read_range(s, pg, pg + 1);
        } else {
            if (s->mmap_miss < s->lotsamiss * 10) s->mmap_miss++;
            if (s->mmap_miss > s->lotsamiss) {
                read_range(s, pg, pg + 1);
            } else {
                int64_t start = pg - s->ra_pages / 2;
                if (start < 0) start = 0;
                s->ra_start = start;
                s->ra_size = s->ra_pages;
                s->ra_async = s->ra_pages / 4;
                s->ra_order = 0;
                ra_read(s, start, s->ra_size, s->ra_async);
            }
        }
    }
    s->c[major ? C_MAJ : C_MIN] += 1;
}

/* The process reads pages [a, b) in order (every page of the range). */
void sim_touch(sim_t *s, int64_t a, int64_t b) {
    if (a < 0) a = 0;
    if (b > s->npages) b = s->npages;
    if (a >= b) return;
    log_op(s, 0, a, b);
    s->c[C_TOUCH] += (double)(b - a);
    for (int64_t blk = a >> BSHIFT; blk <= (b - 1) >> BSHIFT; blk++) {
        int64_t p0 = blk << BSHIFT;
        int lo = a > p0 ? (int)(a - p0) : 0;
        int hi = b < p0 + BPAGES ? (int)(b - p0) : BPAGES;
        unsigned m = ((hi >= 16 ? 0xffffu : ((1u << hi) - 1u)) >> lo) << lo;
        if (((unsigned)s->map[blk] & m) == m) { s->fl[blk] |= F_YOUNG; continue; }
        if (((unsigned)s->rnd[blk] & m) == m && !((unsigned)s->ram[blk] & m)) {
            /* MADV_RANDOM pages, no read-ahead marks: each missing page is one major fault reading that page
             * alone (do_sync_mmap_readahead returns at VM_RAND_READ, mmap_miss untouched); the retries'
             * fault-around maps every cached page of the 16-page window. Same counts as the page loop. */
            unsigned missing = m & ~(unsigned)s->res[blk];
            int nm = pc16(missing);
            if (nm) {
                s->c[C_MAJ] += nm;
                s->c[C_MISS] += nm;
                read_range_x(s, p0 + lo, p0 + hi, 1);
            }
            unsigned fa = (unsigned)s->res[blk] & ~(unsigned)s->ram[blk] & ~(unsigned)s->map[blk];
            if (fa) {
                if (!nm) s->c[C_MIN] += 1;
                s->map[blk] |= (uint16_t)fa;
                if (!(s->fl[blk] & F_WS)) {
                    int n = pc16(fa);
                    s->mmap_miss = s->mmap_miss > n ? s->mmap_miss - n : 0;
                }
            }
            if (s->res[blk]) s->fl[blk] |= F_YOUNG;
            continue;
        }
        for (int i = lo; i < hi; i++) {
            if (!((s->map[blk] >> i) & 1u)) fault(s, p0 + i);
        }
        if (s->res[blk]) s->fl[blk] |= F_YOUNG;
    }
}

/* MADV_WILLNEED / POSIX_FADV_WILLNEED over pages [a, b): force_page_cache_ra's cap. */
void sim_willneed(sim_t *s, int64_t a, int64_t b) {
    int64_t cap = s->io_pages > s->ra_pages ? s->io_pages : s->ra_pages;
    log_op(s, 1, a, b); /* as asked: the kernel caps it */
    if (b - a > cap) b = a + cap;
    double before = s->c[C_RPAGES];
    read_range(s, a, b);
    s->c[C_WILLNEED] += s->c[C_RPAGES] - before;
}

/* A sequential read of [a, b) through the page cache (pread/readahead pass in a helper thread). */
void sim_read_seq(sim_t *s, int64_t a, int64_t b) {
    log_op(s, 2, a, b);
    double before = s->c[C_RPAGES];
    int64_t step = s->ra_pages > 0 ? s->ra_pages : 32;
    for (int64_t x = a; x < b; x += step) read_range(s, x, x + step < b ? x + step : b);
    s->c[C_WILLNEED] += s->c[C_RPAGES] - before;
}

/* ---- replay of a trace chunk in llama.cpp's order ------------------------------------------------- */
typedef struct {
    int32_t n_block, n_expert;
    const int64_t *ne_idx;   /* [n_block + 2]: non-expert page ranges of block l at ne_idx[l]..ne_idx[l+1];
                                entry n_block: after the last block (output_norm, output) */
    const int64_t *ne_a, *ne_b;
    const int64_t *ex_idx;   /* [n_block + 1]: expert tensors of block l (gate, up, down, ...) */
    const int64_t *ex_base, *ex_slice; /* bytes: tensor start, bytes per expert */
    int64_t embd_off, embd_row;        /* token_embd: bytes */
    int32_t mode;                      /* 0 stock, 1 random, 2 prefetch */
    double whole_frac;
    int32_t cur_layer;                 /* state across chunks: last block done in the current ubatch */
    int64_t cur_ub;
    int64_t willneed_step;             /* pages per MADV_WILLNEED call of a prefetch (0: whole tensors read
                                          exactly, runs in one call each) */
} replay_t;

/* MADV_WILLNEED over [a, b) in calls of `step` pages (each capped by the kernel). */
static void willneed_steps(sim_t *s, int64_t a, int64_t b, int64_t step) {
    if (step <= 0) { sim_willneed(s, a, b); return; }
    for (int64_t x = a; x < b; x += step) sim_willneed(s, x, x + step < b ? x + step : b);
}

#define PG(x) ((x) >> 12)
#define PGUP(x) (((x) + 4095) >> 12)

static void touch_bytes(sim_t *s, int64_t a, int64_t b) { if (b > a) sim_touch(s, PG(a), PGUP(b)); }

static void nonexpert(sim_t *s, replay_t *r, int32_t l) {
    for (int64_t i = r->ne_idx[l]; i < r->ne_idx[l + 1]; i++) sim_touch(s, r->ne_a[i], r->ne_b[i]);
}

static void finish_ubatch(sim_t *s, replay_t *r, double *out, int64_t *n_out) {
    if (r->cur_ub < 0) return;
    for (int32_t l = r->cur_layer + 1; l < r->n_block; l++) nonexpert(s, r, l);
    nonexpert(s, r, r->n_block);
    double *row = out + (*n_out) * (NCOUNT + 1);
    row[0] = (double)r->cur_ub;
    sim_counters(s, row + 1, 1);
    (*n_out)++;
    r->cur_ub = -1;
}

static void experts(sim_t *s, replay_t *r, int32_t l, const uint8_t *sel) {
    int32_t ne = r->n_expert, nsel = 0;
    for (int32_t e = 0; e < ne; e++) nsel += sel[e] != 0;
    int whole = r->mode == 2 && nsel >= r->whole_frac * ne;
    if (r->mode == 2) { /* at ffn_moe_topk-L: WILLNEED the selected slices of every expert tensor */
        for (int64_t t = r->ex_idx[l]; t < r->ex_idx[l + 1]; t++) {
            int64_t base = r->ex_base[t], sl = r->ex_slice[t];
            if (whole) {
                if (r->willneed_step > 0) willneed_steps(s, PG(base), PGUP(base + sl * ne), r->willneed_step);
                else sim_read_seq(s, PG(base), PGUP(base + sl * ne));
                continue;
            }
            for (int32_t e = 0; e < ne;) {
                if (!sel[e]) { e++; continue; }
                int32_t f = e;
                while (f < ne && sel[f]) f++;
                willneed_steps(s, PG(base + sl * e), PGUP(base + sl * f), r->willneed_step);
                e = f;
            }
        }
    }
    for (int64_t t = r->ex_idx[l]; t < r->ex_idx[l + 1]; t++) {
        int64_t base = r->ex_base[t], sl = r->ex_slice[t];
        for (int32_t e = 0; e < ne;) {
            if (!sel[e]) { e++; continue; }
            int32_t f = e;
            while (f < ne && sel[f]) f++;
            touch_bytes(s, base + sl * e, base + sl * f);
            e = f;
        }
    }
}

/* Records: one per (ubatch, MoE block), in order; sel [n_rec, n_expert]; tokens of record i at
 * tok[tok_off[i] .. tok_off[i+1]). Finished ubatches go to out (rows of 1 + NCOUNT doubles); returns their
 * count. flush: finish the last ubatch too. */
int64_t sim_replay(sim_t *s, replay_t *r, int64_t n_rec, const int64_t *rec_ub, const int32_t *rec_layer,
                   const uint8_t *sel, const int64_t *tok_off, const int32_t *tok, int flush, double *out) {
    int64_t n_out = 0;
    for (int64_t i = 0; i < n_rec; i++) {
        if (rec_ub[i] != r->cur_ub) {
            finish_ubatch(s, r, out, &n_out);
            r->cur_ub = rec_ub[i];
            r->cur_layer = -1;
            for (int64_t j = tok_off[i]; j < tok_off[i + 1]; j++) {
                int64_t a = r->embd_off + (int64_t)tok[j] * r->embd_row;
                touch_bytes(s, a, a + r->embd_row);
            }
        }
        int32_t l = rec_layer[i];
        for (int32_t m = r->cur_layer + 1; m <= l && m < r->n_block; m++) nonexpert(s, r, m);
        experts(s, r, l, sel + i * (int64_t)r->n_expert);
        r->cur_layer = l;
    }
    if (flush) finish_ubatch(s, r, out, &n_out);
    return n_out;
}

int sim_ncount(void) { return NCOUNT; }

/* The read-ahead state (start, size, async_size, mmap_miss): for tests and debugging. */
void sim_ra_state(sim_t *s, int64_t *out) {
    out[0] = s->ra_start; out[1] = s->ra_size; out[2] = s->ra_async; out[3] = s->mmap_miss;
}

/* Pages on the inactive and active lists (for tests and debugging). */
void sim_lists(sim_t *s, int64_t *out) { out[0] = s->npg[L_INACT]; out[1] = s->npg[L_ACT]; out[2] = s->resident; }
