#!/usr/bin/env python
"""A realistically sized random MoE GGUF (default: Qwen3-30B-A3B-shaped qwen3moe; `--arch gpt-oss`: gpt-oss-20b's
shapes), streamed to disk.

Why: recording overhead and CPU/GPU agreement must be measured at real size, and no real model can be
downloaded on the GPU machine. There is no float intermediate: quantized blocks (Q8_0 or Q4_K) are
written directly from a pool of random blocks (each tensor starts at another place in the pool), so a
30 GiB file takes about as long as the disk needs. The router rows are peaked: each expert's row is
random with its own scale (a few experts have large-variance logits), so routing is skewed toward some
experts and the top-k margins are wide, not the coin toss of a flat random router.

Routing shape. In a random deep model attention collapses every position onto nearly one hidden state, so the
default model routes in a concentrated way whatever its router (in 138 tokens, 60-106 of 128 experts per layer
were never selected). `--token-dependent` keeps the token in the hidden state: token embeddings sqrt(n_embd)
times larger, attention-output and expert down-projection weights 20x smaller, and a flat router (every row
drawn alike); then only a few experts per layer go unused and the hot set is the whole model, as with the
token-dependent routing of trained models (the hardest case for paging). Same tensors, sizes and offsets.

gpt-oss (`--arch gpt-oss`, defaults 24 layers x 32 experts, top-4, n_embd 2880, expert ff 2880, 64/8 heads of 64):
what llama.cpp's loader (src/models/openai-moe.cpp) creates: attention with q/k/v/output biases and per-head
attention sinks, a post-attention norm, a router with a bias, separate (not fused) gate and up expert tensors,
each expert tensor with its bias, and `gpt-oss.attention.sliding_window`. `--quant MXFP4` (gpt-oss's own format,
llama.cpp's MXFP4_MOE file type): expert tensors MXFP4 (E8M0 scale + 32 e2m1 nibbles per 17-byte block), the other
matrices Q8_0.

    python scripts/make_big_model.py OUT.gguf [--arch qwen3moe|gpt-oss] [--quant Q8_0|Q4_K|MXFP4] [--layers 48]
        [--experts 128] [--top-k 8] [--embd 2048] [--ff 768] [--heads 32] [--heads-kv 4] [--head-dim 128]
        [--seed 0] [--token-dependent] [--router peaked|flat]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

# ggml block layouts: (values per block, bytes per block)
BLOCKS = {"Q8_0": (32, 34), "Q4_K": (256, 144), "MXFP4": (32, 17)}
GGML_IDS = {"F32": 0, "Q8_0": 8, "Q4_K": 12, "MXFP4": 39}
FILE_TYPES = {"Q8_0": 7, "Q4_K": 15, "MXFP4": 38}  # llama_ftype: MOSTLY_Q8_0, MOSTLY_Q4_K_M, MOSTLY_MXFP4_MOE
#: (layers, experts, top-k, embd, ff, heads, heads-kv, head-dim) when not given
SHAPES = {"qwen3moe": (48, 128, 8, 2048, 768, 32, 4, 128), "gpt-oss": (24, 32, 4, 2880, 2880, 64, 8, 64)}
POOL_BYTES = 64 << 20


def block_pool(quant: str, rng: np.random.Generator, n_in: int) -> np.ndarray:
    """Random, valid blocks scaled so that a matrix of fan-in n_in keeps activations of order one."""
    blck, size = BLOCKS[quant]
    n = POOL_BYTES // size
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    if quant == "Q8_0":  # f16 d, then 32 int8: value = d * q, q ~ uniform(-128, 127) has std ~74
        d = np.full(n, 1.0 / (74.0 * np.sqrt(n_in)), dtype=np.float16)
        raw[:, 0:2] = d.view(np.uint8).reshape(n, 2)
    elif quant == "MXFP4":  # E8M0 e, then 16 bytes of e2m1 nibbles: value = kvalue * 2^(e - 128), the kvalues
        # (0, +-1, 2, 3, 4, 6, 8, 12) of uniform nibbles have rms ~5.85
        raw[:, 0] = int(round(128 + np.log2(1.0 / (5.85 * np.sqrt(n_in)))))
    else:  # Q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit quants
        d = np.full(n, 1.0 / (8.0 * 32.0 * np.sqrt(n_in)), dtype=np.float16)
        raw[:, 0:2] = d.view(np.uint8).reshape(n, 2)
        # value = d * sc * q - dmin * m with q in 0..15 and sc, m 6-bit: dmin = 7.5 d makes the mean zero
        dmin = (d.astype(np.float32) * 7.5).astype(np.float16)
        raw[:, 2:4] = dmin.view(np.uint8).reshape(n, 2)
    return raw.reshape(-1)


def rescale_pool(pool: np.ndarray, quant: str, factor: float) -> np.ndarray:
    """A copy of a block pool with every block's scale (and Q4_K's min scale) multiplied by factor: the same
    random quants, a weight matrix factor times larger (no random draw, so the other tensors stay as they were)."""
    blck, size = BLOCKS[quant]
    raw = pool.reshape(-1, size).copy()
    if quant == "MXFP4":  # a power-of-two exponent: the nearest one
        raw[:, 0] = np.clip(raw[:, 0].astype(np.int32) + int(round(np.log2(factor))), 1, 254).astype(np.uint8)
        return raw.reshape(-1)
    for lo in ((0, 2) if quant == "Q4_K" else (0,)):  # byte offsets of the f16 d (and Q4_K's dmin)
        d = raw[:, lo:lo + 2].copy().view(np.float16).astype(np.float32) * factor
        raw[:, lo:lo + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(-1)


def make_pools(quant: str, rng: np.random.Generator, fan_ins: set[int],
               keys: list[tuple[int, float]]) -> dict[tuple[int, float], np.ndarray]:
    """Block pools keyed (fan-in, scale factor): one random pool per fan-in (drawn in the set's order, as
    always), and rescaled copies of it for the factors the plan asks for."""
    pools = {(n_in, 1.0): block_pool(quant, rng, n_in) for n_in in fan_ins}
    for key in keys:
        if key not in pools:
            pools[key] = rescale_pool(pools[(key[0], 1.0)], quant, key[1])
    return pools


def pool_bytes(pool: np.ndarray, need: int, bsize: int, rng: np.random.Generator) -> np.ndarray:
    """need bytes of whole blocks from the pool, starting at a random block, wrapping around."""
    start = int(rng.integers(0, len(pool) // bsize)) * bsize
    chunks = []
    got = 0
    while got < need:
        piece = pool[start:start + (need - got)]
        chunks.append(piece)
        got += len(piece)
        start = 0
    return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]


def main(argv: list[str] | None = None) -> int:  # noqa: C901 (one flat plan of tensors)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--arch", choices=sorted(SHAPES), default="qwen3moe")
    ap.add_argument("--quant", choices=sorted(BLOCKS), default="Q8_0",
                    help="MXFP4: expert tensors MXFP4, the other matrices Q8_0 (llama.cpp's MXFP4_MOE)")
    for opt in ("--layers", "--experts", "--top-k", "--embd", "--ff", "--heads", "--heads-kv", "--head-dim"):
        ap.add_argument(opt, type=int, default=None, help="default: the --arch shape")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--token-dependent", action="store_true",
                    help="keep the token in the hidden state (token embeddings sqrt(n_embd) times larger, "
                         "attn_output and ffn_down_exps 20x smaller) and use a flat router: routing varies per token")
    ap.add_argument("--router", choices=("peaked", "flat"), default=None,
                    help="router rows: each expert with its own scale (peaked, the default) or all drawn alike "
                         "(flat, the default with --token-dependent)")
    a = ap.parse_args(argv)
    for name, dflt in zip(("layers", "experts", "top_k", "embd", "ff", "heads", "heads_kv", "head_dim"),
                          SHAPES[a.arch]):
        if getattr(a, name) is None:
            setattr(a, name, dflt)
    gptoss = a.arch == "gpt-oss"
    flat = (a.router or ("flat" if a.token_dependent else "peaked")) == "flat"
    # weight scale per tensor kind: token embeddings, attention output, expert down projection
    embd_x, small_x = (float(np.sqrt(a.embd)), 1 / 20) if a.token_dependent else (1.0, 1.0)
    from gguf import GGMLQuantizationType, GGUFWriter

    t0 = time.perf_counter()
    rng = np.random.default_rng(a.seed)
    arch, xq = a.arch, a.quant
    q = "Q8_0" if xq == "MXFP4" else xq  # MXFP4_MOE: MXFP4 experts, Q8_0 elsewhere
    for t in {q, xq}:
        for dim in (a.embd, a.ff, a.heads * a.head_dim):
            if dim % BLOCKS[t][0]:
                sys.exit(f"make_big_model: {dim} is not a multiple of {t}'s block of {BLOCKS[t][0]} values")
    n_vocab = 259
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    wr = GGUFWriter(a.out, arch)
    shape = "-tokdep" if a.token_dependent else ""
    wr.add_name(f"big-{arch}-{a.layers}x{a.experts}top{a.top_k}-{xq}{shape}{'-flat' if flat else ''}")
    wr.add_file_type(FILE_TYPES[xq])
    for key, val in [("context_length", 4096), ("embedding_length", a.embd), ("block_count", a.layers),
                     ("feed_forward_length", a.ff * 8), ("expert_feed_forward_length", a.ff),
                     ("attention.head_count", a.heads), ("attention.head_count_kv", a.heads_kv),
                     ("attention.key_length", a.head_dim), ("attention.value_length", a.head_dim),
                     ("expert_count", a.experts), ("expert_used_count", a.top_k)]:
        wr.add_uint32(f"{arch}.{key}", val)
    if gptoss:
        wr.add_uint32(f"{arch}.attention.sliding_window", 128)
    wr.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    wr.add_float32(f"{arch}.rope.freq_base", 1e6)
    wr.add_tokenizer_model("llama")
    wr.add_token_list(tokens)
    wr.add_token_scores([0.0] * n_vocab)
    wr.add_token_types([2, 3, 3] + [6] * 256)
    wr.add_unk_token_id(0)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    wr.add_add_bos_token(True)

    # (name, ne in ggml order, type, producer of the bytes)
    plan: list[tuple[str, tuple[int, ...], str, np.ndarray | tuple[int, float]]] = []
    qd, kvd = a.heads * a.head_dim, a.heads_kv * a.head_dim

    def quant(name: str, *ne: int, x: float = 1.0, t: str = q) -> None:
        plan.append((name, ne, t, (ne[0], x, t)))

    def f32(name: str, arr: np.ndarray) -> None:
        plan.append((name, tuple(reversed(arr.shape)), "F32", arr.astype(np.float32)))

    ones = np.ones(a.embd, dtype=np.float32)
    quant("token_embd.weight", a.embd, n_vocab, x=embd_x)
    f32("output_norm.weight", ones)
    quant("output.weight", a.embd, n_vocab)
    def bias(name: str, *shape: int, scale: float = 0.02) -> None:
        f32(name, rng.standard_normal(shape) * scale)

    for i in range(a.layers):
        p = f"blk.{i}."
        f32(p + "attn_norm.weight", ones)
        if gptoss:
            f32(p + "post_attention_norm.weight", ones)
        quant(p + "attn_q.weight", a.embd, qd)
        quant(p + "attn_k.weight", a.embd, kvd)
        quant(p + "attn_v.weight", a.embd, kvd)
        quant(p + "attn_output.weight", qd, a.embd, x=small_x)
        if gptoss:
            bias(p + "attn_q.bias", qd)
            bias(p + "attn_k.bias", kvd)
            bias(p + "attn_v.bias", kvd)
            bias(p + "attn_output.bias", a.embd)
            bias(p + "attn_sinks.weight", a.heads, scale=0.5)
        else:
            f32(p + "attn_q_norm.weight", np.ones(a.head_dim, dtype=np.float32))
            f32(p + "attn_k_norm.weight", np.ones(a.head_dim, dtype=np.float32))
            f32(p + "ffn_norm.weight", ones)
        # peaked router: logit_e ~ N(0, scale_e^2) for a normalised input; a few experts have large scales
        scale = 0.5 + 5.0 * (np.arange(a.experts) / max(a.experts - 1, 1)) ** 4
        scale = rng.permutation(scale)
        if flat:  # every row drawn alike (the permutation is still drawn: other tensors keep their bytes)
            scale = np.ones(a.experts)
        router = rng.standard_normal((a.experts, a.embd)) * (scale[:, None] / np.sqrt(a.embd))
        f32(p + "ffn_gate_inp.weight", router)
        if gptoss:
            bias(p + "ffn_gate_inp.bias", a.experts, scale=0.3)
        # gpt-oss: separate gate and up, as openai-moe.cpp loads them (no fused gate_up)
        quant(p + "ffn_gate_exps.weight", a.embd, a.ff, a.experts, t=xq)
        quant(p + "ffn_up_exps.weight", a.embd, a.ff, a.experts, t=xq)
        quant(p + "ffn_down_exps.weight", a.ff, a.embd, a.experts, x=small_x, t=xq)
        if gptoss:
            bias(p + "ffn_gate_exps.bias", a.experts, a.ff)
            bias(p + "ffn_up_exps.bias", a.experts, a.ff)
            bias(p + "ffn_down_exps.bias", a.experts, a.embd)

    def nbytes(ne: tuple[int, ...], typ: str) -> int:
        n = int(np.prod(ne))
        return n * 4 if typ == "F32" else n // BLOCKS[typ][0] * BLOCKS[typ][1]

    for name, ne, typ, _ in plan:
        if typ == "F32":
            wr.add_tensor_info(name, tuple(reversed(ne)), np.dtype(np.float32), nbytes(ne, typ),
                               raw_dtype=GGMLQuantizationType.F32)
        else:  # gguf-py takes the byte shape of a quantized tensor: rows of ne0 / blck * bsize bytes
            blck, bsize = BLOCKS[typ]
            byte_shape = tuple(reversed((ne[0] // blck * bsize, *ne[1:])))
            wr.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes(ne, typ),
                               raw_dtype=GGMLQuantizationType[typ])
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_ti_data_to_file()
    keys = [src for _, _, _, src in plan if isinstance(src, tuple)]
    pools: dict[tuple[int, float, str], np.ndarray] = {}
    for t in dict.fromkeys([q, xq]):  # q first: a Q8_0/Q4_K model draws exactly what it always drew
        for (n_in, x), pool in make_pools(t, rng, {a.embd, a.ff, qd}, [k[:2] for k in keys if k[2] == t]).items():
            pools[(n_in, x, t)] = pool
    total = 0
    for _, ne, typ, src in plan:
        data = (pool_bytes(pools[src], nbytes(ne, typ), BLOCKS[typ][1], rng) if isinstance(src, tuple)
                else src)
        wr.write_tensor_data(data)
        total += data.nbytes
    wr.close()
    print(f"wrote {a.out}: {total / 2**30:.2f} GiB of tensor data, {len(plan)} tensors, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
