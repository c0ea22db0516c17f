"""Synthetic routing traces for the analysis tests: uniform or Zipf-skewed top-k choices, with sequences
and prefill/decode phases, rows in capture order (prefill: a ubatch per layer; decode: one row per layer)."""
from __future__ import annotations

import numpy as np


def synth(n_layer: int = 3, n_expert: int = 16, k: int = 4, n_seq: int = 3, prompt: int = 5, gen: int = 20,
          skew: float = 0.0, seed: int = 0, layers: list[int] | None = None) -> dict[str, np.ndarray]:
    """Arrays seq, phase, pos, token, layer, experts [N, k], weights [N, k]. skew > 0 favours low ids
    (and a per-layer permutation) like a Zipf law; rows of one token are distinct experts."""
    rng = np.random.default_rng(seed)
    layers = list(range(n_layer)) if layers is None else layers
    perm = np.stack([rng.permutation(n_expert) for _ in layers])
    cols = {c: [] for c in ("seq", "phase", "pos", "token", "layer", "experts", "weights")}

    def pick(n: int, li: int) -> np.ndarray:
        score = rng.random((n, n_expert)) ** (1.0 / (1.0 + skew * np.arange(n_expert)[::-1] / n_expert * 8))
        top = np.argsort(-score, axis=1)[:, :k]
        return perm[li][top]

    for s in range(n_seq):
        toks = rng.integers(0, 1000, prompt + gen)
        for li, l in enumerate(layers):  # prefill: one record of `prompt` tokens per layer
            cols["seq"].append(np.full(prompt, s)); cols["phase"].append(np.zeros(prompt))
            cols["pos"].append(np.arange(prompt)); cols["token"].append(toks[:prompt])
            cols["layer"].append(np.full(prompt, l)); cols["experts"].append(pick(prompt, li))
        for t in range(prompt, prompt + gen):
            for li, l in enumerate(layers):
                cols["seq"].append([s]); cols["phase"].append([1]); cols["pos"].append([t])
                cols["token"].append([toks[t]]); cols["layer"].append([l]); cols["experts"].append(pick(1, li))
    out = {c: np.concatenate(v) for c, v in cols.items() if c not in ("experts", "weights")}
    out["experts"] = np.concatenate(cols["experts"]).astype(np.int32)
    w = rng.random(out["experts"].shape).astype(np.float32)
    out["weights"] = w
    for c, dt in (("seq", np.int32), ("phase", np.uint8), ("pos", np.int32), ("token", np.int32),
                  ("layer", np.int32)):
        out[c] = out[c].astype(dt)
    return out


def write_synth_trace(path, model, d: dict) -> None:  # type: ignore[no-untyped-def]
    """Write synth()'s rows as a trace of `model`, one record per row (fine for a small trace)."""
    from gguf_experts.gguf.reader import open_model
    from gguf_experts.gguf.fingerprint import fingerprint
    from gguf_experts.trace.writer import TraceWriter

    with TraceWriter(path, fingerprint(open_model(model))) as w:
        for i in range(len(d["seq"])):
            s = slice(i, i + 1)
            w.write(int(d["seq"][i]), int(d["phase"][i]), int(d["layer"][i]), d["pos"][s], d["token"][s],
                    d["experts"][s], d["weights"][s])
