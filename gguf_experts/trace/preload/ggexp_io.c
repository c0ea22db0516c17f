/* Measured I/O (trace version 2): the process's disk reads, major faults and wall time per ubatch, and at start
 * the memory and page-cache state (io_start). The same quantities, the same way, as gguf_experts/trace/iostat.py.
 *
 * Cost per ubatch: two snapshots, each one pread() of /proc/self/io on a descriptor kept open, one getrusage() and
 * one clock_gettime(): a few microseconds, against milliseconds of compute per ubatch. */
#include "ggexp.h"
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>

static int g_io_fd = -1, g_io_off;
static pthread_once_t g_io_once = PTHREAD_ONCE_INIT;
static void io_open(void) {
    const char *e = getenv("GGUF_EXPERTS_MEASURE"); /* 0: no measurement records (benchmarks of their cost) */
    g_io_off = e && strcmp(e, "0") == 0;
    if (!g_io_off) g_io_fd = open("/proc/self/io", O_RDONLY | O_CLOEXEC);
}

int io_enabled(void) {
    pthread_once(&g_io_once, io_open);
    return !g_io_off;
}

static int64_t proc_read_bytes(void) {
    pthread_once(&g_io_once, io_open);
    if (g_io_fd < 0) return -1;
    char buf[512];
    ssize_t n = pread(g_io_fd, buf, sizeof buf - 1, 0);
    if (n <= 0) return -1;
    buf[n] = 0;
    const char *p = strstr(buf, "\nread_bytes: ");
    return p ? strtoll(p + 13, NULL, 10) : -1;
}

void io_snap(struct io_snap *s) {
    if (!io_enabled()) return;
    s->read_bytes = proc_read_bytes();
    struct rusage ru;
    s->majflt = getrusage(RUSAGE_SELF, &ru) == 0 ? (int64_t)ru.ru_majflt : -1;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    s->ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- at start -------------------------------------------------------------------------------------------- */
static struct {
    int taken, frozen;
    struct io_snap snap;
    int64_t mem_available, resident, size, read_ahead_kb, page_size;
} g_start;

static int64_t mem_available(void) {
    FILE *f = fopen("/proc/meminfo", "re");
    if (!f) return -1;
    char line[256];
    int64_t kb = -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "MemAvailable:", 13) == 0) {
            kb = strtoll(line + 13, NULL, 10);
            break;
        }
    fclose(f);
    return kb < 0 ? -1 : kb * 1024;
}

/* Bytes of the file in the page cache: mincore over a fresh read-only mapping that is never touched. -1 unknown. */
static int64_t file_resident(const char *path, int64_t *size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        return -1;
    }
    *size = st.st_size;
    if (st.st_size == 0) {
        close(fd);
        return 0;
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return -1;
    long page = sysconf(_SC_PAGESIZE);
    const size_t window = (size_t)1 << 30;
    unsigned char *vec = malloc(window / (size_t)page);
    int64_t pages = 0;
    for (size_t off = 0; vec && off < (size_t)st.st_size; off += window) {
        size_t len = (size_t)st.st_size - off < window ? (size_t)st.st_size - off : window;
        if (mincore((char *)map + off, len, vec) != 0) {
            pages = -1;
            break;
        }
        size_t np = (len + (size_t)page - 1) / (size_t)page;
        for (size_t i = 0; i < np; i++) pages += vec[i] & 1;
    }
    if (!vec) pages = -1;
    free(vec);
    munmap(map, (size_t)st.st_size);
    if (pages < 0) return -1;
    int64_t bytes = pages * page;
    return bytes < st.st_size ? bytes : st.st_size;
}

/* A queue attribute (read_ahead_kb, max_sectors_kb) of the block device `dev`: /sys/dev/block/MAJ:MIN/queue, a
 * partition's parent's; -1 when unknown (tmpfs, FUSE, network file systems). */
int64_t device_queue_kb(dev_t dev, const char *attr) {
    char link[128], real[PATH_MAX], q[PATH_MAX + 64];
    snprintf(link, sizeof link, "/sys/dev/block/%u:%u", major(dev), minor(dev));
    if (!realpath(link, real)) return -1;
    snprintf(q, sizeof q, "%s/queue/%s", real, attr);
    if (access(q, R_OK) != 0) {
        char *slash = strrchr(real, '/'); /* a partition: its disk's queue */
        if (!slash) return -1;
        *slash = 0;
        snprintf(q, sizeof q, "%s/queue/%s", real, attr);
    }
    FILE *f = fopen(q, "re");
    if (!f) return -1;
    long long kb = -1;
    if (fscanf(f, "%lld", &kb) != 1) kb = -1;
    fclose(f);
    return kb;
}

static int64_t read_ahead_kb(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? device_queue_kb(st.st_dev, "read_ahead_kb") : -1;
}

/* Before a GGUF's header is read (gguf_init_from_file), until the first MoE model is found (io_start_freeze): memory,
 * residency of every shard (NAME-00001-of-0000N.gguf), read-ahead, and the process counters (io_load is the load's
 * share). Taken before the header read: read-ahead around it would bring in megabytes of the file. */
void io_start_capture(const char *path) {
    if (g_start.frozen || !io_enabled()) return;
    g_start.taken = 1;
    g_start.mem_available = mem_available();
    g_start.page_size = sysconf(_SC_PAGESIZE);
    g_start.read_ahead_kb = read_ahead_kb(path);
    g_start.resident = 0;
    g_start.size = 0;
    size_t len = strlen(path);
    unsigned no = 0, count = 0;
    const char *tail = len >= 20 ? path + len - 20 : NULL; /* "-00001-of-00003.gguf" */
    int split = tail && sscanf(tail, "-%5u-of-%5u.gguf", &no, &count) == 2 && no >= 1 && no <= count
                && strcmp(tail + 15, ".gguf") == 0;
    for (unsigned i = 1; i <= (split ? count : 1); i++) {
        char shard[PATH_MAX];
        if (split) snprintf(shard, sizeof shard, "%.*s-%05u-of-%05u.gguf", (int)(len - 20), path, i, count);
        else snprintf(shard, sizeof shard, "%s", path);
        int64_t size = 0, r = file_resident(shard, &size);
        g_start.size += size;
        if (r < 0 || g_start.resident < 0) g_start.resident = -1;
        else g_start.resident += r;
    }
    io_snap(&g_start.snap);
}

void io_start_freeze(void) { g_start.frozen = g_start.taken; }

/* A new in-process trace (ggexp_inproc.c): its own io_start, taken when its model is opened. */
void io_reset(void) { memset(&g_start, 0, sizeof g_start); }

static void num(char *dst, size_t cap, int64_t v) {
    if (v < 0) snprintf(dst, cap, "null");
    else snprintf(dst, cap, "%lld", (long long)v);
}

/* The header meta's "io_start" and "io_load" (the latter up to `first`: the start of the first traced ubatch). */
int io_json(char *dst, size_t cap, const struct io_snap *first) {
    if (!g_start.taken || !io_enabled()) return snprintf(dst, cap, "\"io_start\": null");
    char mem[32], res[32], ra[32], rb[32], mf[32], lrb[32], lmf[32];
    num(mem, sizeof mem, g_start.mem_available);
    num(res, sizeof res, g_start.resident);
    num(ra, sizeof ra, g_start.read_ahead_kb);
    num(rb, sizeof rb, g_start.snap.read_bytes);
    num(mf, sizeof mf, g_start.snap.majflt);
    const struct io_snap *s0 = &g_start.snap;
    num(lrb, sizeof lrb, first->read_bytes >= 0 && s0->read_bytes >= 0 ? first->read_bytes - s0->read_bytes : -1);
    num(lmf, sizeof lmf, first->majflt >= 0 && s0->majflt >= 0 ? first->majflt - s0->majflt : -1);
    return snprintf(dst, cap,
                    "\"io_start\": {\"mem_available\": %s, \"model_resident\": %s, \"model_size\": %lld, "
                    "\"read_ahead_kb\": %s, \"page_size\": %lld, \"read_bytes\": %s, \"majflt\": %s}, "
                    "\"io_load\": {\"read_bytes\": %s, \"majflt\": %s, \"wall_ns\": %lld}",
                    mem, res, (long long)g_start.size, ra, (long long)g_start.page_size, rb, mf, lrb, lmf,
                    (long long)(first->ns - s0->ns));
}
