"""One definition of the trace format for Python and C: trace/format.py is the definition, and the C tracer's
trace/preload/ggexp_format.h must say the same. A tiny C program includes the header and prints every constant,
struct size, field offset and length function; this compares them with format.py. The tracer's sources use only
the header's names (no literal magic, marker or offsets), so what is compared here is what the tracer writes."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gguf_experts.trace import format as fmt
from gguf_experts.trace.preload.run import PRELOAD_DIR, preload_path

CASES = [(1, 8, 0), (1, 8, 1), (7, 4, 0), (512, 128, 1)]  # (n_tokens, k, weights) for the length functions
JSON_LENS = [0, 1, 3, 4, 100, 4092]

PROGRAM = r"""
#include <stdio.h>
#include "ggexp_format.h"
#define FIELD(s, tag, f) printf("%s.%s %zu %zu\n", tag, #f, offsetof(struct s, f), sizeof(((struct s *)0)->f))
int main(void) {
    printf("magic");
    for (size_t i = 0; i < sizeof GGEXP_MAGIC; i++) printf(" %u", (unsigned)(unsigned char)GGEXP_MAGIC[i]);
    printf("\nmagic_len %d\nversion %u\nrec_marker %u\nflag_weights %u\nheader_align %d\ncrc_bytes %d\n",
           GGEXP_MAGIC_LEN, GGEXP_VERSION, GGEXP_REC_MARKER, GGEXP_FLAG_WEIGHTS, GGEXP_HEADER_ALIGN, GGEXP_CRC_BYTES);
    printf("header.size %zu\nrecord.size %zu\n", sizeof(struct ggexp_header_prefix), sizeof(struct ggexp_record_fixed));
    FIELD(ggexp_header_prefix, "header", magic); FIELD(ggexp_header_prefix, "header", version);
    FIELD(ggexp_header_prefix, "header", json_len);
    FIELD(ggexp_record_fixed, "record", marker); FIELD(ggexp_record_fixed, "record", rec_len);
    FIELD(ggexp_record_fixed, "record", seq); FIELD(ggexp_record_fixed, "record", phase);
    FIELD(ggexp_record_fixed, "record", flags); FIELD(ggexp_record_fixed, "record", reserved);
    FIELD(ggexp_record_fixed, "record", layer); FIELD(ggexp_record_fixed, "record", n_tokens);
    FIELD(ggexp_record_fixed, "record", n_expert_used);
    printf("meas_marker %u\nmeas_len %zu\nmeas_no_read_bytes %u\nmeas_no_majflt %u\nmeas.size %zu\n",
           GGEXP_MEAS_MARKER, GGEXP_MEAS_LEN, GGEXP_MEAS_NO_READ_BYTES, GGEXP_MEAS_NO_MAJFLT,
           sizeof(struct ggexp_meas_fixed));
    FIELD(ggexp_meas_fixed, "meas", marker); FIELD(ggexp_meas_fixed, "meas", rec_len);
    FIELD(ggexp_meas_fixed, "meas", seq); FIELD(ggexp_meas_fixed, "meas", phase);
    FIELD(ggexp_meas_fixed, "meas", flags); FIELD(ggexp_meas_fixed, "meas", reserved);
    FIELD(ggexp_meas_fixed, "meas", n_tokens); FIELD(ggexp_meas_fixed, "meas", read_bytes);
    FIELD(ggexp_meas_fixed, "meas", majflt); FIELD(ggexp_meas_fixed, "meas", wall_ns);
    %CASES%
    return 0;
}
"""


def _c_values(tmp_path: Path) -> dict[str, list[int]]:
    cc = shutil.which(os.environ.get("CC") or "cc")
    if cc is None:
        pytest.skip("no C compiler (cc or $CC): the C tracer cannot be built here either")
    cases = "\n    ".join(
        [f'printf("record_length {n} {k} {w} %zu\\n", ggexp_record_length({n}, {k}, {w}));' for n, k, w in CASES]
        + [f'printf("header_length {j} %zu\\n", ggexp_header_length({j}));' for j in JSON_LENS])
    src = tmp_path / "layout.c"
    src.write_text(PROGRAM.replace("%CASES%", cases), encoding="utf-8")
    exe = tmp_path / "layout"
    subprocess.run([cc, "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-I", str(PRELOAD_DIR), "-o", str(exe),
                    str(src)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    values: dict[str, list[int]] = {}
    for line in out.splitlines():
        key, *nums = line.split()
        if key in ("record_length", "header_length"):
            key, nums = f"{key} {' '.join(nums[:-1])}", nums[-1:]
        values[key] = [int(x) for x in nums]
    return values


def test_c_header_matches_format_py(tmp_path: Path) -> None:
    c = _c_values(tmp_path)
    assert bytes(c["magic"]) == fmt.MAGIC and c["magic_len"] == [len(fmt.MAGIC)]
    assert c["version"] == [fmt.VERSION]
    assert c["rec_marker"] == [fmt.REC_MARKER]
    assert c["flag_weights"] == [fmt.FLAG_WEIGHTS]
    assert c["header_align"] == [fmt.HEADER_ALIGN] and c["crc_bytes"] == [fmt.CRC_BYTES]
    assert c["header.size"] == [fmt.HEADER_PREFIX_SIZE] and c["record.size"] == [fmt.RECORD_FIXED.size]
    assert c["meas_marker"] == [fmt.MEAS_MARKER] and c["meas_len"] == [fmt.MEAS_LEN]
    assert c["meas_no_read_bytes"] == [fmt.MEAS_FLAG_NO_READ_BYTES] and c["meas_no_majflt"] == [fmt.MEAS_FLAG_NO_MAJFLT]
    assert c["meas.size"] == [fmt.MEAS_FIXED.size]
    for tag, fields in (("header", fmt.HEADER_FIELDS), ("record", fmt.RECORD_FIELDS), ("meas", fmt.MEAS_FIELDS)):
        c_fields = {k.split(".", 1)[1]: tuple(v) for k, v in c.items()
                    if k.startswith(tag + ".") and k != f"{tag}.size"}
        assert c_fields == fmt.field_offsets(fields), f"{tag} fields differ between ggexp_format.h and format.py"
    for n, k, w in CASES:
        assert c[f"record_length {n} {k} {w}"] == [fmt.record_length(n, k, bool(w))]
    for j in JSON_LENS:
        assert c[f"header_length {j}"] == [fmt.header_length(j)]


def test_c_tracer_uses_the_header_only() -> None:
    """The format's literals live in ggexp_format.h alone: the tracer's sources name them, never repeat them
    (a literal copy would not be compared above)."""
    literals = [re.escape(fmt.MAGIC.rstrip(b"\0").decode()), f"0x{fmt.REC_MARKER:08x}", str(fmt.REC_MARKER),
                f"0x{fmt.MEAS_MARKER:08x}", str(fmt.MEAS_MARKER), r"\bMEAS_LEN\b"]
    offenders = []
    for src in sorted(PRELOAD_DIR.glob("ggexp*.[ch]")):
        if src.name == "ggexp_format.h":
            continue
        text = src.read_text(encoding="utf-8")
        offenders += [f"{src.name}: {lit}" for lit in literals if re.search(lit, text, re.IGNORECASE)]
        offenders += [f"{src.name}: literal offset {m.group(0)!r}"
                      for m in re.finditer(r"\bp \+ (16|28)\b|\bh \+ (8|12|16)\b|memcpy\([^;]*, (28|16)\)", text)]
    assert not offenders, offenders


def test_header_is_part_of_the_build_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """preload_path hashes every header: a change of ggexp_format.h builds a new library (on a copy)."""
    from gguf_experts.trace.preload import run

    for f in PRELOAD_DIR.glob("ggexp*.[ch]"):
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.setattr(run, "PRELOAD_DIR", tmp_path)
    key = preload_path()
    with open(tmp_path / "ggexp_format.h", "a", encoding="utf-8") as fh:
        fh.write("/* changed */\n")
    assert preload_path() != key
