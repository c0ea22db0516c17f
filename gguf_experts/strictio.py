"""One strict reader for the text inputs people pass (JSON, JSONL, prompt files, CSV headers).

Every failure is one InputError naming the file, the line and the problem: bad UTF-8 (with its line),
a binary file (a trace or a model given by mistake), JSON nested past Python's stack, integers of
thousands of digits, duplicate keys, lone surrogates that no tokenizer can encode.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

from .errors import InputError

MAX_JSON_DEPTH = 64  # our documents nest 4 deep; 100k brackets must not reach Python's recursion limit
MAX_INT_DIGITS = 20  # int64 needs 19 digits (+ sign)


def read_text(path: str | os.PathLike[str], what: str = "text file") -> str:
    """The whole file as UTF-8 text; a binary file or a bad byte is named by its line."""
    with open(path, "rb") as fh:
        raw = fh.read()
    return decode_text(raw, str(path), what)


def decode_text(raw: bytes, where: str, what: str = "text file") -> str:
    nul = raw.find(b"\0", 0, 1 << 16)
    if nul >= 0:
        raise InputError(f"{where}: a binary file (NUL byte at offset {nul}), not a {what}; check the path")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InputError(f"{where}: line {line}: byte 0x{raw[e.start]:02X} is not UTF-8 ({e.reason}); "
                         f"save the {what} as UTF-8") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text.lstrip('-'))} digits is out of range")
    return int(text)


def _parse_const(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _depth_ok(text: str) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH before json.loads recurses into it (a linear scan
    that ignores brackets inside strings)."""
    depth = 0
    in_str = esc = False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep (at character {i})")
        elif ch in "]}":
            depth -= 1


def loads(text: str, where: str, what: str = "JSON", numbers: bool = True) -> Any:
    """json.loads with every failure as one InputError: syntax (line, column), depth, duplicate keys and,
    where the numbers are ours (byte maps, stats), integers past int64's digits and NaN/Infinity. Records
    of other tools' data (JSONL) keep Python's rules for numbers (up to 4300 digits, NaN allowed)."""
    try:
        if text.count("[") + text.count("{") > MAX_JSON_DEPTH:
            _depth_ok(text)
        if not numbers:
            return json.loads(text, object_pairs_hook=_no_duplicates)
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_int=_parse_int,
                          parse_constant=_parse_const)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: line {e.lineno}, column {e.colno}: not valid {what} ({e.msg})") from None
    except (ValueError, RecursionError) as e:
        m = re.search(r"value has (\d+) digits", str(e))  # Python's own limit (4300 digits)
        why = f"an integer of {m.group(1)} digits is out of range" if m else str(e)
        raise InputError(f"{where}: not valid {what}: {why}") from None


def load_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    return loads(read_text(path, what), str(path), what)


def iter_jsonl(path: str | os.PathLike[str], what: str = "JSONL file") -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line."""
    text = read_text(path, what)
    for no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield no, loads(line, f"{path}:{no}", "JSON (one object per line)", numbers=False)


def check_field_counts(data: bytes, n_fields: int, where: str, first_line: int = 1, skip_lines: int = 1,
                       allow_fewer: bool = False) -> int:
    """Raise on the first non-blank line of ``data`` (unquoted CSV) whose field count is not ``n_fields``
    (more only, with ``allow_fewer``), naming its line; vectorised over the bytes. The first ``skip_lines``
    lines of the file (its header) are not checked. Returns the number of lines in ``data``."""
    import numpy as np

    arr = np.frombuffer(data, np.uint8)
    nl = np.flatnonzero(arr == 10)
    ends = np.r_[nl, len(arr)] if len(arr) and arr[-1] != 10 else nl
    if not len(ends):
        return 0
    starts = np.r_[0, ends[:-1] + 1]
    commas = np.concatenate([np.zeros(1, np.int32), np.cumsum(arr == 44, dtype=np.int32)])  # data < 2 GiB
    nfields = commas[ends] - commas[starts] + 1
    text_len = ends - starts - ((arr[np.maximum(ends - 1, 0)] == 13) & (ends > starts))
    lines = first_line + np.arange(len(ends))
    wrong = nfields > n_fields if allow_fewer else nfields != n_fields
    bad = (text_len > 0) & wrong & (lines > skip_lines)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"{where}: line {int(lines[i])}: malformed CSV ({int(nfields[i])} fields, the header has "
                         f"{n_fields}); every row needs one value per column: fix or remove that line")
    return len(ends)


def check_encodable(text: str, where: str) -> str:
    """A str that UTF-8 can encode (JSON's "\\ud800" escapes give lone surrogates, which cannot be)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where}: character {e.start} is a lone surrogate ({text[e.start]!a}); "
                         "a tokenizer cannot encode it: fix the escape in the input") from None
    return text


__all__ = ["check_encodable", "check_field_counts", "decode_text", "iter_jsonl", "load_json", "loads", "read_text"]
