"""The HTML report in a real headless Chromium (Debian's chromium, fresh profile): it renders the heatmap, the
strip, the curves and the diff with no console error and no network request, zooms, and screenshots.
A deliberately bad page proves the checks can fail."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from gguf_experts.report import build_report, write_report
from chromium_cdp import render_page

from gguf_experts.reporters.screenshot import find_chromium

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="chromium is not installed (Debian: apt-get install chromium)")

PROBE = """(() => {
  const q = id => document.getElementById(id);
  const px = (cv, x, y) => Array.from(cv.getContext('2d').getImageData(x, y, 1, 1).data);
  const hm = q('heatmap'), st = q('strip'), r = hm.getBoundingClientRect();
  const before = {items: +st.dataset.items, painted: +st.dataset.painted};
  const hover = (el, x, y) => { el.dispatchEvent(new MouseEvent('mousemove', {clientX: x, clientY: y, bubbles: true}));
                                return q('tip').style.display === 'block' ? q('tip').textContent : ''; };
  const cw = (r.width - 46) / 8, ch = (r.height - 20) / 2;
  const heatTip = hover(hm, r.left + 46 + 5.5 * cw, r.top + 16 + 0.5 * ch);
  const sr = st.getBoundingClientRect(), stripTip = hover(st, sr.left + sr.width * 0.6, sr.top + 20);
  const t = q('tip').getBoundingClientRect();
  const tipFits = q('tip').scrollWidth <= q('tip').clientWidth && t.right <= innerWidth && t.bottom <= innerHeight;
  const shown = () => Array.from(document.querySelectorAll('.view[data-view]')).filter(b => b.style.display !== 'none')
    .map(b => b.dataset.view + ':' + b.querySelector('.vtag').textContent);
  const cards = () => Array.from(document.querySelectorAll('.view[data-view]')).filter(b => b.style.display !== 'none')
    .map(b => b.querySelector('.cards') ? b.querySelector('.cards').textContent : '').join('');
  const views = {before: shown(), heads: Array.from(document.querySelectorAll('.vname')).map(x => x.textContent),
                 cards: cards()};
  const vs = q('view');  // only a report of two traces has the switch
  if (vs) {
    vs.value = '1'; vs.dispatchEvent(new Event('change'));
    views.after = shown(); views.headsAfter = Array.from(document.querySelectorAll('.vname')).map(x => x.textContent);
    views.cardsAfter = cards(); views.tipAfter = hover(hm, r.left + 46 + 5.5 * cw, r.top + 16 + 0.5 * ch);
    views.body = document.body.dataset.shown;
    vs.value = '0'; vs.dispatchEvent(new Event('change'));
  }
  const sel = q('strip-zoom'); sel.value = sel.options[sel.options.length - 1].value;
  sel.dispatchEvent(new Event('change'));
  return {cells: +hm.dataset.cells, nonzero: +hm.dataset.nonzero, width: r.width, height: r.height,
          strip: before, zoomed: {items: +st.dataset.items, painted: +st.dataset.painted, layer: sel.value},
          stripPixel: px(st, 5, 5), curves: +(q('curves') || {dataset: {}}).dataset.series || 0,
          curvePaths: document.querySelectorAll('#curves path').length,
          diffCells: q('diffmap') ? +q('diffmap').dataset.cells : 0, heatTip: heatTip, stripTip: stripTip,
          tipFits: tipFits, views: views};
})()"""


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def report_html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_report import (  # the same synthetic model and traces
        make_trace,
        tiny_model,
    )

    d = tmp_path_factory.mktemp("browser")
    m = tiny_model(d / "m.gguf")
    a, b = make_trace(d / "a.bin", m, 1), make_trace(d / "b.bin", m, 2, skew=0.2)
    out = d / "report.html"
    write_report(out, build_report([a, b], m, labels=("code", "chat")))
    return out


def test_report_renders_clean(report_html: Path) -> None:
    res = render_page(report_html, probe=PROBE, width=1280, height=900)
    assert res.rendered, "report.js did not finish (body[data-rendered] not set)"
    assert res.errors == [], res.errors
    assert res.foreign_requests == [], res.foreign_requests
    assert res.requests == [res.url]
    p = res.probe
    assert p["cells"] == 2 * 8 and p["nonzero"] == 2 * 8 - 1 and p["width"] > 100 and p["height"] > 20
    assert p["strip"]["items"] == 6 * 8 + 7 and p["strip"]["painted"] > 1000  # 48 slices + 7 whole tensors
    assert 0 < p["zoomed"]["items"] < p["strip"]["items"] and p["zoomed"]["layer"] == "2"
    assert p["stripPixel"][3] == 255
    # two traces: every number is labelled with the trace it belongs to, and the switch shows the other one
    assert p["heatTip"].startswith("[code]\nlayer 1  expert 5") and "blk.1.ffn_down_exps.weight[5]" in p["heatTip"]
    assert re.search(r"m\.gguf  offset \d+  size \d+ ", p["heatTip"]) and "activations" in p["heatTip"]
    assert not re.search(r"\b0x[0-9a-f]+", p["heatTip"] + p["stripTip"])  # offsets in decimal, as the CLI prints
    assert "blk." in p["stripTip"] and "m.gguf  offset " in p["stripTip"]
    assert p["tipFits"], "the tooltip's text overflows its box"
    v = p["views"]
    assert v["before"] == ["0:code"] * len(v["before"]) and len(v["before"]) >= 5  # cards, tables, summary
    assert v["after"] == ["1:chat"] * len(v["before"]) and v["body"] == "1"
    assert set(v["heads"]) == {" \u2014 code"} and set(v["headsAfter"]) == {" \u2014 chat"}
    assert v["cards"] != v["cardsAfter"] and v["tipAfter"].startswith("[chat]\nlayer 1  expert 5")
    assert p["curves"] >= 4 and p["curvePaths"] >= 4 and p["diffCells"] == 2 * 8
    w, h = png_size(res.png)
    assert w == 1280 and h > 1500  # full page, not just the viewport
    (report_html.parent / "browser.png").write_bytes(res.png)  # for a person to look at


def test_checks_catch_a_bad_page(tmp_path: Path) -> None:
    """An external image and a console error must be reported: the assertions above can fail."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png">'
                   '<script>console.error("boom"); document.body.dataset.rendered = "ok";</script></body></html>')
    res = render_page(bad, screenshot=False, timeout=20)
    assert res.rendered
    assert "http://127.0.0.1:9/x.png" in res.foreign_requests
    assert any("boom" in e for e in res.errors)


def test_report_cli_screenshot(report_html: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gguf_experts.cli import main

    d = report_html.parent
    shot = tmp_path / "shot.png"
    assert main(["report", str(d / "a.bin"), "-m", str(d / "m.gguf"), "-o", str(tmp_path / "r.html"),
                 "--screenshot", str(shot), "--screenshot-size", "1000x700", "--no-opt"]) == 0
    assert png_size(shot.read_bytes()) == (1000, 700)
    mpimg = pytest.importorskip("matplotlib.image")
    img = mpimg.imread(str(shot))[..., :3]
    colourful = (img.max(axis=2) - img.min(axis=2)) > 0.3  # the heatmap's viridis cells, not black-on-white text
    assert colourful.sum() > 2000, "the screenshot shows no rendered heatmap (the page was not drawn as HTML)"
    assert main(["report", str(d / "a.bin"), "-m", str(d / "m.gguf"), "-o", str(tmp_path / "r.html"),
                 "--screenshot", str(shot), "--screenshot-size", "big"]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
