#!/usr/bin/env python
"""The table of scripts/gpu_big.sh: tokens/s and ratios against plain runs of the same call.

    python scripts/gpu_big_table.py bench.jsonl llama-bench.jsonl
bench.jsonl: lines of scripts/bench_gpu_big.py --json; llama-bench.jsonl: {"variant", "ncmoe", "r": llama-bench's
jsonl record}. Python-harness variants are compared with plain in the same process; C-recorder runs of the
harness with the plain process of the same --n-cpu-moe; llama-bench runs with plain llama-bench.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def lines(path: str) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for ln in p.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    return out


def main(argv: list[str]) -> int:
    harness = lines(argv[0]) if argv else []
    lbench = lines(argv[1]) if len(argv) > 1 else []
    print("| harness | --n-cpu-moe | variant | prefill tok/s | ratio | decode tok/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    plain_proc: dict[int, dict] = {}
    for rec in harness:
        if rec["label"] == "plain-process":
            plain_proc[rec["n_cpu_moe"]] = rec["results"]["plain"]
    for rec in harness:
        nc = rec["n_cpu_moe"]
        res = rec["results"]
        for var, r in res.items():
            if rec["label"].startswith("python-harness"):  # "python-harness-noslots": GGUF_EXPERTS_SLOTS=0
                base, name = res.get("plain"), var + rec["label"][len("python-harness"):]
            elif rec["label"] == "plain-process":
                continue
            else:
                base, name = plain_proc.get(nc), rec["label"]
            if not base:
                continue
            print(f"| TracedLlama | {nc} | {name} | {r['prefill']:.0f} | {r['prefill'] / base['prefill']:.3f} | "
                  f"{r['decode']:.1f} | {r['decode'] / base['decode']:.3f} |")
    if lbench:
        print()
        print("| harness | --n-cpu-moe | variant | pp512 tok/s | ratio | tg64 tok/s | ratio |")
        print("|---|---|---|---|---|---|---|")
        rows: dict[tuple[int, str], dict[str, float]] = {}
        for rec in lbench:
            r = rec["r"]
            test = "pp" if r.get("n_gen", 0) == 0 else "tg"
            rows.setdefault((rec["ncmoe"], rec["variant"]), {})[test] = float(r["avg_ts"])
        for (nc, var), v in rows.items():
            base = rows.get((nc, "plain"), {})
            pp, tg = v.get("pp", 0.0), v.get("tg", 0.0)
            rp = pp / base["pp"] if base.get("pp") else float("nan")
            rt = tg / base["tg"] if base.get("tg") else float("nan")
            print(f"| llama-bench | {nc} | {var} | {pp:.0f} | {rp:.3f} | {tg:.1f} | {rt:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
