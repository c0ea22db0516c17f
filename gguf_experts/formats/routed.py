"""Routed experts as vLLM (``--enable-return-routed-experts``) and SGLang (``return_routed_experts``) return
them: an integer array [tokens, layers, k] per request, as ``.npy`` / ``.npz`` files or in the JSON response
(SGLang: ``meta_info.routed_experts``, base64 of the flat values, ``meta_info.routed_experts_dtype`` when the
server sent another integer type than int32; a newer payload ``{"values", "valid_mask"}`` masks (token, layer)
rows). vLLM's ``CompletionOutput.routed_experts`` is the same array; saved with numpy.save / savez it reads here.

Layer axis: both engines size it by the Hugging Face config's ``num_hidden_layers`` and index it by the
decoder layer's own number (vLLM: ``FusedMoE.layer_id = extract_layer_index(prefix)``; SGLang: the layer's
``layer_id``), so it counts every layer and dense layers stay zero. GGUF blocks are numbered the same way
(``blk.N`` is decoder layer N, leading dense blocks included), so index N is ``blk.N``; rows of blocks
without experts are dropped. An array whose layer axis counts only MoE layers (other tools) is mapped onto the
model's MoE blocks in order. A GGUF with MTP (``nextn_predict_layers``) has those extra blocks at the end,
which Hugging Face's ``num_hidden_layers`` does not count: both sizes are accepted.

These runs use Hugging Face weights, so nothing in them identifies a GGUF: ``--model`` names a GGUF of the same
architecture and shapes and the check is of layer count, expert count and k. The trace made from them carries
that GGUF's fingerprint (as the other foreign logs do); byte heat is then that GGUF's byte map.

A (token, layer) whose k ids are all -1 is a row nobody routed (what ``write_routed`` writes where llama.cpp
skipped a row: the last layer of a prompt keeps only output rows); any other id outside [0, n_expert) is
refused.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os
import zipfile
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from ..errors import InputError
from ..gguf.fingerprint import ModelFingerprint
from ..gguf.names import exps_weight, legacy_expert
from ..trace.format import PHASE_DECODE, PHASE_PREFILL, TraceData, TraceHeader

NPY_MAGIC = b"\x93NUMPY"
#: integer types an engine may send (SGLang's routed_experts_dtype); anything else is refused
WIRE_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64")
SHAPE = "[tokens, layers, k]"


@dataclass
class RoutedArrays:
    """Requests concatenated along tokens: what a file holds, before it is mapped onto a model."""

    experts: np.ndarray  # int [T, L, k]
    lengths: np.ndarray  # int64 [R], sum = T
    weights: np.ndarray | None = None  # float32 [T, L, k]
    phases: np.ndarray | None = None  # uint8 [T]
    prompt_lengths: np.ndarray | None = None  # int64 [R]
    positions: np.ndarray | None = None  # int32 [T]
    token_ids: np.ndarray | None = None  # int32 [T]
    sequence_ids: np.ndarray | None = None  # int32 [R]


# --- detection -----------------------------------------------------------------------------------------

def is_npz(path: str | os.PathLike[str]) -> bool:
    """A zip whose members are .npy arrays (numpy.savez)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def looks_like_json(head: bytes) -> bool:
    """A response (or a list / lines of them) that carries routed_experts."""
    t = head.lstrip(b"\xef\xbb\xbf").lstrip()
    return t[:1] in (b"{", b"[") and b'"routed_experts"' in head


# --- reading -------------------------------------------------------------------------------------------

def _int_array(a: np.ndarray, where: str, what: str = "routed experts") -> np.ndarray:
    if a.dtype.kind not in "iu":
        raise InputError(f"{where}: {what} have dtype {a.dtype}, expected an integer type (int32, as vLLM and "
                         f"SGLang write them) of shape {SHAPE}")
    if a.ndim != 3:
        raise InputError(f"{where}: {what} have shape {tuple(a.shape)} (rank {a.ndim}), expected rank 3: {SHAPE}")
    return a


def _lengths(v: np.ndarray, total: int, where: str, key: str) -> np.ndarray:
    v = np.asarray(v)
    if v.dtype.kind not in "iu" or v.ndim != 1 or (len(v) and int(v.min()) < 0) or int(v.sum()) != total:
        raise InputError(f"{where}: {key} must be non-negative integers [requests] adding up to the {total} "
                         f"tokens of routed_experts; found dtype {v.dtype}, shape {tuple(v.shape)}, "
                         f"sum {int(v.sum()) if v.dtype.kind in 'iuf' and v.size else 0}")
    return v.astype(np.int64)


def _per_token(z: Any, key: str, total: int, where: str, dtype: Any) -> np.ndarray | None:
    if key not in z:
        return None
    v = np.asarray(z[key])
    if v.shape != (total,) or v.dtype.kind not in "iu":
        raise InputError(f"{where}: {key} has shape {tuple(v.shape)} dtype {v.dtype}, expected integers "
                         f"[{total}] (one per token)")
    return v.astype(dtype)


def read_npy(path: str | os.PathLike[str]) -> RoutedArrays:
    """One request: a .npy of shape [tokens, layers, k]."""
    where = str(path)
    try:
        a = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as e:  # object arrays, damaged headers
        raise InputError(f"{where}: unreadable .npy ({e}); expected an integer array {SHAPE}") from None
    a = _int_array(np.asarray(a), where)
    return RoutedArrays(experts=a, lengths=np.array([len(a)], np.int64))


def _natural(name: str) -> tuple[str, int]:
    head = name.rstrip("0123456789")
    return head, int(name[len(head):] or -1)


def read_npz(path: str | os.PathLike[str]) -> RoutedArrays:
    """``routed_experts`` [T, L, k] (+ ``lengths`` per request, ``routed_weights``, ``phases``,
    ``prompt_lengths``, ``positions``, ``token_ids``, ``sequence_ids``), or one rank-3 integer array per
    request (numpy.savez(*requests): arr_0, arr_1, ... in that order)."""
    where = str(path)
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, zipfile.BadZipFile, OSError) as err:
        raise InputError(f"{where}: unreadable .npz ({err}); expected integer arrays {SHAPE}") from None
    with z:
        keys = list(z.keys())
        if "routed_experts" not in keys:
            if not keys:
                raise InputError(f"{where}: empty .npz; expected routed_experts {SHAPE}")
            parts = [_int_array(np.asarray(z[k]), where, f"array {k!r}") for k in sorted(keys, key=_natural)]
            shapes = {p.shape[1:] for p in parts}
            if len(shapes) > 1:
                raise InputError(f"{where}: per-request arrays disagree on [layers, k]: "
                                 f"{', '.join(str(s) for s in sorted(shapes))}; one model per file")
            return RoutedArrays(experts=np.concatenate(parts), lengths=np.array([len(p) for p in parts], np.int64))
        e = _int_array(np.asarray(z["routed_experts"]), where)
        T = len(e)
        lengths = _lengths(z["lengths"], T, where, "lengths") if "lengths" in keys else np.array([T], np.int64)
        w = None
        if "routed_weights" in keys:
            w = np.asarray(z["routed_weights"])
            if w.shape != e.shape or w.dtype.kind != "f":
                raise InputError(f"{where}: routed_weights have shape {tuple(w.shape)} dtype {w.dtype}, expected "
                                 f"floats of routed_experts' shape {tuple(e.shape)}")
            w = w.astype(np.float32)
        pl = (_lengths(z["prompt_lengths"], int(z["prompt_lengths"].sum()), where, "prompt_lengths")
              if "prompt_lengths" in keys else None)
        if pl is not None and (len(pl) != len(lengths) or (pl > lengths).any()):
            raise InputError(f"{where}: prompt_lengths {pl.tolist()[:8]} do not fit the request lengths "
                             f"{lengths.tolist()[:8]}")
        sid = None
        if "sequence_ids" in keys:
            sid = np.asarray(z["sequence_ids"])
            if sid.shape != lengths.shape or sid.dtype.kind not in "iu":
                raise InputError(f"{where}: sequence_ids has shape {tuple(sid.shape)}, expected "
                                 f"[{len(lengths)}] integers (one per request)")
            sid = sid.astype(np.int32)
        phases = _per_token(z, "phases", T, where, np.uint8)
        if phases is not None and (phases > 1).any():
            raise InputError(f"{where}: phases must be 0 (prefill) or 1 (decode)")
        return RoutedArrays(experts=e, lengths=lengths, weights=w, phases=phases, prompt_lengths=pl,
                            positions=_per_token(z, "positions", T, where, np.int32),
                            token_ids=_per_token(z, "token_ids", T, where, np.int32), sequence_ids=sid)


def _json_docs(path: str | os.PathLike[str]) -> list[Any]:
    """A JSON response, a list of them (a batch), or JSON lines."""
    where = str(path)
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        doc = json.loads(text)
        return doc if isinstance(doc, list) else [doc]
    except json.JSONDecodeError:
        pass
    docs = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                docs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{where}:{i}: unreadable JSON ({e}); expected a response with routed_experts, "
                                 "a list of them or one per line") from None
    return docs


def _b64(text: Any, dtype: np.dtype, where: str) -> np.ndarray:
    if not isinstance(text, str):
        raise InputError(f"{where}: routed_experts is a {type(text).__name__}, expected a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise InputError(f"{where}: routed_experts is not valid base64 ({e})") from None
    if len(raw) % dtype.itemsize:
        raise InputError(f"{where}: routed_experts holds {len(raw)} bytes, not a whole number of {dtype} values")
    return np.frombuffer(raw, dtype.newbyteorder("<"))


def _wire_dtype(name: Any, where: str) -> np.dtype:
    if name is None:
        return np.dtype(np.int32)
    if name not in WIRE_DTYPES:
        raise InputError(f"{where}: routed_experts_dtype {name!r}; expected one of {', '.join(WIRE_DTYPES)}")
    return np.dtype(name)


def read_json(path: str | os.PathLike[str], layers: int, k: int) -> RoutedArrays:
    """SGLang responses: ``meta_info.routed_experts`` base64 (flat; reshaped to [-1, layers, k], the model's
    layer count as SGLang's num_hidden_layers), or ``{"data": base64, "shape": [T, L, k], "dtype"}``, or nested
    lists; ``routed_weights`` likewise (float32); ``prompt_tokens`` gives the prompt/decode split."""
    where = str(path)
    exp, wts, lengths, prompts = [], [], [], []
    docs = _json_docs(path)
    for i, doc in enumerate(docs):
        at = f"{where} (response {i})" if len(docs) > 1 else where
        if not isinstance(doc, dict):
            raise InputError(f"{at}: a {type(doc).__name__}, expected a response object with routed_experts")
        meta = doc.get("meta_info", doc)
        if not isinstance(meta, dict) or "routed_experts" not in meta:
            raise InputError(f"{at}: no routed_experts (in meta_info or at the top); start the server with "
                             "--enable-return-routed-experts and ask with return_routed_experts")
        e = _decode(meta["routed_experts"], _wire_dtype(meta.get("routed_experts_dtype"), at), layers, k, at)
        e = _int_array(e, at)
        w = None
        if meta.get("routed_weights") is not None:
            w = _decode(meta["routed_weights"], np.dtype(np.float32), layers, k, at, "routed_weights")
            if w.shape != e.shape:
                raise InputError(f"{at}: routed_weights have shape {tuple(w.shape)}, routed_experts "
                                 f"{tuple(e.shape)}; expected the same")
        exp.append(e)
        wts.append(w)
        lengths.append(len(e))
        p = meta.get("prompt_tokens")
        prompts.append(min(int(p), len(e)) if isinstance(p, int) and not isinstance(p, bool) and p >= 0 else -1)
    if not exp:
        raise InputError(f"{where}: no responses")
    shapes = {e.shape[1:] for e in exp}
    if len(shapes) > 1:
        raise InputError(f"{where}: responses disagree on [layers, k]: {sorted(shapes)}; one model per file")
    weights = (np.concatenate([w.astype(np.float32) for w in wts])  # type: ignore[union-attr]
               if all(w is not None for w in wts) else None)
    return RoutedArrays(experts=np.concatenate(exp), lengths=np.array(lengths, np.int64), weights=weights,
                        prompt_lengths=np.array(prompts, np.int64) if min(prompts) >= 0 else None)


def _decode(v: Any, dtype: np.dtype, layers: int, k: int, where: str, what: str = "routed_experts") -> np.ndarray:
    if isinstance(v, list):
        a = np.asarray(v)
        if a.dtype == object:
            raise InputError(f"{where}: {what} is a ragged list; expected {SHAPE}")
        return a.astype(dtype) if a.size == 0 else a
    if isinstance(v, dict):
        data = v.get("data", v.get("values"))
        shape = v.get("shape")
        flat = _b64(data, _wire_dtype(v.get("dtype"), where) if what == "routed_experts" else dtype, where)
        if shape is None:  # SGLang's {"values", "valid_mask"} payload: shaped by the model, as the flat form
            arr = _shaped(flat, layers, k, where, what)
        elif not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise InputError(f"{where}: {what}.shape = {shape!r}, expected a list of sizes such as [T, L, k]")
        elif int(np.prod(shape)) != flat.size:
            raise InputError(f"{where}: {what} holds {flat.size} values, its shape {shape} needs {int(np.prod(shape))}")
        else:
            arr = flat.reshape(shape)
        if v.get("valid_mask") is not None and what == "routed_experts":
            mask = _b64(v["valid_mask"], np.dtype(np.uint8), where)
            if arr.ndim != 3 or mask.size not in (arr.size, arr.size // max(1, arr.shape[2])):
                raise InputError(f"{where}: valid_mask holds {mask.size} flags for routed_experts of shape "
                                 f"{tuple(arr.shape)}; expected one per value or one per (token, layer)")
            m = mask.reshape(arr.shape if mask.size == arr.size else arr.shape[:2] + (1,)) != 0
            arr = np.where(np.broadcast_to(m, arr.shape).all(axis=2, keepdims=True), arr.astype(np.int64), -1)
        return arr
    return _shaped(_b64(v, dtype, where), layers, k, where, what)


def _shaped(flat: np.ndarray, layers: int, k: int, where: str, what: str) -> np.ndarray:
    """Flat values as [-1, layers, k] (SGLang sends no shape: num_hidden_layers and top-k are the model's)."""
    if flat.size % (layers * k):
        raise InputError(f"{where}: {what} holds {flat.size} values, not a whole number of tokens of "
                         f"{layers} layers x top-{k} (the model's); pass the model the server ran, or send the "
                         "shape ({\"data\": ..., \"shape\": [T, L, k]})")
    return flat.reshape(-1, layers, k)


# --- onto a model --------------------------------------------------------------------------------------

def moe_blocks(model: Any) -> np.ndarray:
    """The GGUF blocks that hold experts, ascending."""
    ls = set()
    for t in model.tensors:
        hit = exps_weight(t.name) or legacy_expert(t.name)
        if hit is not None:
            ls.add(hit[0])
    return np.array(sorted(ls), np.int64)


def hf_layers(model: Any) -> int:
    """Hugging Face's num_hidden_layers for a GGUF: its blocks less the MTP (nextn) blocks at the end."""
    return int(model.block_count) - int(model.kv.get(f"{model.architecture}.nextn_predict_layers", 0) or 0)


def layer_map(L: int, model: Any, where: str) -> np.ndarray:
    """GGUF block of each index of the layer axis (-1: a dense block, dropped)."""
    blocks = moe_blocks(model)
    every = {int(model.block_count), hf_layers(model)}
    if L in every:
        out = np.full(L, -1, np.int64)
        inside = blocks[blocks < L]
        out[inside] = inside
        return out
    if L == len(blocks):
        return blocks
    dense = int(model.block_count) - len(blocks)
    raise InputError(f"{where}: the layer axis has {L} layers; {model.path.name} has {model.block_count} blocks "
                     f"({len(blocks)} with experts, {dense} dense"
                     + (f", leading_dense_block_count {model.leading_dense_block_count}"
                        if model.leading_dense_block_count else "")
                     + f"): expected {' or '.join(str(x) for x in sorted(every))} (every layer, as vLLM and SGLang "
                     f"count) or {len(blocks)} (MoE layers only); pass the GGUF of the model the engine served")


def to_trace(ra: RoutedArrays, model: Any, fp: ModelFingerprint, where: str, source: str) -> TraceData:
    """Rows of our trace: (token, MoE block) with the token's k experts. A prompt's rows are layer-major (one
    pass, as llama.cpp evaluates a prompt), generated tokens token-major; requests one after another."""
    e = ra.experts
    T, L, k = (int(s) for s in e.shape)
    if k != fp.n_expert_used:
        raise InputError(f"{where}: shape {tuple(e.shape)}: top-{k} per token, {model.path.name} routes "
                         f"top-{fp.n_expert_used}; expected {SHAPE} = [T, *, {fp.n_expert_used}]; pass the model "
                         "the engine served")
    lmap = layer_map(L, model, where)
    axis = np.flatnonzero(lmap >= 0)
    sub = np.asarray(e[:, axis, :])  # [T, Lm, k]
    Lm = len(axis)
    absent = (sub == -1).all(axis=2)  # [T, Lm]
    bad = ((sub < 0) | (sub >= fp.n_expert)) & ~absent[:, :, None]
    if bad.any():
        t, m, s = (int(x[0]) for x in np.nonzero(bad))
        raise InputError(f"{where}: expert id {int(sub[t, m, s])} at token {t}, layer {int(axis[m])}, slot {s} "
                         f"(shape {tuple(e.shape)}); {model.path.name} has {fp.n_expert} experts: ids must be in "
                         f"[0, {fp.n_expert}) (-1 in all k slots: no routing)")
    R = len(ra.lengths)
    starts = np.cumsum(ra.lengths) - ra.lengths
    req = np.repeat(np.arange(R), ra.lengths)
    within = np.arange(T) - np.repeat(starts, ra.lengths)
    if ra.phases is not None:
        phase_t = ra.phases.astype(np.uint8)
    elif ra.prompt_lengths is not None:
        phase_t = np.where(within < np.repeat(ra.prompt_lengths, ra.lengths), PHASE_PREFILL,
                           PHASE_DECODE).astype(np.uint8)
    else:
        phase_t = np.full(T, PHASE_DECODE, np.uint8)
    phase_known = ra.phases is not None or ra.prompt_lengths is not None
    # one row per (token, MoE layer): order as llama.cpp would evaluate them
    tt = np.repeat(np.arange(T), Lm)
    mm = np.tile(np.arange(Lm), T)
    keep = ~absent.reshape(-1)
    tt, mm = tt[keep], mm[keep]
    pre = phase_t[tt] == PHASE_PREFILL
    if pre.any():  # prompt rows layer-major: one int64 key (request, phase, place in its pass), one argsort
        span = np.int64(T) * max(Lm, 1)
        place = np.where(pre, mm.astype(np.int64) * T + tt, tt.astype(np.int64) * Lm + mm)
        key = (req[tt].astype(np.int64) * 2 + phase_t[tt]) * span + place
        order = np.argsort(key, kind="stable")
        tt, mm = tt[order], mm[order]
    seq_of = ra.sequence_ids if ra.sequence_ids is not None else np.arange(R, dtype=np.int32)
    pos = ra.positions if ra.positions is not None else within.astype(np.int32)
    tok = ra.token_ids if ra.token_ids is not None else np.full(T, -1, np.int32)
    meta = {"converted_from": where, "source_format": source, "phase_known": phase_known,
            "model_check": f"layer count, expert count and k checked against {model.path.name}; the routing "
                           "came from another engine's weights",
            "requests": R}
    header = TraceHeader(version=1, fingerprint=fp, meta=meta)
    return TraceData(seq=seq_of[req[tt]].astype(np.int32), phase=phase_t[tt], pos=pos[tt].astype(np.int32),
                     token=tok[tt].astype(np.int32), layer=lmap[axis[mm]].astype(np.int32),
                     experts=sub[tt, mm].astype(np.int32),
                     weights=None if ra.weights is None else ra.weights[:, axis, :][tt, mm].astype(np.float32),
                     header=header, n_records=len(tt))


def read_routed(path: str | os.PathLike[str], fmt: str, model: Any, fp: ModelFingerprint) -> TraceData:
    """A routed-experts file (``routed-npy`` or ``routed-json``) as a trace of ``model``."""
    where = str(path)
    if fmt == "routed-json":
        ra = read_json(path, hf_layers(model), fp.n_expert_used)
    else:
        with open(path, "rb") as f:
            npy = f.read(6) == NPY_MAGIC
        ra = read_npy(path) if npy else read_npz(path)
    return to_trace(ra, model, fp, where, fmt)


# --- writing -------------------------------------------------------------------------------------------

def from_trace(td: TraceData) -> RoutedArrays:
    """Our trace as engines lay it out: tokens of each sequence in position order, the layer axis counting
    every block (blk.N at index N), -1 where the trace has no row (dense blocks, rows llama.cpp skipped)."""
    fp = td.header.fingerprint
    n = len(td)
    key = (td.seq.astype(np.int64) << 32) | (td.pos.astype(np.int64) & 0xFFFFFFFF)
    ukey, inv = np.unique(key, return_inverse=True)
    inv = inv.reshape(-1)
    utok = np.stack([ukey >> 32, (ukey & 0xFFFFFFFF).astype(np.uint32).astype(np.int32)])
    T = len(ukey)
    flat = inv * fp.n_layer + td.layer.astype(np.int64)
    sf = np.sort(flat)
    if n and (sf[1:] == sf[:-1]).any():
        raise InputError("the trace has two rows for one (sequence, position, layer) (a sequence id reused for "
                         "another request?); routed-experts arrays hold one routing per token and layer")
    e = np.full((T, fp.n_layer, td.k), -1, np.int32)
    e[inv, td.layer] = td.experts
    w = None
    if td.weights is not None:
        w = np.full((T, fp.n_layer, td.k), np.nan, np.float32)
        w[inv, td.layer] = td.weights
    seqs, lengths = np.unique(utok[0], return_counts=True)
    phases = np.zeros(T, np.uint8)
    phases[inv] = td.phase
    tokens = np.full(T, -1, np.int32)
    tokens[inv] = td.token
    seq_t = np.repeat(np.arange(len(seqs)), lengths)
    prompt = np.bincount(seq_t, weights=(phases == PHASE_PREFILL), minlength=len(seqs)).astype(np.int64)
    return RoutedArrays(experts=e, lengths=lengths.astype(np.int64), weights=w, phases=phases,
                        prompt_lengths=prompt, positions=utok[1].astype(np.int32), token_ids=tokens,
                        sequence_ids=seqs.astype(np.int32))


def write_routed(td: TraceData, fh: IO[bytes], npy: bool = False) -> int:
    """Write ``routed_experts`` [T, L, k] int32 and its companions as .npz (or a bare .npy, one sequence);
    returns tokens written."""
    ra = from_trace(td)
    if npy:
        if len(ra.lengths) > 1:
            raise InputError(f"the trace holds {len(ra.lengths)} sequences; a .npy holds one request: name the "
                             "output .npz (routed_experts with lengths per request)")
        np.save(fh, ra.experts)
        return int(len(ra.experts))
    arrays = {"routed_experts": ra.experts, "lengths": ra.lengths, "prompt_lengths": ra.prompt_lengths,
              "phases": ra.phases, "positions": ra.positions, "token_ids": ra.token_ids,
              "sequence_ids": ra.sequence_ids}
    if ra.weights is not None:
        arrays["routed_weights"] = ra.weights
    buf = io.BytesIO()
    kept: dict[str, Any] = {k: v for k, v in arrays.items() if v is not None}
    np.savez(buf, **kept)
    fh.write(buf.getvalue())
    return int(len(ra.experts))
