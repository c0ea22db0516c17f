"""Static layer x expert heatmap of activation share as a PNG (matplotlib, Agg backend: no display needed).

Same colour scale as the HTML report: share relative to uniform (1/E) on a log scale from 1/8x to 8x,
viridis, grey for never-used experts, so a PNG and a report of one trace read alike. Returns where the cells
landed in the image (``PngInfo``) so callers and tests can find a cell's pixels without guessing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..atomic import atomic_write
from ..errors import GGUFExpertsError, InputError
from ..heat import HeatResult

NEVER_USED = "#d9d9d9"
DPI = 100


class PlotUnavailableError(GGUFExpertsError):
    """matplotlib (the [plot] extra) is not installed."""


@dataclass(frozen=True)
class PngInfo:
    """Image size and the heatmap's cell area in pixels (origin top-left, x right, y down)."""

    width: int
    height: int
    left: float
    top: float
    right: float
    bottom: float
    n_rows: int
    n_cols: int

    def cell_center(self, row: int, col: int) -> tuple[int, int]:
        """(x, y) pixel at the centre of heatmap cell (row, col)."""
        cw = (self.right - self.left) / self.n_cols
        ch = (self.bottom - self.top) / self.n_rows
        return int(self.left + (col + 0.5) * cw), int(self.top + (row + 0.5) * ch)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailableError("--png needs matplotlib, which is not installed; install it with "
                                   "pip install 'gguf-experts[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def heat_matrix(heat: HeatResult) -> tuple[np.ndarray, np.ndarray]:
    """(layers, share [layers, experts]) from the experts frame."""
    ex = heat.experts
    if ex.empty:
        raise InputError("the heat result has no expert rows: the model has no MoE layers to plot")
    layers = np.unique(ex["layer"].to_numpy(dtype=np.int64))
    share = np.zeros((len(layers), int(ex["expert"].max()) + 1))
    share[np.searchsorted(layers, ex["layer"].to_numpy(dtype=np.int64)), ex["expert"].to_numpy(dtype=np.int64)] = \
        ex["share"].to_numpy(dtype=np.float64)
    return layers, share


def write_heatmap_png(path: str, layers: np.ndarray, share: np.ndarray, title: str = "") -> PngInfo:
    """Draw share [rows, experts] (rows named by ``layers``) and write the PNG atomically."""
    return write_heatmaps_png(path, [(title, layers, share)])[0]


def write_heatmaps_png(path: str, panels: list[tuple[str, np.ndarray, np.ndarray]]) -> list[PngInfo]:
    """One heatmap per (title, layers, share [rows, experts]), stacked top to bottom on one colour scale,
    written atomically; returns where each panel's cells landed."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    n_rows, n_cols = panels[0][2].shape
    left_in, right_in, top_in, bottom_in, gap_in = 0.8, 1.4, 0.5, 0.6, 0.9
    plot_w = max(4.0, min(0.4, max(0.02, 14.0 / n_cols)) * n_cols)
    plot_h = max(2.0, min(0.4, max(0.04, 9.0 / n_rows)) * n_rows)
    w_in = left_in + right_in + plot_w
    h_in = top_in + bottom_in + len(panels) * plot_h + (len(panels) - 1) * gap_in
    fig = plt.figure(figsize=(w_in, h_in), dpi=DPI)
    try:
        cmap = plt.get_cmap("viridis").with_extremes(bad=NEVER_USED)
        axes = []
        for j, (title, layers, share) in enumerate(panels):
            y0 = bottom_in + (len(panels) - 1 - j) * (plot_h + gap_in)
            ax = fig.add_axes((left_in / w_in, y0 / h_in, plot_w / w_in, plot_h / h_in))
            cax = fig.add_axes(((w_in - right_in + 0.15) / w_in, y0 / h_in, 0.15 / w_in, plot_h / h_in))
            rel = np.ma.masked_less_equal(share * share.shape[1], 0.0)
            im = ax.imshow(rel, aspect="auto", interpolation="nearest", cmap=cmap,
                           norm=LogNorm(vmin=1 / 8, vmax=8, clip=True))
            ax.set_xlabel("expert")
            ax.set_ylabel("layer")
            step = max(1, share.shape[0] // 24)
            ax.set_yticks(np.arange(0, share.shape[0], step))
            ax.set_yticklabels([str(int(x)) for x in layers[::step]])
            if title:
                ax.set_title(title, fontsize=10)
            cb = fig.colorbar(im, cax=cax)
            ticks = [1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8]
            cb.set_ticks(ticks, labels=["1/8x", "1/4x", "1/2x", "1x", "2x", "4x", "8x"])
            cb.minorticks_off()
            cb.ax.tick_params(labelsize=8)
            cb.set_label("share vs uniform; grey: never used", fontsize=8)
            axes.append((ax, share.shape))
        fig.canvas.draw()
        width, height = fig.canvas.get_width_height()
        infos = []
        for ax, (r, c) in axes:
            bb = ax.get_window_extent()
            infos.append(PngInfo(width=int(width), height=int(height), left=float(bb.x0), top=float(height - bb.y1),
                                 right=float(bb.x1), bottom=float(height - bb.y0), n_rows=r, n_cols=c))
        with atomic_write(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return infos


def _title(heat: HeatResult, label: str | None = None) -> str:
    t = f"{heat.summary.get('model', '')}: {heat.summary.get('tokens', 0)} tokens"
    return f"{label} ({t})" if label else t


def write_heat_png(path: str, heat: HeatResult, title: str | None = None) -> PngInfo:
    """The heatmap PNG of a join result."""
    layers, share = heat_matrix(heat)
    return write_heatmap_png(path, layers, share, title if title is not None else _title(heat))


def write_heat_pngs(path: str, views: list[Any]) -> list[PngInfo]:
    """The heatmaps of every trace of a report (objects with .label and .heat), one panel each, titled with
    the trace's label: two traces are drawn both, one above the other, never one of them alone."""
    panels = []
    for v in views:
        layers, share = heat_matrix(v.heat)
        panels.append((_title(v.heat, v.label if len(views) > 1 else None), layers, share))
    return write_heatmaps_png(path, panels)
