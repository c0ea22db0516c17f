#!/usr/bin/env python
"""Compare two detail CSVs (``gguf-experts convert t.bin t.csv --detail``) of the same capture run on
two backends (CPU, -ngl 0, and GPU, -ngl 99): are the recorded experts identical, and how close are the
gate weights?

Why not a plain diff: on another backend the arithmetic differs in the last bits, so greedy decoding may
pick another token where two logits nearly tie, and from there on the sequences are different texts.
Rows are matched on (seq, phase, pos, layer) and compared only up to the first position whose token
differs in that sequence (reported). A mismatch inside that prefix is either a capture bug or a near-tie
of two gate probabilities: the weight gap at the first differing slot is printed to tell them apart.

    python scripts/gpu_compare.py cpu.csv gpu.csv [--label NAME]
Exit code 0 when every compared row has identical expert ids in identical order, 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

KEYS = ["seq", "phase", "pos", "layer"]


def compare(a: pd.DataFrame, b: pd.DataFrame, label: str) -> bool:
    ecols = [c for c in a.columns if c.startswith("expert_")]
    wcols = [c for c in a.columns if c.startswith("weight_")]
    m = a.merge(b, on=KEYS, how="outer", suffixes=("_a", "_b"), indicator=True)
    only = m["_merge"] != "both"
    m = m[~only]
    # first position per sequence where the two runs saw different tokens (greedy decode diverged)
    diff_tok = m.loc[m["token_a"] != m["token_b"], ["seq", "pos"]].groupby("seq")["pos"].min()
    first = m["seq"].map(diff_tok).fillna(np.inf)
    same_text = m["pos"] < first
    c = m[same_text]
    ea, eb = c[[f"{e}_a" for e in ecols]].to_numpy(), c[[f"{e}_b" for e in ecols]].to_numpy()
    ident = (ea == eb).all(axis=1)
    same_set = (np.sort(ea, axis=1) == np.sort(eb, axis=1)).all(axis=1)
    print(f"{label}: {len(a)} rows vs {len(b)} rows; {int(only.sum())} rows in one run only "
          f"(after a token divergence the runs may end differently)")
    print(f"  token streams: {len(diff_tok)} of {m['seq'].nunique()} sequences diverge "
          + (f"(first differing positions: {dict(diff_tok.astype(int))})" if len(diff_tok) else "(identical tokens)"))
    print(f"  rows compared (same text so far): {len(c)}; identical expert ids in order: {int(ident.sum())}; "
          f"same set, other order: {int((same_set & ~ident).sum())}; different set: {int((~same_set).sum())}")
    if wcols:
        wa, wb = c[[f"{w}_a" for w in wcols]].to_numpy(float), c[[f"{w}_b" for w in wcols]].to_numpy(float)
        if ident.any():
            d = np.abs(wa[ident] - wb[ident])
            print(f"  gate weights on identical rows: max |diff| {d.max():.3g}, mean |diff| {d.mean():.3g}")
        if (~ident).any():  # the gap between the weights around the first differing slot: small = near-tie
            bad = np.flatnonzero(~ident)
            slot = np.argmax(ea[bad] != eb[bad], axis=1)
            lo = np.maximum(slot - 1, 0)
            gap_a = np.abs(wa[bad, lo] - wa[bad, slot])
            print(f"  mismatching rows: weight gap at the first differing slot (CPU run): max {gap_a.max():.3g}, "
                  f"median {np.median(gap_a):.3g} (near-ties if tiny)")
            print(c.iloc[bad[:5]][KEYS + [f"{e}_a" for e in ecols] + [f"{e}_b" for e in ecols]].to_string(index=False))
    return bool(ident.all()) and len(c) > 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="detail CSV of the first run (CPU)")
    ap.add_argument("b", help="detail CSV of the second run (GPU)")
    ap.add_argument("--label", default="compare")
    args = ap.parse_args(argv)
    ok = compare(pd.read_csv(args.a), pd.read_csv(args.b), args.label)
    print(f"  => {'IDENTICAL' if ok else 'DIFFERENT'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
