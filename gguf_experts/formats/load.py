"""Which format a file is in (by its content, never its name), and loading it as a trace or as counts."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..trace.format import MAGIC as TRACE_MAGIC
from ..gguf.fingerprint import ModelFingerprint
from ..trace.format import TraceData, TraceHeader, warn_no_rows
from . import moe_trace_csv
from .counts import ExpertCounts

#: name -> (what it is, ordered?)
FORMATS: dict[str, tuple[str, bool]] = {
    "trace": ("gguf-experts trace.bin", True),
    "csv": ("gguf-experts / tracer CSV expert log ('# token_id,layer_id,...' or 'seq,phase,...')", True),
    "moe-trace-csv": ("llama-moe-trace CSV (llama.cpp PR #28544: 'layer,expert' rows)", True),
    "mblt": ("mbolt MBLT v1 binary trace", True),
    "rtrace": ("fitz-tec RTRACE01 router-probability trace", True),
    "routed-npy": ("vLLM/SGLang routed experts array (.npy / .npz of [tokens, layers, k])", True),
    "routed-json": ("vLLM/SGLang response JSON with routed_experts (base64 int32)", True),
    "imatrix": ("llama-imatrix GGUF", False),
    "tracer-json": ("tracer JSON statistics ({total_tokens, expert_activations, per_layer})", False),
    "reap-json": ("llama-expert-profile REAP JSON (llama.cpp PR #20454)", False),
}
ORDER_NEEDED = ("needs a trace in token order (which experts each token used, one token after another); "
                "capture one with `gguf-experts capture`, or pass an ordered log (trace.bin, CSV log, MBLT, "
                "moe-trace CSV, RTRACE01, vLLM/SGLang routed experts)")


class NeedsTraceError(InputError):
    """A count-only input given to a command that replays tokens in order."""


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of a file, from its first bytes (and, for JSON and GGUF, its structure)."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except IsADirectoryError:
        raise InputError(f"{where}: is a directory; pass a trace or statistics file") from None
    if head.startswith(TRACE_MAGIC[:7]) or (head and TRACE_MAGIC.startswith(head)):  # a cut header too
        return "trace"
    if head.startswith(b"MBLT"):
        return "mblt"
    if head.startswith(b"RTRACE01"):
        return "rtrace"
    if head.startswith(b"\x93NUMPY") or (head.startswith(b"PK\x03\x04") and _npz(path)):
        return "routed-npy"
    if head.startswith(b"GGUF") or head[:4] == b"FUGG":
        from ..errors import GGUFExpertsError, TraceFormatError
        from ..gguf.reader import read_header
        from .imatrix import is_imatrix

        try:
            h = read_header(path)
        except GGUFExpertsError as e:
            raise TraceFormatError(f"not a gguf-experts trace (magic {head[:4]!r}), nor a readable GGUF: {e}") from None
        if is_imatrix(h.kv, [t.name for t in h.tensors]):
            return "imatrix"
        raise InputError(f"{where}: a GGUF model, not a gguf-experts trace or an imatrix; pass it as --model "
                         "and give the trace")
    return _text_format(path, head)


def _text_format(path: str | os.PathLike[str], head: bytes) -> str:
    """JSON statistics, CSV logs and moe-trace CSV, by their first bytes (JSON: by its keys)."""
    where = str(path)
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    from .routed import looks_like_json

    if looks_like_json(head):
        return "routed-json"
    if text.startswith(b"{"):
        doc = _json(path)
        from . import reap_json, tracer_json

        if tracer_json.looks_like(doc):
            return "tracer-json"
        if reap_json.looks_like(doc):
            return "reap-json"
        raise InputError(f"{where}: JSON that is neither tracer statistics (per_layer) nor a REAP profile "
                         "({\"<layer>\": {activation_counts, ...}}); pass one of those")
    if text.startswith(b"# token_id") or text.startswith(b"seq,"):
        return "csv"
    if moe_trace_csv.looks_like(text):
        return "moe-trace-csv"
    first = text.split(b"\n", 1)[0]
    if b"," in first and all(32 <= c < 127 or c in (9, 13) for c in first):
        return "csv"  # some other CSV: the CSV log reader names what line 1 should be
    if not head:
        raise InputError(f"{where}: empty file; pass a trace or statistics file")
    raise InputError(f"{where}: not a gguf-experts trace nor a known format (first bytes {head[:8]!r}); "
                     "expected one of: "
                     + ", ".join(d for d, _ in FORMATS.values()))


def _npz(path: str | os.PathLike[str]) -> bool:
    from .routed import is_npz

    return is_npz(path)


def _json(path: str | os.PathLike[str]) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: unreadable JSON ({e}); the file is cut or not JSON") from None


@dataclass
class Input:
    """A loaded input: an ordered trace (header + chunks) or counts; RTRACE01 adds router margins."""

    path: str
    format: str
    header: TraceHeader | None = None
    chunks: Iterator[TraceData] | None = None
    counts: ExpertCounts | None = None
    margin: np.ndarray | None = None  # rtrace: p_k - p_(k+1) per row
    margin_layer: np.ndarray | None = None

    @property
    def ordered(self) -> bool:
        return self.counts is None

    @property
    def description(self) -> str:
        return FORMATS[self.format][0]

    def require_order(self) -> None:
        if self.counts is not None:
            raise NeedsTraceError(f"{self.path} is a {self.description}: counts only, no token order; this "
                                  f"command {ORDER_NEEDED}")

    def to_counts(self) -> ExpertCounts:
        """Counts of any input (a trace is reduced chunk by chunk)."""
        if self.counts is not None:
            return self.counts
        assert self.header is not None and self.chunks is not None
        return ExpertCounts.from_chunks(self.chunks, self.header.fingerprint, source=self.format)


def _model_fp(model: Any) -> tuple[ModelFingerprint | None, Any]:
    if model is None:
        return None, None
    from ..gguf.reader import Model, open_model
    from ..gguf.fingerprint import fingerprint

    m = model if isinstance(model, Model) else open_model(model)
    return fingerprint(m), m


def _needs_model(path: str, fmt: str) -> InputError:
    if fmt.startswith("routed-"):
        return InputError(f"{path}: a {FORMATS[fmt][0]} does not say how many experts the model has; pass "
                          "--model MODEL.gguf, a GGUF of the same architecture and shapes (its layer count, expert "
                          "count and k are checked against the array). stats, cache-sim, pins and diff need only "
                          "those; join-trace's byte heat also uses that GGUF's byte map (its quantisation's bytes)")
    return InputError(f"{path}: a {FORMATS[fmt][0]} does not say how many experts each token uses; "
                      "pass the model it was made with (--model MODEL.gguf)")


def open_input(path: str | os.PathLike[str], model: Any = None, max_rows: int = 1 << 16) -> Input:
    """Load any supported input. Ordered inputs come as chunks (trace.bin streams; foreign logs are read
    whole); count-only inputs as ExpertCounts (checked against the model and sized to it when given)."""
    from ..trace.reader import iter_trace_chunks, read_trace_header

    where = str(path)
    fmt = detect_format(path)
    if fmt == "trace":
        return Input(where, fmt, header=read_trace_header(path), chunks=iter_trace_chunks(path, max_rows=max_rows))
    fp, m = _model_fp(model)
    td: TraceData | None = None
    margin = None
    if fmt == "mblt":
        from .mblt import read_mblt

        td = read_mblt(path, fp)
    elif fmt in ("csv", "moe-trace-csv", "rtrace", "routed-npy", "routed-json"):
        if fp is None:
            raise _needs_model(where, fmt)
        td, margin = _ordered_log(path, fmt, m, fp)
    if td is not None:
        if not len(td):
            warn_no_rows(where)
        return Input(where, fmt, header=td.header, chunks=iter([td]), margin=margin,
                     margin_layer=td.layer if margin is not None else None)
    k = fp.n_expert_used if fp else None
    if fmt == "imatrix":
        from .imatrix import read_imatrix

        counts = read_imatrix(path, k=k)
    elif fmt == "tracer-json":
        from .tracer_json import read_tracer_json

        counts = read_tracer_json(_json(path), where, n_expert=fp.n_expert if fp else None, k=k)
    else:
        from .reap_json import read_reap_json

        counts = read_reap_json(_json(path), where, k=k)
    if fp is not None:
        counts.check_model(fp, where)
        counts = counts.resized(fp.n_layer)
    return Input(where, fmt, counts=counts)


def _ordered_log(path: str | os.PathLike[str], fmt: str, m: Any, fp: ModelFingerprint
                 ) -> tuple[TraceData, np.ndarray | None]:
    """An ordered foreign log that needs the model's fingerprint (and, for RTRACE01, its router margins)."""
    if fmt in ("routed-npy", "routed-json"):
        from .routed import read_routed

        return read_routed(path, fmt, m, fp), None
    if fmt == "csv":
        return _csv_log(str(path), fp), None
    if fmt == "moe-trace-csv":
        return moe_trace_csv.read_moe_trace_csv(path, fp), None
    from .rtrace import read_rtrace

    return read_rtrace(path, fp)


def _csv_log(path: str, fp: ModelFingerprint) -> TraceData:
    from .csvlog import read_csv_log
    from ..trace.format import concat

    header = TraceHeader(version=1, fingerprint=fp, meta={"converted_from": path, "source_format": "csv"})
    parts = []
    for rows in read_csv_log(path, fp):
        parts.append(TraceData(seq=rows["seq"].astype(np.int32), phase=rows["phase"].astype(np.uint8),
                               pos=rows["pos"].astype(np.int32), token=rows["token"].astype(np.int32),
                               layer=rows["layer"].astype(np.int32), experts=rows["experts"].astype(np.int32),
                               weights=rows["weights"], header=header))
    return concat(parts, header)


def load_counts(path: str | os.PathLike[str], model: Any = None) -> ExpertCounts:
    """Counts of any input: what prune plans, shares and byte heat need (callable by prune --plan)."""
    return open_input(path, model).to_counts()


def load_trace(path: str | os.PathLike[str], model: Any = None) -> TraceData:
    """The whole ordered trace of any ordered input; NeedsTraceError for count-only inputs."""
    from ..trace.format import concat

    inp = open_input(path, model, max_rows=1 << 17)
    inp.require_order()
    assert inp.chunks is not None and inp.header is not None
    parts = list(inp.chunks)
    return concat(parts, inp.header) if parts else TraceData.empty(inp.header)
