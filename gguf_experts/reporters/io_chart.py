"""The report's "Measured I/O" section: disk bytes read and major faults over time (a static inline SVG in the
report's style: no JS needed), and the numbers per phase.

Time is the ubatches' cumulative compute time (idle gaps between requests left out), binned to at most
``MAX_BINS`` points so that a day-long trace draws as small as a short one.
"""
from __future__ import annotations

import html
from typing import Any

import numpy as np

from ..analysis.iostats import ABSENT, phase_frame, series, start_line
from ..trace.format import IoTable

MAX_BINS = 240
W, H = 620, 150
M_L, M_R, M_T, M_B = 56, 12, 10, 30


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _nice(v: float) -> str:
    if v >= 1e9:
        return f"{v / 1e9:.1f}G"
    if v >= 1e6:
        return f"{v / 1e6:.1f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"


def binned(io: IoTable, max_bins: int = MAX_BINS) -> dict[str, np.ndarray]:
    """Per time bin: end time (s), bytes read per second and major faults per second of compute, and the share
    of the bin's tokens that were prefill."""
    s = series(io)
    t = s["t_s"]
    total = float(t[-1]) if len(t) else 0.0
    nb = max(1, min(max_bins, len(t)))
    edges = np.linspace(0.0, total, nb + 1) if total > 0 else np.arange(nb + 1, dtype=np.float64)
    x = t if total > 0 else np.arange(1, len(t) + 1, dtype=np.float64)
    b = np.clip(np.searchsorted(edges, x, side="left") - 1, 0, nb - 1)
    width = np.diff(edges)
    rb = np.bincount(b, weights=np.nan_to_num(s["read_bytes"]), minlength=nb)
    mf = np.bincount(b, weights=np.nan_to_num(s["majflt"]), minlength=nb)
    tok = np.bincount(b, weights=s["n_tokens"], minlength=nb)
    pre = np.bincount(b, weights=s["n_tokens"] * (s["phase"] == 0), minlength=nb)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"t": edges[1:], "rb_s": rb / width, "mf_s": mf / width,
                "prefill": np.where(tok > 0, pre / tok, 0.0)}


def _chart(t: np.ndarray, y: np.ndarray, prefill: np.ndarray, label: str, colour: str, xlabel: str) -> str:
    ymax = float(np.nanmax(y)) if len(y) and np.isfinite(y).any() and np.nanmax(y) > 0 else 1.0
    xmax = float(t[-1]) if len(t) and t[-1] > 0 else 1.0

    def X(v: float) -> float:
        return M_L + (W - M_L - M_R) * v / xmax

    def Y(v: float) -> float:
        return H - M_B - (H - M_T - M_B) * v / ymax

    parts = [f'<svg width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{_esc(label)}">']
    lo = 0.0
    for i, hi in enumerate(t):  # prefill time shaded
        if prefill[i] > 0.5:
            parts.append(f'<rect x="{X(lo):.1f}" y="{M_T}" width="{max(0.5, X(hi) - X(lo)):.1f}" '
                         f'height="{H - M_T - M_B}" fill="#f3efe0"/>')
        lo = float(hi)
    for i in range(5):
        v = ymax * i / 4
        parts.append(f'<line x1="{M_L}" x2="{W - M_R}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" class="grid"/>'
                     f'<text x="{M_L - 6}" y="{Y(v) + 4:.1f}" text-anchor="end" class="axis">{_nice(v)}</text>')
    for i in range(5):
        v = xmax * i / 4
        parts.append(f'<text x="{X(v):.1f}" y="{H - M_B + 14}" text-anchor="middle" class="axis">{v:.3g}</text>')
    parts.append(f'<text x="{(W + M_L) / 2:.0f}" y="{H - 4}" text-anchor="middle" class="axis">{_esc(xlabel)}</text>')
    pts = "".join(("M" if i == 0 else "L") + f"{X(float(a)):.1f},{Y(float(b)):.1f}"
                  for i, (a, b) in enumerate(zip(np.concatenate([[0.0], t]), np.concatenate([[y[0]], y]))))
    parts.append(f'<path d="{pts}" fill="none" stroke="{colour}" stroke-width="1.8">'
                 f'<title>{_esc(label)}</title></path>')
    parts.append(f'<text x="{M_L + 6}" y="{M_T + 12}" class="axis">{_esc(label)}</text></svg>')
    return "".join(parts)


def io_section(io: IoTable | None, meta: dict[str, Any], table_html: Any) -> str:
    """The section's body for one trace: a note when the trace has no measurements."""
    start = start_line(meta)
    if io is None or len(io) == 0:
        return f'<p class="note">{_esc(ABSENT)}</p>' + (f'<p class="note">{_esc(start)}</p>' if start else "")
    b = binned(io)
    xlabel = "compute time (s, ubatches only; shaded: prefill)"
    rb = _chart(b["t"], b["rb_s"], b["prefill"], "disk bytes read per second", "#d62728", xlabel)
    mf = _chart(b["t"], b["mf_s"], b["prefill"], "major page faults per second", "#1f77b4", xlabel)
    charts = f'<div class="twocol"><div class="panel io-chart">{rb}</div><div class="panel io-chart">{mf}</div></div>'

    pf = phase_frame(io)
    shown = pf.assign(read_per_token=[_bytes(v) for v in pf["read_bytes_per_token"]],
                      read=[_bytes(v) for v in pf["read_bytes"]])[
        ["phase", "ubatches", "tokens", "read", "read_per_token", "majflt", "majflt_per_token", "wall_s",
         "tokens_per_s"]]
    return ((f'<p class="note">{_esc(start)}</p>' if start else "") + charts
            + "<p><b>Per phase</b></p>" + table_html(shown.round(3), left=("phase",)))


def _bytes(v: float) -> str:
    from .tabular import human_bytes

    return "unknown" if not np.isfinite(v) else human_bytes(float(v))
