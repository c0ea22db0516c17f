#!/usr/bin/env python3
"""Train the demo's tiny qwen3moe MoE on the CPU with PyTorch and export it to GGUF (issue 20).

Why: random routers have nothing to specialise on, so the demo's per-kind routing was noise. This trains a small
model of llama.cpp's qwen3moe architecture on a corpus of Python code and English prose that is on the machine
(gguf_experts/demo/data/corpus_manifest.json: files, sha256, licences, kind, train/held-out split), with a BPE
tokenizer trained by `tokenizers` on the same text, and writes with gguf-py's writer a GGUF that llama.cpp loads.

The model is exactly what llama.cpp's qwen3moe graph computes: RMSNorm (eps 1e-6) before attention and MoE, RMS
q/k norms per head, rope NEOX (freq base 10000), GQA attention scaled by 1/sqrt(head_dim), softmax over the router
logits then top-k, the k weights renormalised to sum 1 (llama.cpp hard-codes norm_w for qwen3moe), SwiGLU experts,
output tied to the token embedding (the GGUF has no output.weight; llama.cpp then reuses token_embd).

Reproduce the committed model (the exact command; needs the [train] extra, `pip install -e '.[train]'`; 19
minutes of wall time on the shared 2-core development machine, about 17 CPU-minutes in all):

    python scripts/train_tiny_moe.py --steps 400 --batch 8 --out gguf_experts/demo/data

--out does not change the result. Reruns are bit-identical on one machine with the same --threads and torch
2.13.0 (MKL_CBWR=AUTO,STRICT is set below; checked: a full 400-step rerun on this machine at 07:00 UTC, 394 s of
wall time at load ~3, gave the committed GGUF's sha256 588879ef...; without the setting two runs drifted apart
within 10 steps); on another CPU the result is equal only statistically (other MKL
kernels). The log records the GGUF's sha256.

Other uses:
    python scripts/train_tiny_moe.py --write-manifest        # (re)hash the corpus files into the manifest
    python scripts/train_tiny_moe.py --steps 30 --out /tmp/t  # a short run (e.g. to check bit-identical reruns)

Outputs in --out: tiny-moe-trained.gguf, tiny-moe-trained.tokenizer.json, tiny-moe-trained.log.json (config,
loss curve, held-out losses and perplexities per kind, wall time), heldout-<kind>.txt (the exact held-out text
whose perplexity the log reports, for llama-perplexity). A corpus file that is missing or changed: one line on
stderr naming it, exit 2.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gguf_experts.demo.corpus import (  # noqa: E402  (after the path insert: the script runs from a checkout)
    KINDS,
    MANIFEST,
    CorpusError,
    check_files,
    load_manifest,
    read_texts,
    sha256_file,
)

NAME = "tiny-moe-trained"
EOT = "<|endoftext|>"
#: the corpus: (source key, kind, glob, take every n-th file of the sorted glob, licence, licence file)
SOURCES = (
    ("python-3.11-stdlib", "code", "/usr/lib/python3.11/*.py", 3, "PSF-2.0",
     "/usr/share/doc/libpython3.11-minimal/copyright"),
    ("vim-9.0-user-manual", "prose", "/usr/share/vim/vim90/doc/usr_*.txt", 1, "Vim (GPL-compatible charityware)",
     "/usr/share/doc/vim-runtime/copyright"),
)
HELDOUT_EVERY = 8  # file i of a kind (sorted) is held out when i % 8 == 3


def write_manifest(path: Path) -> None:
    """Hash the corpus files of SOURCES into the manifest (done once, committed)."""
    sources: dict[str, dict[str, str]] = {}
    files = []
    for key, kind, pattern, every, licence, licence_file in SOURCES:
        sources[key] = {"licence": licence, "licence_file": licence_file, "kind": kind,
                        "selection": f"sorted({pattern})[::{every}]"}
        for i, p in enumerate(sorted(glob.glob(pattern))[::every]):
            files.append({"path": p, "sha256": sha256_file(p), "bytes": os.stat(p).st_size, "kind": kind,
                          "source": key, "split": "heldout" if i % HELDOUT_EVERY == 3 else "train"})
    doc = {"about": "training corpus of the demo model (scripts/train_tiny_moe.py); held out: file i % "
                    f"{HELDOUT_EVERY} == 3 of each source", "sources": sources, "files": files}
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int):  # type: ignore[no-untyped-def]
    """Byte-level BPE with GPT-2's pre-tokenizer regex (llama.cpp's "gpt-2" pre-tokenizer uses the same one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


# ---------------------------------------------------------------- model

def build_model(cfg: dict):  # type: ignore[no-untyped-def]  # noqa: C901  (the model's classes, one closure)
    import torch
    import torch.nn.functional as F
    from torch import nn

    eps = cfg["rms_eps"]

    class RMSNorm(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

        def forward(self, x):  # type: ignore[no-untyped-def]
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * self.weight

    def rope_neox(x, cos, sin):  # type: ignore[no-untyped-def]
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    class MoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            E, d, f = cfg["n_expert"], cfg["d_model"], cfg["n_ff_exp"]
            self.router = nn.Parameter(torch.randn(E, d) * 0.02)
            self.gate = nn.Parameter(torch.randn(E, f, d) * (1 / math.sqrt(d)))
            self.up = nn.Parameter(torch.randn(E, f, d) * (1 / math.sqrt(d)))
            self.down = nn.Parameter(torch.randn(E, d, f) * (0.5 / math.sqrt(f * cfg["n_layer"])))

        def forward(self, x):  # type: ignore[no-untyped-def]
            E, k = cfg["n_expert"], cfg["n_expert_used"]
            n = x.shape[0]
            probs = torch.softmax(x @ self.router.t(), dim=-1)  # softmax, then top-k (llama.cpp's SOFTMAX gating)
            topv, topi = probs.topk(k, dim=-1)
            w = topv / topv.sum(-1, keepdim=True).clamp_min(6.103515625e-5)  # norm_w, as llama.cpp clamps
            flat = topi.reshape(-1)
            order = torch.argsort(flat, stable=True)
            tok = order // k
            counts = torch.bincount(flat, minlength=E).tolist()
            xs = x[tok]
            outs = []
            # unbind, not self.gate[e]: indexing a parameter per expert makes backward add E full-size zero
            # gradients; unbind's backward is one stack
            gates, ups, downs = self.gate.unbind(0), self.up.unbind(0), self.down.unbind(0)
            for e, chunk in enumerate(torch.split(xs, counts)):
                if chunk.shape[0]:
                    h = F.silu(chunk @ gates[e].t()) * (chunk @ ups[e].t())
                    outs.append(h @ downs[e].t())
            ys = torch.cat(outs) * w.reshape(-1)[order].unsqueeze(-1)
            out = torch.zeros_like(x).index_add_(0, tok, ys)
            # Switch-style load balance: fraction routed x mean probability, per expert
            frac = torch.bincount(flat, minlength=E).to(x.dtype) / (n * k)
            aux = E * (frac * probs.mean(0)).sum()
            return out, aux, topi

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d, nh, nkv, hd = cfg["d_model"], cfg["n_head"], cfg["n_head_kv"], cfg["head_dim"]
            self.attn_norm = RMSNorm(d)
            self.q = nn.Linear(d, nh * hd, bias=False)
            self.k = nn.Linear(d, nkv * hd, bias=False)
            self.v = nn.Linear(d, nkv * hd, bias=False)
            self.o = nn.Linear(nh * hd, d, bias=False)
            nn.init.normal_(self.o.weight, std=0.02 / math.sqrt(2 * cfg["n_layer"]))
            self.q_norm = RMSNorm(hd)
            self.k_norm = RMSNorm(hd)
            self.ffn_norm = RMSNorm(d)
            self.moe = MoE()

        def forward(self, x, cos, sin):  # type: ignore[no-untyped-def]
            B, T, d = x.shape
            nh, nkv, hd = cfg["n_head"], cfg["n_head_kv"], cfg["head_dim"]
            h = self.attn_norm(x)
            q = self.q_norm(self.q(h).view(B, T, nh, hd))
            k = self.k_norm(self.k(h).view(B, T, nkv, hd))
            v = self.v(h).view(B, T, nkv, hd)
            q = rope_neox(q, cos, sin).transpose(1, 2)
            k = rope_neox(k, cos, sin).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
            v = v.transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(hd))
            x = x + self.o(a.transpose(1, 2).reshape(B, T, nh * hd))
            m, aux, topi = self.moe(self.ffn_norm(x).reshape(B * T, d))
            return x + m.view(B, T, d), aux, topi

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(cfg["n_vocab"], cfg["d_model"])
            nn.init.normal_(self.embed.weight, std=0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg["n_layer"]))
            self.out_norm = RMSNorm(cfg["d_model"])
            hd = cfg["head_dim"]
            inv = cfg["rope_base"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
            ang = torch.arange(cfg["ctx"], dtype=torch.float64)[:, None] * inv[None, :]
            self.register_buffer("cos", ang.cos().float()[:, None, :], persistent=False)  # (T, 1, hd/2)
            self.register_buffer("sin", ang.sin().float()[:, None, :], persistent=False)

        def forward(self, ids):  # type: ignore[no-untyped-def]
            T = ids.shape[1]
            x = self.embed(ids)
            aux = x.new_zeros(())
            routes = []
            for b in self.blocks:
                x, a, topi = b(x, self.cos[:T], self.sin[:T])
                aux = aux + a
                routes.append(topi)
            return self.out_norm(x) @ self.embed.weight.t(), aux / len(self.blocks), routes

    return Model()


# ---------------------------------------------------------------- data and evaluation

def token_streams(tok, texts: list[str]):  # type: ignore[no-untyped-def]
    """One long int64 token stream: the texts, each followed by the EOT token."""
    import numpy as np

    eot = tok.token_to_id(EOT)
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray(enc.ids + [eot], dtype=np.int64))
    return np.concatenate(parts)


def heldout_sample(tok, texts: list[str], n_ctx: int, n_chunks: int) -> tuple[str, list[int]]:
    """The held-out text of one kind cut just past n_chunks * n_ctx tokens (llama-perplexity's chunks), and the
    ids of those chunks. The files are joined by a blank line (plain text, as llama-perplexity reads a file)."""
    text = "\n\n".join(texts)
    enc = tok.encode(text, add_special_tokens=False)
    need = n_chunks * n_ctx
    if len(enc.ids) < need + 1:
        raise SystemExit(f"held-out text has {len(enc.ids)} tokens, fewer than {need + 1}")
    cut = enc.offsets[need][1]  # the text up to the end of the token after the last chunk
    sample = text[:cut]
    ids = tok.encode(sample, add_special_tokens=False).ids[:need]
    if ids != enc.ids[:need]:
        raise SystemExit("held-out sample: cutting the text changed its first tokens")
    return sample, ids


def perplexity(model, ids: list[int], n_ctx: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(mean nll, perplexity) as llama-perplexity computes them: non-overlapping chunks of n_ctx tokens, each
    scored on its second half (the logits at positions n_ctx/2 .. n_ctx-2 against the next token)."""
    import torch
    import torch.nn.functional as F

    x = torch.tensor(ids, dtype=torch.long).view(-1, n_ctx)
    first = n_ctx // 2
    nll = []
    with torch.no_grad():
        for i in range(0, x.shape[0], 8):
            logits, _, _ = model(x[i:i + 8])
            lp = F.log_softmax(logits[:, first:n_ctx - 1].double(), dim=-1)
            nll.append(-lp.gather(-1, x[i:i + 8, first + 1:, None]).squeeze(-1).reshape(-1))
    m = float(torch.cat(nll).mean())
    return m, math.exp(m)


# ---------------------------------------------------------------- export

def export_gguf(model, tok, cfg: dict, path: Path) -> None:  # type: ignore[no-untyped-def]
    """gguf-py writer: F16 matrices, F32 norms and router; GPT-2 byte-level BPE vocabulary with merges."""
    import numpy as np
    from gguf import GGUFWriter

    a = "qwen3moe"
    wr = GGUFWriter(str(path), a)
    wr.add_name("gguf-experts trained tiny qwen3moe")
    wr.add_file_type(1)
    wr.add_uint32(f"{a}.context_length", cfg["ctx"])
    wr.add_uint32(f"{a}.embedding_length", cfg["d_model"])
    wr.add_uint32(f"{a}.block_count", cfg["n_layer"])
    wr.add_uint32(f"{a}.feed_forward_length", cfg["n_ff_exp"])
    wr.add_uint32(f"{a}.expert_feed_forward_length", cfg["n_ff_exp"])
    wr.add_uint32(f"{a}.attention.head_count", cfg["n_head"])
    wr.add_uint32(f"{a}.attention.head_count_kv", cfg["n_head_kv"])
    wr.add_uint32(f"{a}.attention.key_length", cfg["head_dim"])
    wr.add_uint32(f"{a}.attention.value_length", cfg["head_dim"])
    wr.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg["rms_eps"])
    wr.add_float32(f"{a}.rope.freq_base", cfg["rope_base"])
    wr.add_uint32(f"{a}.expert_count", cfg["n_expert"])
    wr.add_uint32(f"{a}.expert_used_count", cfg["n_expert_used"])
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == cfg["n_vocab"] and all(vocab[t] == i for i, t in enumerate(tokens))
    eot = vocab[EOT]
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("gpt-2")  # llama-vocab.cpp: "gpt-2" -> GPT-2's regex, the ByteLevel one trained with
    wr.add_token_list(tokens)
    wr.add_token_types([3 if i == eot else 1 for i in range(len(tokens))])  # 3: control, 1: normal
    wr.add_token_merges(merges)
    wr.add_bos_token_id(eot)
    wr.add_eos_token_id(eot)
    wr.add_add_bos_token(False)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def f16(x):  # type: ignore[no-untyped-def]
        return np.ascontiguousarray(x.astype(np.float16))

    def f32(x):  # type: ignore[no-untyped-def]
        return np.ascontiguousarray(x.astype(np.float32))

    wr.add_tensor("token_embd.weight", f16(sd["embed.weight"]))
    wr.add_tensor("output_norm.weight", f32(sd["out_norm.weight"]))
    for i in range(cfg["n_layer"]):
        p, q = f"blk.{i}.", f"blocks.{i}."
        wr.add_tensor(p + "attn_norm.weight", f32(sd[q + "attn_norm.weight"]))
        wr.add_tensor(p + "attn_q.weight", f16(sd[q + "q.weight"]))
        wr.add_tensor(p + "attn_k.weight", f16(sd[q + "k.weight"]))
        wr.add_tensor(p + "attn_v.weight", f16(sd[q + "v.weight"]))
        wr.add_tensor(p + "attn_output.weight", f16(sd[q + "o.weight"]))
        wr.add_tensor(p + "attn_q_norm.weight", f32(sd[q + "q_norm.weight"]))
        wr.add_tensor(p + "attn_k_norm.weight", f32(sd[q + "k_norm.weight"]))
        wr.add_tensor(p + "ffn_norm.weight", f32(sd[q + "ffn_norm.weight"]))
        wr.add_tensor(p + "ffn_gate_inp.weight", f32(sd[q + "moe.router"]))
        wr.add_tensor(p + "ffn_gate_exps.weight", f16(sd[q + "moe.gate"]))
        wr.add_tensor(p + "ffn_up_exps.weight", f16(sd[q + "moe.up"]))
        wr.add_tensor(p + "ffn_down_exps.weight", f16(sd[q + "moe.down"]))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def round_to_export(model) -> None:  # type: ignore[no-untyped-def]
    """Round the tensors the GGUF stores as F16 to F16 in place, so the script's final perplexity is the one
    of the exported weights (norms and router stay F32, as in the file)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("moe.router"):
                continue
            p.copy_(p.half().float())


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:  # noqa: C901  (one linear training session)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "gguf_experts" / "demo" / "data")
    ap.add_argument("--manifest", type=Path, default=MANIFEST)
    ap.add_argument("--write-manifest", action="store_true", help="hash the corpus into --manifest and stop")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step, half of each kind")
    ap.add_argument("--ctx", type=int, default=256, help="training context (and llama-perplexity's -c)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux", type=float, default=0.01, help="load-balancing loss coefficient")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (fixed: results depend on it)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--ff", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--heldout-chunks", type=int, default=16, help="llama-perplexity chunks per kind")
    args = ap.parse_args(argv)
    if args.write_manifest:
        write_manifest(args.manifest)
        print(f"wrote {args.manifest}")
        return 0
    try:
        _sources, files = load_manifest(args.manifest)
        check_files(files)
    except CorpusError as e:
        print(f"train_tiny_moe: {e}", file=sys.stderr)
        return 2
    t_start = time.time()
    # MKL's conditional numerical reproducibility: without it two runs with the same seed and threads drifted apart
    # within 10 steps (MKL picks kernels by memory alignment); with it 30-step reruns are bit-identical. Set
    # before torch loads MKL.
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    train = {k: read_texts(files, k, "train") for k in KINDS}
    held = {k: read_texts(files, k, "heldout") for k in KINDS}
    tok = train_tokenizer([t for k in KINDS for t in train[k]], args.vocab)
    cfg = {"arch": "qwen3moe", "n_vocab": tok.get_vocab_size(), "d_model": args.d_model, "n_layer": args.layers,
           "n_expert": args.experts, "n_expert_used": args.top_k, "n_ff_exp": args.ff, "n_head": args.heads,
           "n_head_kv": args.kv_heads, "head_dim": args.d_model // args.heads, "rms_eps": 1e-6,
           "rope_base": 10000.0, "ctx": args.ctx, "tied_output": True}
    streams = {k: token_streams(tok, train[k]) for k in KINDS}
    samples = {k: heldout_sample(tok, held[k], args.ctx, args.heldout_chunks) for k in KINDS}
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warm = max(1, min(100, args.steps // 10))

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        t = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    rng = np.random.default_rng(args.seed)
    half = args.batch // 2
    curve: list[dict] = []
    evals: list[dict] = []
    print(f"params {n_params}, vocab {cfg['n_vocab']}, train tokens "
          + ", ".join(f"{k} {len(s)}" for k, s in streams.items()), flush=True)

    def evaluate(step: int) -> dict:
        model.eval()
        row = {"step": step}
        for k in KINDS:
            row[f"heldout_nll_{k}"] = round(perplexity(model, samples[k][1], args.ctx)[0], 5)
        model.train()
        evals.append(row)
        print(json.dumps(row), flush=True)
        return row

    t_loop = time.time()
    for step in range(args.steps):
        rows = []
        for k in KINDS:
            s = streams[k]
            starts = rng.integers(0, len(s) - args.ctx - 1, size=half)
            rows.append(np.stack([s[i:i + args.ctx + 1] for i in starts]))
        batch = torch.from_numpy(np.concatenate(rows))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits, aux, _ = model(batch[:, :-1])
        nll = F.cross_entropy(logits.reshape(-1, cfg["n_vocab"]), batch[:, 1:].reshape(-1), reduction="none")
        nll = nll.view(args.batch, args.ctx)
        loss = nll.mean() + args.aux * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            row = {"step": step, "lr": round(lr_at(step), 6), "loss": round(float(nll.detach().mean()), 5),
                   "aux": round(float(aux.detach()), 5), "seconds": round(time.time() - t_loop, 1)}
            for j, k in enumerate(KINDS):
                row[f"loss_{k}"] = round(float(nll.detach()[j * half:(j + 1) * half].mean()), 5)
            curve.append(row)
            if step % 50 == 0:
                print(json.dumps(row), flush=True)
        if step and step % args.eval_every == 0:
            evaluate(step)
    final_f32 = evaluate(args.steps)
    round_to_export(model)
    model.eval()
    final: dict[str, dict[str, float]] = {}
    for k in KINDS:
        m, ppl = perplexity(model, samples[k][1], args.ctx)
        final[k] = {"heldout_nll_f32": final_f32[f"heldout_nll_{k}"], "heldout_nll_exported": round(m, 5),
                    "heldout_ppl_exported": round(ppl, 4), "heldout_tokens_scored":
                    args.heldout_chunks * (args.ctx - 1 - args.ctx // 2)}
    args.out.mkdir(parents=True, exist_ok=True)
    gguf_path = args.out / f"{NAME}.gguf"
    export_gguf(model, tok, cfg, gguf_path)
    tok.save(str(args.out / f"{NAME}.tokenizer.json"))
    for k in KINDS:
        (args.out / f"heldout-{k}.txt").write_text(samples[k][0], encoding="utf-8")
    wall = time.time() - t_start
    log = {"command": "python scripts/train_tiny_moe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "torch": torch.__version__, "threads": args.threads, "seed": args.seed, "config": cfg,
           "mkl_cbwr": os.environ.get("MKL_CBWR"),
           "params": n_params, "steps": args.steps, "batch": args.batch, "lr": args.lr, "aux": args.aux,
           "train_tokens": {k: int(len(s)) for k, s in streams.items()}, "wall_seconds": round(wall, 1),
           "final": final, "evals": evals, "curve": curve,
           "gguf_sha256": sha256_file(gguf_path),
           "perplexity_check": f"llama-perplexity -m {NAME}.gguf -f heldout-<kind>.txt -c {args.ctx} "
                               f"-b {args.ctx} --chunks {args.heldout_chunks}"}
    (args.out / f"{NAME}.log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({"final": final, "wall_seconds": round(wall, 1), "gguf_sha256": log["gguf_sha256"]}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
