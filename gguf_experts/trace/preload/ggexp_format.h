/* The trace.bin byte layout, for the C tracer: the C statement of gguf_experts/trace/format.py, which is the
 * definition (docs/trace-format.md has the table). tests/test_trace_format_c.py compiles a program that includes
 * this header and prints every constant, size and offset below, and compares them with format.py; change both
 * together. All integers little-endian (the tracer runs on little-endian hosts only; ggexp.h checks). */
#ifndef GGEXP_FORMAT_H
#define GGEXP_FORMAT_H
#include <stddef.h>
#include <stdint.h>

#define GGEXP_MAGIC "GGEXTRC"          /* 8 bytes with its NUL: format.MAGIC */
#define GGEXP_MAGIC_LEN 8
#define GGEXP_VERSION 2u                /* format.VERSION */
#define GGEXP_REC_MARKER 0x52584547u    /* format.REC_MARKER: "GEXR" read as a little-endian u32 */
#define GGEXP_MEAS_MARKER 0x4D584547u   /* format.MEAS_MARKER: "GEXM", a measurement record (version 2) */
#define GGEXP_MEAS_NO_READ_BYTES 1u     /* format.MEAS_FLAG_NO_READ_BYTES */
#define GGEXP_MEAS_NO_MAJFLT 2u         /* format.MEAS_FLAG_NO_MAJFLT */
#define GGEXP_FLAG_WEIGHTS 1u           /* format.FLAG_WEIGHTS: f32 weights[n][k] follow the experts */
#define GGEXP_HEADER_ALIGN 8            /* format.HEADER_ALIGN: the JSON is space-padded to it */
#define GGEXP_CRC_BYTES 4               /* format.CRC_BYTES: zlib CRC-32 of everything before it */

/* header = prefix | json[json_len] (space-padded) | u32 crc32: format.HEADER_FIELDS */
struct ggexp_header_prefix {
    char magic[GGEXP_MAGIC_LEN];
    uint32_t version;
    uint32_t json_len;
};

/* record = fixed | i32 pos[n] | i32 token[n] | i32 experts[n*k] | f32 weights[n*k] (flags & 1) | u32 crc32:
 * format.RECORD_FIELDS */
struct ggexp_record_fixed {
    uint32_t marker;
    uint32_t rec_len;
    int32_t seq;
    uint8_t phase;
    uint8_t flags;
    uint16_t reserved;
    int32_t layer;
    uint32_t n_tokens;
    uint32_t n_expert_used;
};

/* measurement record = fixed | u32 crc32, one per ubatch after its expert records: format.MEAS_FIELDS */
struct __attribute__((packed)) ggexp_meas_fixed {
    uint32_t marker;
    uint32_t rec_len;
    int32_t seq;
    uint8_t phase;
    uint8_t flags;
    uint16_t reserved;
    uint32_t n_tokens;
    uint64_t read_bytes;
    uint64_t majflt;
    uint64_t wall_ns;
};
#define GGEXP_MEAS_LEN (sizeof(struct ggexp_meas_fixed) + GGEXP_CRC_BYTES) /* format.MEAS_LEN */

_Static_assert(sizeof(struct ggexp_meas_fixed) == 44, "measurement record fixed fields: 44 bytes, packed");
_Static_assert(sizeof(struct ggexp_header_prefix) == 16, "trace header prefix: 16 bytes, no padding");
_Static_assert(sizeof(struct ggexp_record_fixed) == 28, "trace record fixed fields: 7 words, no padding");

/* Bytes of a whole header whose JSON is json_len bytes before padding (format.header_length). */
static inline size_t ggexp_header_length(size_t json_len) {
    size_t n = sizeof(struct ggexp_header_prefix) + json_len + GGEXP_CRC_BYTES;
    return (n + GGEXP_HEADER_ALIGN - 1) / GGEXP_HEADER_ALIGN * GGEXP_HEADER_ALIGN;
}

/* Bytes of one record, CRC included (format.record_length). */
static inline size_t ggexp_record_length(size_t n_tokens, size_t k, int weights) {
    return sizeof(struct ggexp_record_fixed) + 4 * n_tokens * (2 + k * (weights ? 2 : 1)) + GGEXP_CRC_BYTES;
}
#endif
