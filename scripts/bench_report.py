"""Benchmark the HTML report on a large synthetic model (default 48 layers x 512 experts x 3 tensors = 73,728
expert slices) against peers measured in the same run:
  - size: the report's per-tensor encoding vs the naive per-slice JSON records of the same slices;
  - time: render_html vs join.heat (the step that builds the frames the report draws);
  - browser: time until report.js has drawn everything in headless Chromium (if installed).

    /work/venv/bin/python scripts/bench_report.py [--layers 48 --experts 512]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from gguf_experts.heat import Counts, heat
from gguf_experts.reporters.html import ReportInput, render_html


def slices_table(n_layer: int, n_expert: int, size: int = 1 << 20) -> pd.DataFrame:
    comps = ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
    lay = np.repeat(np.arange(n_layer), 3 * n_expert)
    comp = np.tile(np.repeat(np.arange(3), n_expert), n_layer)
    exp = np.tile(np.arange(n_expert), 3 * n_layer)
    t = lay * 3 + comp
    base = np.array([f"blk.{i // 3}.{comps[i % 3]}.weight" for i in range(3 * n_layer)])[t]
    return pd.DataFrame({"name": [f"{b}[{e}]" for b, e in zip(base, exp)], "base_name": base, "expert_id": exp,
                         "layer": lay, "component": np.array(comps)[comp], "file": "big.gguf",
                         "offset": 4096 + (t * n_expert + exp) * size, "size": size})


def best(fn, repeat: int = 3) -> float:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=512)
    a = ap.parse_args()
    sl = slices_table(a.layers, a.experts)
    acts = np.random.default_rng(0).poisson(3.0, (a.layers, a.experts)).astype(np.int64)
    counts = Counts(acts, np.full((a.layers, 2), 1000, np.int64), sequences=1)
    res = heat(counts, sl, "big", ["big.gguf"])
    inp = ReportInput(res)
    html = render_html(inp)
    naive = json.dumps(res.slices[["name", "offset", "size", "activations", "bytes_read"]].to_dict("records"))
    t_html = best(lambda: render_html(inp))
    t_heat = best(lambda: heat(counts, sl, "big", ["big.gguf"]))
    print(f"{len(sl):,} expert slices ({a.layers} layers x {a.experts} experts x 3 tensors)")
    print(f"html report: {len(html.encode()) / 1e3:,.0f} kB; naive per-slice JSON alone: "
          f"{len(naive.encode()) / 1e3:,.0f} kB; ratio {len(naive) / len(html):.1f}x smaller")
    print(f"render_html: {t_html * 1e3:.0f} ms; join.heat (peer): {t_heat * 1e3:.0f} ms; "
          f"ratio {t_html / t_heat:.2f}")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the DevTools client is a test helper
    from chromium_cdp import render_page

    from gguf_experts.reporters.screenshot import find_chromium
    if find_chromium() is None:
        print("chromium not installed: browser timing skipped")
        return
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "big.html"
        p.write_text(html)
        blank = Path(d) / "blank.html"
        blank.write_text("<!DOCTYPE html><body><script>document.body.dataset.rendered='ok'</script></body>")
        t_blank = best(lambda: render_page(blank, screenshot=False), 2)
        t_big = best(lambda: render_page(p, screenshot=False), 2)
        r = render_page(p, screenshot=False, probe="performance.now()")
        print(f"chromium start+load+draw: {t_big:.2f} s vs an empty page (peer) {t_blank:.2f} s: "
              f"+{t_big - t_blank:.2f} s for the report; errors {r.errors or 'none'}")


if __name__ == "__main__":
    main()
