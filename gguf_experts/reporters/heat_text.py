"""The join summary for people: tokens, selections, bytes read per token versus dense (join-trace, demo)."""
from __future__ import annotations

from typing import Any

from .tabular import human_bytes


def summary_text(s: dict[str, Any]) -> str:
    lines = [
        f"model {s['model']}: {s['tokens']} tokens ({s['prefill_tokens']} prefill, {s['decode_tokens']} decode) "
        f"in {s['sequences']} sequences, {s['n_layer_moe']} MoE layers, {s['selections']} expert selections",
        f"expert bytes read: {human_bytes(s['bytes_read'])} = {human_bytes(s['bytes_per_token'])} per token; "
        f"dense equivalent (every expert per token) {human_bytes(s['dense_bytes_per_token'])} per token; "
        f"ratio {s['ratio']:.4f}",
    ]
    return "\n".join(lines) + "\n"
