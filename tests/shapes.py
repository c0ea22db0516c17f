"""Realistic-shaped MoE model headers (Qwen3-30B-A3B, Qwen3-Next-80B-A3B, gpt-oss-20b, DeepSeek-V3).

A test fixture, not part of the wheel: the tests import it as ``shapes`` and scripts/bench_reader.py puts
tests/ on sys.path for it.

Why: the reader, the byte map and the benchmarks must be tested on what people really load (real tensor
names, shapes, ggml type mixes and tokenizer sizes) without downloading hundreds of GB. Only the header is
written; the data section is a sparse hole (truncate), so a DeepSeek-V3-shaped set of shards costs a few MB.
Type mixes follow llama.cpp's quantizer (e.g. Q4_K_M: Q6_K for ffn_down / attn_v on the "more bits" layers).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gguf_experts.gguf.writer import TensorSpec, write_gguf, write_split

F32 = "F32"


@dataclass
class ModelShape:
    """A model's header as data: metadata, tensors in file order, and the facts tests check against."""

    key: str
    stem: str
    kv: dict[str, Any]
    tensors: list[TensorSpec]
    n_layer: int
    n_expert: int
    n_expert_used: int
    moe_layers: list[int]
    n_shards: int = 1
    facts: dict[str, Any] = field(default_factory=dict)

    def write(self, directory: str | os.PathLike[str], **kw: Any) -> Path:
        """Write the (sparse) file or shards into directory; returns the first file's path."""
        directory = Path(directory)
        if self.n_shards > 1:
            return write_split(directory, self.stem, self.kv, self.tensors, self.n_shards, **kw)[0]
        return write_gguf(directory / f"{self.stem}.gguf", self.kv, self.tensors, **kw)


@functools.lru_cache(maxsize=8)
def _vocab(n_tokens: int, n_merges: int) -> tuple[list[str], list[str]]:
    """Deterministic BPE-like token and merge strings with realistic lengths (3..12 bytes, some non-ASCII)."""
    pre = ("", "Ġ", "Ċ", "ĠĠ")
    tokens = [f"{pre[i & 3]}{i:x}{'abcdefgh'[: i % 7]}" for i in range(n_tokens)]
    merges = [f"{pre[i & 1]}{(i * 7) % n_tokens:x} {i % 9973:x}{'xyz'[: i % 4]}" for i in range(n_merges)]
    return tokens, merges


_CHAT_TEMPLATE = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}{%- endfor %}" * 60


def _tokenizer(model: str, pre: str, n_tokens: int, n_merges: int, eos: int, bos: int | None = None) -> dict[str, Any]:
    tokens, merges = _vocab(n_tokens, n_merges)
    ttype = np.ones(n_tokens, dtype=np.int32)
    ttype[-300:] = 3  # control / added tokens at the end, as in real vocabularies
    kv: dict[str, Any] = {
        "tokenizer.ggml.model": model, "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": ttype,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": eos, "tokenizer.ggml.padding_token_id": eos,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": _CHAT_TEMPLATE,
    }
    if bos is not None:
        kv["tokenizer.ggml.bos_token_id"] = bos
    return kv


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits(): which layers Q4_K_M gives Q6_K for ffn_down and attn_v."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _general(arch: str, name: str, file_type: int) -> dict[str, Any]:
    return {"general.architecture": arch, "general.type": "model", "general.name": name,
            "general.quantization_version": 2, "general.file_type": file_type}


def qwen3_30b_a3b() -> ModelShape:
    """Qwen3-30B-A3B Q4_K_M: 48 layers, 128 experts top-8, n_embd 2048, expert ff 768, vocab 151,936."""
    L, E, D, FF, V = 48, 128, 2048, 768, 151936
    a = "qwen3moe"
    kv = {**_general(a, "Qwen3 30B A3B", 15),
          f"{a}.block_count": L, f"{a}.context_length": 40960, f"{a}.embedding_length": D,
          f"{a}.feed_forward_length": 6144, f"{a}.attention.head_count": 32, f"{a}.attention.head_count_kv": 4,
          f"{a}.rope.freq_base": 1e6, f"{a}.attention.layer_norm_rms_epsilon": 1e-6,
          f"{a}.expert_used_count": 8, f"{a}.attention.key_length": 128, f"{a}.attention.value_length": 128,
          f"{a}.expert_count": E, f"{a}.expert_feed_forward_length": FF,
          **_tokenizer("gpt2", "qwen2", V, 151387, eos=151645)}
    t = [TensorSpec.make("token_embd.weight", (D, V), "Q4_K")]
    for i in range(L):
        hi = "Q6_K" if _more_bits(i, L) else "Q4_K"
        p = f"blk.{i}."
        t += [TensorSpec.make(p + n, ne, ty) for n, ne, ty in (
            ("attn_norm.weight", (D,), F32), ("attn_q.weight", (D, 4096), "Q4_K"),
            ("attn_k.weight", (D, 512), "Q4_K"), ("attn_v.weight", (D, 512), hi),
            ("attn_output.weight", (4096, D), "Q4_K"), ("attn_q_norm.weight", (128,), F32),
            ("attn_k_norm.weight", (128,), F32), ("ffn_norm.weight", (D,), F32),
            ("ffn_gate_inp.weight", (D, E), F32), ("ffn_gate_exps.weight", (D, FF, E), "Q4_K"),
            ("ffn_up_exps.weight", (D, FF, E), "Q4_K"), ("ffn_down_exps.weight", (FF, D, E), hi))]
    t += [TensorSpec.make("output_norm.weight", (D,), F32), TensorSpec.make("output.weight", (D, V), "Q6_K")]
    return ModelShape("qwen3-30b-a3b", "Qwen3-30B-A3B-Q4_K_M", kv, t, L, E, 8, list(range(L)),
                      facts={"n_tokens": V, "n_merges": 151387, "expert_ff": FF, "n_embd": D})


def qwen3_next_80b_a3b(fused: bool = False) -> ModelShape:
    """Qwen3-Next-80B-A3B Q4_K_M: 48 layers (full attention every 4th, gated delta-net otherwise),
    512 experts top-10 + one shared expert, expert ff 512, vocab 151,936. ``fused`` stores gate and up as
    one ffn_gate_up_exps {2048, 1024, 512}, as newer conversions may."""
    L, E, D, FF, V = 48, 512, 2048, 512, 151936
    a = "qwen3next"
    kv = {**_general(a, "Qwen3 Next 80B A3B Instruct", 15),
          f"{a}.block_count": L, f"{a}.context_length": 262144, f"{a}.embedding_length": D,
          f"{a}.feed_forward_length": 5120, f"{a}.attention.head_count": 16, f"{a}.attention.head_count_kv": 2,
          f"{a}.rope.freq_base": 1e7, f"{a}.attention.layer_norm_rms_epsilon": 1e-6,
          f"{a}.expert_used_count": 10, f"{a}.attention.key_length": 256, f"{a}.attention.value_length": 256,
          f"{a}.expert_count": E, f"{a}.expert_feed_forward_length": FF,
          f"{a}.expert_shared_feed_forward_length": FF, f"{a}.expert_shared_count": 1,
          f"{a}.ssm.conv_kernel": 4, f"{a}.ssm.state_size": 128, f"{a}.ssm.group_count": 16,
          f"{a}.ssm.time_step_rank": 32, f"{a}.ssm.inner_size": 4096, f"{a}.full_attention_interval": 4,
          f"{a}.rope.dimension_count": 64,
          **_tokenizer("gpt2", "qwen2", V, 151387, eos=151645)}
    t = [TensorSpec.make("token_embd.weight", (D, V), "Q4_K")]
    for i in range(L):
        hi = "Q6_K" if _more_bits(i, L) else "Q4_K"
        p = f"blk.{i}."
        rows: list[tuple[str, tuple[int, ...], str]] = [("attn_norm.weight", (D,), F32)]
        if i % 4 == 3:  # full (gated) attention
            rows += [("attn_q.weight", (D, 8192), "Q4_K"), ("attn_k.weight", (D, 512), "Q4_K"),
                     ("attn_v.weight", (D, 512), hi), ("attn_output.weight", (4096, D), "Q4_K"),
                     ("attn_q_norm.weight", (256,), F32), ("attn_k_norm.weight", (256,), F32)]
        else:  # gated delta-net (linear attention)
            rows += [("attn_qkv.weight", (D, 8192), "Q4_K"), ("attn_gate.weight", (D, 4096), "Q4_K"),
                     ("ssm_conv1d.weight", (4, 8192), F32), ("ssm_dt.bias", (32,), F32), ("ssm_a", (32,), F32),
                     ("ssm_ba.weight", (D, 64), "Q8_0"), ("ssm_norm.weight", (128,), F32),
                     ("ssm_out.weight", (4096, D), "Q4_K")]
        rows += [("post_attention_norm.weight", (D,), F32), ("ffn_gate_inp.weight", (D, E), F32)]
        if fused:
            rows += [("ffn_gate_up_exps.weight", (D, 2 * FF, E), "Q4_K")]
        else:
            rows += [("ffn_gate_exps.weight", (D, FF, E), "Q4_K"), ("ffn_up_exps.weight", (D, FF, E), "Q4_K")]
        rows += [("ffn_down_exps.weight", (FF, D, E), hi), ("ffn_gate_inp_shexp.weight", (D,), F32),
                 ("ffn_gate_shexp.weight", (D, FF), "Q4_K"), ("ffn_up_shexp.weight", (D, FF), "Q4_K"),
                 ("ffn_down_shexp.weight", (FF, D), hi)]
        t += [TensorSpec.make(p + n, ne, ty) for n, ne, ty in rows]
    t += [TensorSpec.make("output_norm.weight", (D,), F32), TensorSpec.make("output.weight", (D, V), "Q6_K")]
    key = "qwen3-next-80b-a3b" + ("-fused" if fused else "")
    return ModelShape(key, "Qwen3-Next-80B-A3B-Instruct-Q4_K_M" + ("-fused" if fused else ""), kv, t, L, E, 10,
                      list(range(L)), facts={"n_tokens": V, "expert_ff": FF, "n_embd": D, "fused": fused})


def gpt_oss_20b() -> ModelShape:
    """gpt-oss-20b MXFP4: 24 layers, 32 experts top-4, MXFP4 experts with F32 biases {2880, 32},
    attention sinks, vocab 201,088 (o200k: 446,189 merges)."""
    L, E, D, FF, V = 24, 32, 2880, 2880, 201088
    a = "gpt-oss"
    kv = {**_general(a, "Gpt-Oss-20B", 38),
          f"{a}.block_count": L, f"{a}.context_length": 131072, f"{a}.embedding_length": D,
          f"{a}.feed_forward_length": FF, f"{a}.attention.head_count": 64, f"{a}.attention.head_count_kv": 8,
          f"{a}.rope.freq_base": 150000.0, f"{a}.attention.layer_norm_rms_epsilon": 1e-5,
          f"{a}.expert_count": E, f"{a}.expert_used_count": 4, f"{a}.attention.key_length": 64,
          f"{a}.attention.value_length": 64, f"{a}.attention.sliding_window": 128,
          f"{a}.expert_feed_forward_length": FF, f"{a}.rope.scaling.type": "yarn",
          f"{a}.rope.scaling.factor": 32.0, f"{a}.rope.scaling.original_context_length": 4096,
          **_tokenizer("gpt2", "gpt-4o", V, 446189, eos=200002, bos=199998)}
    t = [TensorSpec.make("token_embd.weight", (D, V), "Q8_0")]
    for i in range(L):
        p = f"blk.{i}."
        t += [TensorSpec.make(p + n, ne, ty) for n, ne, ty in (
            ("attn_norm.weight", (D,), F32), ("attn_q.weight", (D, 4096), "Q8_0"), ("attn_q.bias", (4096,), F32),
            ("attn_k.weight", (D, 512), "Q8_0"), ("attn_k.bias", (512,), F32),
            ("attn_v.weight", (D, 512), "Q8_0"), ("attn_v.bias", (512,), F32),
            ("attn_output.weight", (4096, D), "Q8_0"), ("attn_output.bias", (D,), F32),
            ("attn_sinks.weight", (64,), F32), ("post_attention_norm.weight", (D,), F32),
            ("ffn_gate_inp.weight", (D, E), F32), ("ffn_gate_inp.bias", (E,), F32),
            ("ffn_gate_exps.weight", (D, FF, E), "MXFP4"), ("ffn_gate_exps.bias", (FF, E), F32),
            ("ffn_up_exps.weight", (D, FF, E), "MXFP4"), ("ffn_up_exps.bias", (FF, E), F32),
            ("ffn_down_exps.weight", (FF, D, E), "MXFP4"), ("ffn_down_exps.bias", (D, E), F32))]
    t += [TensorSpec.make("output_norm.weight", (D,), F32), TensorSpec.make("output.weight", (D, V), "Q8_0")]
    return ModelShape("gpt-oss-20b", "gpt-oss-20b-mxfp4", kv, t, L, E, 4, list(range(L)),
                      facts={"n_tokens": V, "n_merges": 446189, "expert_ff": FF, "n_embd": D})


def deepseek_v3(n_shards: int = 5) -> ModelShape:
    """DeepSeek-V3 at a Q2_K/IQ2_XXS mix, split into shards: 61 layers (3 leading dense), 256 experts
    top-8 + 1 shared, MLA attention, exp_probs_b, vocab 129,280."""
    L, E, D, FF, V, DENSE = 61, 256, 7168, 2048, 129280, 3
    a = "deepseek2"
    kv = {**_general(a, "DeepSeek V3 0324", 10),
          f"{a}.block_count": L, f"{a}.context_length": 163840, f"{a}.embedding_length": D,
          f"{a}.feed_forward_length": 18432, f"{a}.attention.head_count": 128, f"{a}.attention.head_count_kv": 128,
          f"{a}.rope.freq_base": 10000.0, f"{a}.attention.layer_norm_rms_epsilon": 1e-6,
          f"{a}.expert_used_count": 8, f"{a}.leading_dense_block_count": DENSE, f"{a}.vocab_size": V,
          f"{a}.attention.q_lora_rank": 1536, f"{a}.attention.kv_lora_rank": 512,
          f"{a}.attention.key_length": 192, f"{a}.attention.value_length": 128,
          f"{a}.expert_feed_forward_length": FF, f"{a}.expert_count": E, f"{a}.expert_shared_count": 1,
          f"{a}.expert_weights_scale": 2.5, f"{a}.expert_weights_norm": True, f"{a}.expert_gating_func": 2,
          f"{a}.rope.dimension_count": 64,
          **_tokenizer("gpt2", "deepseek-v3", V, 127741, eos=1, bos=0)}
    t = [TensorSpec.make("token_embd.weight", (D, V), "Q4_K")]
    for i in range(L):
        p = f"blk.{i}."
        rows: list[tuple[str, tuple[int, ...], str]] = [
            ("attn_norm.weight", (D,), F32), ("attn_q_a_norm.weight", (1536,), F32),
            ("attn_kv_a_norm.weight", (512,), F32), ("attn_q_a.weight", (D, 1536), "Q4_K"),
            ("attn_q_b.weight", (1536, 24576), "Q4_K"), ("attn_kv_a_mqa.weight", (D, 576), "Q6_K"),
            ("attn_kv_b.weight", (512, 32768), "Q6_K"), ("attn_output.weight", (16384, D), "Q4_K"),
            ("ffn_norm.weight", (D,), F32)]
        if i < DENSE:
            rows += [("ffn_gate.weight", (D, 18432), "Q4_K"), ("ffn_up.weight", (D, 18432), "Q4_K"),
                     ("ffn_down.weight", (18432, D), "Q6_K")]
        else:
            rows += [("ffn_gate_inp.weight", (D, E), F32), ("exp_probs_b.bias", (E,), F32),
                     ("ffn_gate_exps.weight", (D, FF, E), "IQ2_XXS"), ("ffn_up_exps.weight", (D, FF, E), "IQ2_XXS"),
                     ("ffn_down_exps.weight", (FF, D, E), "Q2_K"), ("ffn_gate_shexp.weight", (D, FF), "Q4_K"),
                     ("ffn_up_shexp.weight", (D, FF), "Q4_K"), ("ffn_down_shexp.weight", (FF, D), "Q6_K")]
        t += [TensorSpec.make(p + n, ne, ty) for n, ne, ty in rows]
    t += [TensorSpec.make("output_norm.weight", (D,), F32), TensorSpec.make("output.weight", (D, V), "Q6_K")]
    return ModelShape("deepseek-v3", "DeepSeek-V3-0324-Q2_K", kv, t, L, E, 8, list(range(DENSE, L)),
                      n_shards=n_shards, facts={"n_tokens": V, "n_merges": 127741, "expert_ff": FF, "n_embd": D})


SHAPES: dict[str, Callable[[], ModelShape]] = {
    "qwen3-30b-a3b": qwen3_30b_a3b,
    "qwen3-next-80b-a3b": qwen3_next_80b_a3b,
    "qwen3-next-80b-a3b-fused": lambda: qwen3_next_80b_a3b(fused=True),
    "gpt-oss-20b": gpt_oss_20b,
    "deepseek-v3": deepseek_v3,
}

