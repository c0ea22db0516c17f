"""Pin lists as files other tools read: `layer,expert,count` CSV and fitz-tec's EXPERT_CACHE_PIN_LIST v1
(the text its build_pin_list writes and its patched llama.cpp reads: comment header, `n_layer N`,
`n_expert M`, then `layer <il>: <ids, most requested first>` for every layer, empty where nothing is pinned)."""
from __future__ import annotations

import numpy as np
import pandas as pd


def pin_order(pins: np.ndarray, counts: np.ndarray) -> list[list[int]]:
    """Per layer, the pinned expert ids by descending count, ties by lower id."""
    out = []
    for p, c in zip(pins, counts, strict=True):
        ids = np.flatnonzero(p)
        out.append(ids[np.lexsort((ids, -c[ids]))].tolist())
    return out


def pins_frame(pins: np.ndarray, counts: np.ndarray) -> pd.DataFrame:
    """layer,expert,count rows (count: training requests), layer by layer, most requested first."""
    rows = [(layer, e, int(counts[layer, e])) for layer, ids in enumerate(pin_order(pins, counts)) for e in ids]
    return pd.DataFrame(rows, columns=["layer", "expert", "count"])


def fitz_pin_list(pins: np.ndarray, counts: np.ndarray, source: str, top_k: int) -> str:
    """EXPERT_CACHE_PIN_LIST v1 text, header as fitz-tec 0.1.1's emit_pin_list writes it."""
    n_layer, n_expert = pins.shape
    lines = ["# EXPERT_CACHE_PIN_LIST v1", f"# source trace: {source}", f"# top_k: {top_k}",
             "# format: 'layer <il>: <eid_most_freq> <eid_next> ...' (descending by activation count)",
             f"n_layer {n_layer}", f"n_expert {n_expert}"]
    lines += [f"layer {il}: " + " ".join(str(e) for e in ids) for il, ids in enumerate(pin_order(pins, counts))]
    return "\n".join(lines) + "\n"
