"""Tiny random-weight MoE GGUF models that llama.cpp really loads and runs.

Why: live capture, the byte map and join-trace need real models in tests, benchmarks and the demo, and
downloading one is not an option. The weights are random but deterministic from a seed and shaped so that
routing is realistic: different tokens pick different experts, with some skew toward a few of them.
F32/F16 files are written with gguf-py's ``GGUFWriter``; quantized variants are produced by llama.cpp's own
``llama_model_quantize`` (so the byte map is tested on files llama.cpp itself wrote).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..errors import GGUFExpertsError, InputError
from ..usercache import cache_dir

ARCHES = ("qwen3moe", "gpt-oss")
#: --quant name -> llama_ftype (checked against llama_cpp.LLAMA_FTYPE_* in tests)
QUANT_FTYPES: dict[str, int] = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K_M": 15, "MXFP4_MOE": 38}
DEMO_SEED = 0
#: bump when the generator changes, so cached demo models are regenerated
GENERATOR_VERSION = 3


class ModelBuildError(GGUFExpertsError):
    """A tiny model could not be written or re-quantized."""


def _byte_vocab() -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s> and the 256 byte tokens: llama.cpp's SPM tokenizer byte-falls-back on any text."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0] * len(tokens)
    types = [2, 3, 3] + [6] * 256
    return tokens, scores, types


def _tensors(arch: str, rng: np.random.Generator, n_layer: int, n_expert: int, n_embd: int, n_head: int,
             n_head_kv: int, head_dim: int, n_ff_exp: int, n_vocab: int,
             dtype: type) -> Iterator[tuple[str, np.ndarray]]:
    """(name, numpy array) in the order llama.cpp expects; numpy shape = reversed ggml ne."""
    def w(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(dtype)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)  # norms stay F32, as in real models

    # A shared direction in the embeddings plus router rows with unequal projections onto it: a realistic
    # skew (some experts are popular) on top of per-token variety.
    shared = rng.standard_normal(n_embd)
    shared /= np.linalg.norm(shared)
    emb = rng.standard_normal((n_vocab, n_embd)) + 0.5 * np.sqrt(n_embd) * shared
    yield "token_embd.weight", emb.astype(dtype)
    yield "output_norm.weight", ones(n_embd)
    yield "output.weight", w(n_vocab, n_embd, scale=1.0 / np.sqrt(n_embd))
    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    for i in range(n_layer):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", ones(n_embd)
        if arch == "gpt-oss":
            yield p + "post_attention_norm.weight", ones(n_embd)
        yield p + "attn_q.weight", w(q_dim, n_embd, scale=1.0 / np.sqrt(n_embd))
        yield p + "attn_k.weight", w(kv_dim, n_embd, scale=1.0 / np.sqrt(n_embd))
        yield p + "attn_v.weight", w(kv_dim, n_embd, scale=1.0 / np.sqrt(n_embd))
        yield p + "attn_output.weight", w(n_embd, q_dim, scale=0.5 / np.sqrt(q_dim))
        if arch == "gpt-oss":
            yield p + "attn_q.bias", w(q_dim, scale=0.02).astype(np.float32)
            yield p + "attn_k.bias", w(kv_dim, scale=0.02).astype(np.float32)
            yield p + "attn_v.bias", w(kv_dim, scale=0.02).astype(np.float32)
            yield p + "attn_output.bias", w(n_embd, scale=0.02).astype(np.float32)
            yield p + "attn_sinks.weight", w(n_head, scale=0.5).astype(np.float32)
        else:
            yield p + "attn_q_norm.weight", ones(head_dim)
            yield p + "attn_k_norm.weight", ones(head_dim)
        if arch != "gpt-oss":
            yield p + "ffn_norm.weight", ones(n_embd)
        popularity = rng.standard_normal(n_expert)
        router = rng.standard_normal((n_expert, n_embd)) * (2.0 / np.sqrt(n_embd))
        router += np.outer(popularity, shared) * (1.0 / np.sqrt(n_embd))
        yield p + "ffn_gate_inp.weight", router.astype(np.float32)
        if arch == "gpt-oss":
            yield p + "ffn_gate_inp.bias", w(n_expert, scale=0.3).astype(np.float32)
        yield p + "ffn_gate_exps.weight", w(n_expert, n_ff_exp, n_embd, scale=1.0 / np.sqrt(n_embd))
        yield p + "ffn_up_exps.weight", w(n_expert, n_ff_exp, n_embd, scale=1.0 / np.sqrt(n_embd))
        yield p + "ffn_down_exps.weight", w(n_expert, n_embd, n_ff_exp, scale=0.5 / np.sqrt(n_ff_exp))
        if arch == "gpt-oss":
            yield p + "ffn_gate_exps.bias", w(n_expert, n_ff_exp, scale=0.02).astype(np.float32)
            yield p + "ffn_up_exps.bias", w(n_expert, n_ff_exp, scale=0.02).astype(np.float32)
            yield p + "ffn_down_exps.bias", w(n_expert, n_embd, scale=0.02).astype(np.float32)


#: llama.cpp's own limits (src/llama-hparams.h): a model beyond them makes its loader abort
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024


def check_shape(seed: int, n_layer: int, n_expert: int, n_embd: int, n_head: int, n_head_kv: int,
                n_ff_exp: int) -> None:
    """Refuse shapes that crash the writer or give a model llama.cpp cannot load."""
    if seed < 0:
        raise InputError(f"tiny model: seed (--seed) {seed} must be >= 0")
    for what, v, lo, hi in (("n_layer (--layers)", n_layer, 1, LLAMA_MAX_LAYERS),
                            ("n_expert (--experts)", n_expert, 1, LLAMA_MAX_EXPERTS),
                            ("n_embd (--embd)", n_embd, 1, None), ("n_head (--heads)", n_head, 1, None),
                            ("n_head_kv", n_head_kv, 1, None), ("n_ff_exp (--ff)", n_ff_exp, 1, None)):
        if v < lo or (hi is not None and v > hi):
            rng = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
            why = " (llama.cpp's limit)" if hi is not None else ""
            raise InputError(f"tiny model: {what} {v} must be {rng}{why}")


def estimate_bytes(arch: str = "qwen3moe", n_layer: int = 4, n_expert: int = 16, n_embd: int = 64,
                   n_head: int = 4, n_head_kv: int = 2, n_ff_exp: int = 32) -> int:
    """About how many bytes the F32 model takes (tensor data; the header is small), before writing it."""
    head_dim = max(1, n_embd // max(1, n_head))
    q, kv = n_head * head_dim, n_head_kv * head_dim
    per_layer = (3 * n_embd + 2 * n_embd * q + 2 * n_embd * kv + n_expert * (n_embd + 1)
                 + 3 * n_expert * n_ff_exp * n_embd + 3 * n_expert * (n_ff_exp + n_embd) + 4 * q)
    vocab = len(_byte_vocab()[0])
    return 4 * (n_layer * per_layer + 2 * vocab * n_embd + n_embd)


def written_types(path: str | os.PathLike[str]) -> dict[str, dict[str, int]]:
    """{"experts" / "other": {ggml type name: tensor count}} of a written model: what it really holds."""
    from ..gguf.reader import open_model

    out: dict[str, dict[str, int]] = {"experts": {}, "other": {}}
    for t in open_model(path).tensors:
        part = out["experts" if "_exps." in t.name else "other"]
        part[t.type.name] = part.get(t.type.name, 0) + 1
    return out


@dataclass(frozen=True)
class BpeVocab:
    """A GPT-2-style byte-level BPE vocabulary copied from another GGUF (``tokenizer.ggml.*``)."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    eos: int


def write_float_model(path: str | os.PathLike[str], arch: str = "qwen3moe", seed: int = 0, n_layer: int = 4,
                      n_expert: int = 16, n_expert_used: int = 4, n_embd: int = 64, n_head: int = 4,
                      n_head_kv: int = 2, n_ff_exp: int = 32, n_ctx_train: int = 4096, f16: bool = False,
                      name: str | None = None, add_bos: bool = False, vocab: BpeVocab | None = None) -> Path:
    """Write an F32 (or F16 matrices) model with gguf-py, atomically; returns the path. ``add_bos``: the
    tokenizer prepends BOS (as most real models do; llama-imatrix then puts BOS at each chunk start).
    ``vocab``: a BPE vocabulary instead of the byte vocabulary (``random_twin``: same tokens as a trained model)."""
    from gguf import (
        GGUFWriter,  # core dependency; imported here to keep package import light
    )

    if arch not in ARCHES:
        raise InputError(f"tiny model: architecture {arch!r} is not one of {', '.join(ARCHES)}")
    check_shape(seed, n_layer, n_expert, n_embd, n_head, n_head_kv, n_ff_exp)
    if not 0 < n_expert_used <= n_expert:
        raise InputError(f"tiny model: n_expert_used {n_expert_used} must be in [1, n_expert={n_expert}]")
    if n_embd % n_head or n_head % n_head_kv:
        raise InputError(f"tiny model: n_embd {n_embd} / n_head {n_head} / n_head_kv {n_head_kv} do not divide")
    path = Path(path)
    head_dim = n_embd // n_head
    tokens, scores, types = _byte_vocab()
    rng = np.random.default_rng([seed, ARCHES.index(arch)])
    with atomic_path(path, model=True) as tmp:
        wr = GGUFWriter(str(tmp), arch)
        wr.add_name(name or f"tiny-{arch}-s{seed}")
        wr.add_file_type(1 if f16 else 0)
        a = arch
        wr.add_uint32(f"{a}.context_length", n_ctx_train)
        wr.add_uint32(f"{a}.embedding_length", n_embd)
        wr.add_uint32(f"{a}.block_count", n_layer)
        wr.add_uint32(f"{a}.feed_forward_length", n_ff_exp)
        wr.add_uint32(f"{a}.expert_feed_forward_length", n_ff_exp)
        wr.add_uint32(f"{a}.attention.head_count", n_head)
        wr.add_uint32(f"{a}.attention.head_count_kv", n_head_kv)
        wr.add_uint32(f"{a}.attention.key_length", head_dim)
        wr.add_uint32(f"{a}.attention.value_length", head_dim)
        wr.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
        wr.add_float32(f"{a}.rope.freq_base", 10000.0)
        wr.add_uint32(f"{a}.expert_count", n_expert)
        wr.add_uint32(f"{a}.expert_used_count", n_expert_used)
        if arch == "gpt-oss":
            wr.add_uint32(f"{a}.attention.sliding_window", 128)
        if vocab is None:
            wr.add_tokenizer_model("llama")
            wr.add_token_list(tokens)
            wr.add_token_scores(scores)
            wr.add_token_types(types)
            wr.add_unk_token_id(0)
            wr.add_bos_token_id(1)
            wr.add_eos_token_id(2)
        else:
            tokens = vocab.tokens
            wr.add_tokenizer_model("gpt2")
            wr.add_tokenizer_pre(vocab.pre)
            wr.add_token_list(tokens)
            wr.add_token_types(vocab.types)
            wr.add_token_merges(vocab.merges)
            wr.add_bos_token_id(vocab.eos)
            wr.add_eos_token_id(vocab.eos)
        wr.add_add_bos_token(add_bos)
        dtype = np.float16 if f16 else np.float32
        for tname, arr in _tensors(arch, rng, n_layer, n_expert, n_embd, n_head, n_head_kv, head_dim,
                                   n_ff_exp, len(tokens), dtype):
            if arr.ndim == 1 or tname.endswith(".bias") or "ffn_gate_inp" in tname:
                arr = arr.astype(np.float32)
            wr.add_tensor(tname, np.ascontiguousarray(arr))
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_tensors_to_file()
        wr.close()
    return path


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], quant: str, threads: int = 0) -> Path:
    """Re-quantize ``src`` into ``dst`` with llama.cpp's own ``llama_model_quantize`` (atomically)."""
    from ..trace.live.ggml_ctypes import LlamaLog, load_llama_cpp

    if quant not in QUANT_FTYPES:
        raise InputError(f"quantize: {quant!r} is not one of {', '.join(QUANT_FTYPES)}")
    lc = load_llama_cpp()
    dst = Path(dst)
    with atomic_path(dst, model=True) as tmp:
        params = lc.llama_model_quantize_default_params()
        params.ftype = QUANT_FTYPES[quant]
        params.nthread = threads
        params.allow_requantize = True
        with LlamaLog() as log:
            rc = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise ModelBuildError(f"{src}: llama_model_quantize to {quant} failed (rc {rc}): {log.tail()}")
    return dst


def make_tiny_model(path: str | os.PathLike[str], arch: str = "qwen3moe", seed: int = 0, n_layer: int = 4,
                    n_expert: int = 16, n_expert_used: int = 4, n_embd: int = 64, n_head: int = 4,
                    n_head_kv: int = 2, n_ff_exp: int = 32, quant: str | None = None,
                    name: str | None = None, add_bos: bool = False) -> Path:
    """Write a tiny runnable MoE model; ``quant`` None/"F32" (gguf-py) or "F16", "Q8_0", "Q4_K_M",
    "MXFP4_MOE" (gguf-py F32, then llama.cpp's quantizer). Deterministic from the arguments."""
    path = Path(path)
    kw = {"arch": arch, "seed": seed, "n_layer": n_layer, "n_expert": n_expert, "n_expert_used": n_expert_used,
              "n_embd": n_embd, "n_head": n_head, "n_head_kv": n_head_kv, "n_ff_exp": n_ff_exp, "name": name,
          "add_bos": add_bos}
    if quant in (None, "F32"):
        return write_float_model(path, **kw)  # type: ignore[arg-type]
    if quant not in QUANT_FTYPES:
        raise InputError(f"tiny model: quant {quant!r} is not one of F32, {', '.join(list(QUANT_FTYPES)[1:])}")
    with tempfile.TemporaryDirectory(dir=path.parent if str(path.parent) else ".") as d:
        src = write_float_model(Path(d) / "f32.gguf", **kw)  # type: ignore[arg-type]
        return quantize(src, path, quant)


def random_twin(src: str | os.PathLike[str], seed: int = DEMO_SEED) -> Path:
    """A random-weight qwen3moe model with ``src``'s shape and BPE vocabulary, in the cache dir: the baseline that
    a trained model's routing is compared with (same prompts, same tokens, only the weights differ)."""
    from gguf import GGUFReader

    r = GGUFReader(str(src))

    def get(key: str) -> Any:
        f = r.fields.get(key)
        if f is None:
            raise InputError(f"{src}: no {key} in the metadata; a random twin needs a qwen3moe model with a "
                             "GPT-2 BPE tokenizer")
        return f.contents()

    arch = get("general.architecture")
    if arch != "qwen3moe" or get("tokenizer.ggml.model") != "gpt2":
        raise InputError(f"{src}: a random twin is made for qwen3moe models with a gpt2 tokenizer, not {arch}")
    a = arch
    shape = {"n_layer": int(get(f"{a}.block_count")), "n_expert": int(get(f"{a}.expert_count")),
             "n_expert_used": int(get(f"{a}.expert_used_count")), "n_embd": int(get(f"{a}.embedding_length")),
             "n_head": int(get(f"{a}.attention.head_count")), "n_head_kv": int(get(f"{a}.attention.head_count_kv")),
             "n_ff_exp": int(get(f"{a}.expert_feed_forward_length")), "n_ctx_train": int(get(f"{a}.context_length"))}
    vocab = BpeVocab(tokens=list(get("tokenizer.ggml.tokens")),
                     types=[int(t) for t in get("tokenizer.ggml.token_type")],
                     merges=list(get("tokenizer.ggml.merges")), pre=str(get("tokenizer.ggml.pre")),
                     eos=int(get("tokenizer.ggml.eos_token_id")))
    h = hashlib.sha1(json.dumps([shape, vocab.tokens, vocab.merges, seed, GENERATOR_VERSION]).encode()).hexdigest()
    d = _made_cache_dir()
    path = d / f"random-twin-{h[:10]}.gguf"
    if not path.exists():
        write_float_model(path, arch="qwen3moe", seed=seed, f16=True, name=f"random twin of {Path(src).name}",
                          vocab=vocab, **shape)  # type: ignore[arg-type]
    return path


def _made_cache_dir() -> Path:
    """The cache dir, created if missing; a user-facing error when it cannot be."""
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the cache directory {d}: {e}; set GGUF_EXPERTS_CACHE to a writable "
                         "directory") from e
    return d


def demo_model_path(arch: str = "qwen3moe") -> Path:
    """The demo model, generated on first use into the cache dir (temp file + rename, so never half-written)."""
    tag = hashlib.sha1(f"{arch}-{DEMO_SEED}-{GENERATOR_VERSION}".encode()).hexdigest()[:8]
    d = _made_cache_dir()
    path = d / f"tiny-{arch}-demo-{tag}.gguf"
    if not path.exists():
        make_tiny_model(path, arch=arch, seed=DEMO_SEED, name=f"gguf-experts demo {arch}")
    return path


__all__ = [
    "ARCHES", "QUANT_FTYPES", "BpeVocab", "ModelBuildError", "demo_model_path", "make_tiny_model", "quantize",
    "random_twin",
    "write_float_model",
]
