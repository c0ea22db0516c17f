"use strict";
// gguf-experts report: draws the heatmaps (canvas), the file-offset strip (canvas) and the miss-ratio curves
// (SVG) from the JSON blob in #report-data. No network, no dependencies.
(function () {
const D = JSON.parse(document.getElementById("report-data").textContent);
const tip = document.getElementById("tip");
const DPR = Math.max(1, Math.min(2, window.devicePixelRatio || 1));
const GREY = [217, 217, 217], DENSE = [157, 180, 208];
const VIRIDIS = [[68,1,84],[71,45,123],[59,82,139],[44,114,142],[33,145,140],[40,174,128],[94,201,98],[173,220,48],[253,231,37]];
function lut(stops, t) {
  t = Math.max(0, Math.min(1, t)); const x = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
  return stops[i].map((c, j) => Math.round(c + (stops[i + 1][j] - c) * f));
}
const rgb = c => `rgb(${c[0]},${c[1]},${c[2]})`;
function fmtBytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return i ? n.toFixed(2) + " " + u[i] : Math.round(n) + " B";
}
// Offsets are decimal bytes from the start of the file, as gguf-experts dump prints them.
const span = (a, n) => `offset ${a}  size ${n} (${fmtBytes(n)})`;
const views = D.views || [];
let cur = 0;
const vlabel = () => views.length > 1 ? `[${views[cur].label}]\n` : "";
const pct = x => (100 * x).toFixed(2) + "%";
function showTip(ev, text) {
  tip.textContent = text; tip.style.display = "block";
  const w = tip.offsetWidth, h = tip.offsetHeight;
  tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - w - 4) + "px";
  tip.style.top = Math.min(ev.clientY + 14, window.innerHeight - h - 4) + "px";
}
const hideTip = () => { tip.style.display = "none"; };
function sizeCanvas(cv, w, h) {
  cv.style.width = w + "px"; cv.style.height = h + "px"; cv.width = Math.round(w * DPR); cv.height = Math.round(h * DPR);
  const g = cv.getContext("2d"); g.setTransform(DPR, 0, 0, DPR, 0, 0); return g;
}
// Share relative to uniform (1/E) on a log2 scale from 1/8x to 8x; 0 = never used (grey).
function shareColor(share) {
  if (!(share > 0)) return GREY;
  return lut(VIRIDIS, (Math.log2(share * D.E) + 3) / 6);
}
function divColor(d, m) {
  const t = Math.max(-1, Math.min(1, d / (m || 1)));
  const a = Math.abs(t), end = t > 0 ? [178, 24, 43] : [33, 102, 172];
  return [0, 1, 2].map(j => Math.round(247 + (end[j] - 247) * a));
}
// Expert tensors of each heatmap row: their slices are what one activation of (layer, expert) reads.
const T = D.tensors, nT = T.name.length;
const rowTensors = D.rows.map(() => []);
for (let i = 0; i < nT; i++) if (T.row[i] >= 0) rowTensors[T.row[i]].push(i);
const sliceStart = (i, k) => T.off[i] + k * T.slice[i];  // k: slot (position in the tensor)
// a pruned model keeps the original expert ids: slot k of tensor i is expert T.ids[i][k] (absent: k)
const eid = (i, k) => T.ids && T.ids[i] ? T.ids[i][k] : k;
const slotOf = (i, e) => T.ids && T.ids[i] ? T.ids[i].indexOf(e) : e;

function heatmap(cv, rows, E, value, color, tipText, onRow) {
  const L = 46, TOP = 16, avail = Math.max(300, cv.parentElement.clientWidth - 20 - L);
  const cw = Math.max(1, Math.min(44, Math.floor(avail / E))), ch = Math.max(5, Math.min(30, Math.floor(440 / rows.length)));
  const W = L + cw * E, H = TOP + ch * rows.length + 4, g = sizeCanvas(cv, W, H);
  g.fillStyle = "#fff"; g.fillRect(0, 0, W, H);
  const img = g.createImageData(Math.round(cw * E * DPR), Math.round(ch * rows.length * DPR));
  let hot = 0;
  for (let r = 0; r < rows.length; r++) for (let e = 0; e < E; e++) {
    const v = value(r, e); if (v > 0) hot++;
    const c = color(v), x0 = Math.round(e * cw * DPR), x1 = Math.round((e + 1) * cw * DPR);
    const y0 = Math.round(r * ch * DPR), y1 = Math.round((r + 1) * ch * DPR);
    for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) {
      const p = 4 * (y * img.width + x); img.data[p] = c[0]; img.data[p + 1] = c[1]; img.data[p + 2] = c[2]; img.data[p + 3] = 255;
    }
  }
  g.putImageData(img, Math.round(L * DPR), Math.round(TOP * DPR));
  g.fillStyle = "#444"; g.font = "11px sans-serif"; g.textAlign = "right"; g.textBaseline = "middle";
  const every = Math.max(1, Math.ceil(12 / ch));
  rows.forEach((l, r) => { if (r % every === 0) g.fillText("L" + l, L - 4, TOP + (r + 0.5) * ch); });
  g.textAlign = "center"; g.textBaseline = "alphabetic";
  const estep = Math.max(1, Math.ceil(40 / cw));
  for (let e = 0; e < E; e += estep) g.fillText(String(e), L + (e + 0.5) * cw, TOP - 4);
  const at = ev => {
    const b = cv.getBoundingClientRect(), e = Math.floor((ev.clientX - b.left - L) / cw), r = Math.floor((ev.clientY - b.top - TOP) / ch);
    return (e >= 0 && e < E && r >= 0 && r < rows.length) ? [r, e] : null;
  };
  cv.onmousemove = ev => { const p = at(ev); if (p) showTip(ev, tipText(p[0], p[1])); else hideTip(); };
  cv.onmouseleave = hideTip;
  if (onRow) cv.onclick = ev => { const p = at(ev); if (p) onRow(p[0]); };
  cv.dataset.cells = String(rows.length * E); cv.dataset.nonzero = String(hot);
}

function expertTip(r, e) {
  const a = D.acts[r * D.E + e], tot = D.rowActs[r], s = tot ? a / tot : 0;
  const lines = [`${vlabel()}layer ${D.rows[r]}  expert ${e}`, `activations ${a}  share ${pct(s)}  (${(s * D.E).toFixed(2)}x uniform)`];
  let per = 0; for (const i of rowTensors[r]) per += T.slice[i];
  lines.push(`bytes read ${fmtBytes(a * per)}  (${fmtBytes(per)} per activation)`, "slices:");
  for (const i of rowTensors[r]) {
    const k = slotOf(i, e);
    if (k < 0) { lines.push(`  ${T.name[i]}: expert ${e} was pruned from this model`); continue; }
    const s0 = sliceStart(i, k);
    lines.push(`  ${T.name[i]}[${k}]`, `    ${D.files[T.file[i]].name}  ${span(s0, T.slice[i])}`);
  }
  return lines.join("\n");
}

// ---- file-offset strip: files side by side, one bar per tensor / expert slice, hottest slice wins a pixel ----
const starts = new Float64Array(nT), ends = new Float64Array(nT);
for (let i = 0; i < nT; i++) { starts[i] = D.files[T.file[i]].base + T.off[i]; ends[i] = starts[i] + T.size[i]; }
const total = D.files.length ? D.files[D.files.length - 1].base + D.files[D.files.length - 1].size : 1;
let maxB = 0, minB = Infinity;
function rescale() {  // the strip's colour scale spans the bytes of the trace shown
  maxB = 0; minB = Infinity;
  for (let i = 0; i < nT; i++) if (T.row[i] >= 0) for (let k = 0; k < T.n[i]; k++) {
    const b = D.acts[T.row[i] * D.E + eid(i, k)] * T.slice[i]; if (b > 0) { maxB = Math.max(maxB, b); minB = Math.min(minB, b); }
  }
}
rescale();
function byteColor(b) {
  if (!(b > 0)) return GREY;
  return lut(VIRIDIS, maxB > minB ? 0.08 + 0.92 * Math.log(b / minB) / Math.log(maxB / minB) : 1);
}
const layerRange = {};
for (let i = 0; i < nT; i++) if (T.layer[i] >= 0) {
  const l = T.layer[i], r = layerRange[l] || (layerRange[l] = [Infinity, -Infinity]);
  r[0] = Math.min(r[0], starts[i]); r[1] = Math.max(r[1], ends[i]);
}
let view = [0, total], who = null, count = new Int32Array(0);
const strip = document.getElementById("strip"), stripSel = document.getElementById("strip-zoom");
function drawStrip() {
  const W = Math.max(300, strip.parentElement.clientWidth - 20), LANE = 56, H = LANE + 34, g = sizeCanvas(strip, W, H);
  const px = Math.round(W * DPR), scale = px / (view[1] - view[0]);
  const rank = new Float64Array(px).fill(-1); who = new Int32Array(px * 2).fill(-1); count = new Int32Array(px);
  let items = 0;
  const put = (s, e, rk, i, sl) => {
    if (e <= view[0] || s >= view[1]) return;
    const p0 = Math.max(0, Math.floor((s - view[0]) * scale)), p1 = Math.min(px - 1, Math.max(p0, Math.ceil((e - view[0]) * scale) - 1));
    items++;
    for (let p = p0; p <= p1; p++) { count[p]++; if (rk > rank[p]) { rank[p] = rk; who[2 * p] = i; who[2 * p + 1] = sl; } }
  };
  for (let i = 0; i < nT; i++) {
    if (ends[i] <= view[0] || starts[i] >= view[1]) continue;
    if (T.row[i] < 0) { put(starts[i], ends[i], 0, i, -1); continue; }
    const sz = T.slice[i], e0 = Math.max(0, Math.floor((view[0] - starts[i]) / sz)), e1 = Math.min(T.n[i] - 1, Math.floor((view[1] - starts[i]) / sz));
    for (let k = e0; k <= e1; k++) {
      const b = D.acts[T.row[i] * D.E + eid(i, k)] * sz;
      put(starts[i] + k * sz, starts[i] + (k + 1) * sz, b > 0 ? 2 + b : 1, i, k);
    }
  }
  g.fillStyle = "#fff"; g.fillRect(0, 0, W, H);
  const img = g.createImageData(px, Math.round(LANE * DPR));
  let painted = 0;
  for (let p = 0; p < px; p++) {
    if (rank[p] < 0) continue;
    painted++;
    const c = rank[p] === 0 ? DENSE : rank[p] === 1 ? GREY : byteColor(rank[p] - 2);
    for (let y = 0; y < img.height; y++) { const q = 4 * (y * px + p); img.data[q] = c[0]; img.data[q + 1] = c[1]; img.data[q + 2] = c[2]; img.data[q + 3] = 255; }
  }
  g.putImageData(img, 0, 0);
  g.fillStyle = "#444"; g.font = "11px sans-serif"; g.textBaseline = "top";
  const X = b => (b - view[0]) * scale / DPR;
  let lastX = -1e9;
  for (const l of Object.keys(layerRange).map(Number).sort((a, b) => a - b)) {
    const x = X(layerRange[l][0]); if (x < 0 || x > W) continue;
    g.fillRect(x, LANE, 1, 5); if (x - lastX > 30) { g.fillText("L" + l, x + 2, LANE + 4); lastX = x; }
  }
  D.files.forEach(f => { const x = X(f.base); if (x >= 0 && x < W) { g.fillRect(x, 0, 1, LANE + 20); g.fillText(f.name, x + 3, LANE + 18); } });
  strip.dataset.items = String(items); strip.dataset.painted = String(painted);
  document.getElementById("strip-range").textContent =
    `view ${fmtBytes(view[1] - view[0])} of ${fmtBytes(total)} (${items} bars)`;
}
function zoomTo(a, b) { const pad = (b - a) * 0.01; view = [Math.max(0, a - pad), Math.min(total, b + pad)]; drawStrip(); }
stripSel.onchange = () => { const v = stripSel.value; if (v === "all") zoomTo(0, total); else zoomTo(...layerRange[v]); };
strip.onwheel = ev => {
  ev.preventDefault();
  const b = strip.getBoundingClientRect(), f = (ev.clientX - b.left) / b.width, at = view[0] + f * (view[1] - view[0]);
  const span = Math.max(64, Math.min(total, (view[1] - view[0]) * (ev.deltaY > 0 ? 1.25 : 0.8)));
  let a = Math.max(0, at - f * span); a = Math.min(a, total - span); view = [a, a + span]; drawStrip();
};
let drag = null;
strip.onmousedown = ev => { drag = [ev.clientX, view[0], view[1]]; };
window.addEventListener("mouseup", () => { drag = null; });
strip.ondblclick = () => { stripSel.value = "all"; zoomTo(0, total); };
strip.onmouseleave = hideTip;
strip.onmousemove = ev => {
  const b = strip.getBoundingClientRect();
  if (drag) {
    const d = (drag[0] - ev.clientX) / b.width * (drag[2] - drag[1]), span = drag[2] - drag[1];
    const a = Math.max(0, Math.min(total - span, drag[1] + d)); view = [a, a + span]; drawStrip(); return;
  }
  const p = Math.floor((ev.clientX - b.left) * DPR); if (!who || p < 0 || p * 2 >= who.length || who[2 * p] < 0) { hideTip(); return; }
  const i = who[2 * p], k = who[2 * p + 1], lines = [];
  if (k < 0) {
    lines.push(T.name[i], `not routed: read whenever layer ${T.layer[i] >= 0 ? T.layer[i] : "-"} runs`);
    lines.push(`${D.files[T.file[i]].name}  ${span(T.off[i], T.size[i])}`);
  } else {
    const e = eid(i, k), a = D.acts[T.row[i] * D.E + e], s0 = sliceStart(i, k);
    lines.push(`${vlabel()}${T.name[i]}[${k}]`, `layer ${T.layer[i]}  expert ${e}  activations ${a}`, `bytes read ${fmtBytes(a * T.slice[i])}`);
    lines.push(`${D.files[T.file[i]].name}  ${span(s0, T.slice[i])}`);
  }
  if (count[p] > 1) lines.push(`(+${count[p] - 1} more bars in this pixel: zoom in)`);
  showTip(ev, lines.join("\n"));
};

// ---- miss-ratio curves (SVG) ----
const NS = "http://www.w3.org/2000/svg";
function el(name, attrs, parent) { const e = document.createElementNS(NS, name); for (const k in attrs) e.setAttribute(k, attrs[k]); if (parent) parent.appendChild(e); return e; }
function curves() {
  const box = document.getElementById("curves"); if (!box || !D.curves) return;
  const sel = document.getElementById("curve-layer"), W = 620, H = 330, M = { l: 48, r: 12, t: 10, b: 40 };
  const xmax = Math.max(1, ...D.curves.series.map(s => s.cap[s.cap.length - 1] || 1));
  const X = c => M.l + (W - M.l - M.r) * c / xmax, Y = h => H - M.b - (H - M.t - M.b) * h;
  const draw = () => {
    box.textContent = "";
    const svg = el("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}` }, box);
    for (let i = 0; i <= 10; i += 2) { el("line", { x1: M.l, x2: W - M.r, y1: Y(i / 10), y2: Y(i / 10), class: "grid" }, svg); el("text", { x: M.l - 6, y: Y(i / 10) + 4, "text-anchor": "end", class: "axis" }, svg).textContent = (i * 10) + "%"; }
    for (let i = 0; i <= 4; i++) { const c = Math.round(xmax * i / 4); el("text", { x: X(c), y: H - M.b + 14, "text-anchor": "middle", class: "axis" }, svg).textContent = String(c); }
    el("text", { x: (W + M.l) / 2, y: H - 6, "text-anchor": "middle", class: "axis" }, svg).textContent = D.curves.xlabel;
    const path = (s, style) => {
      const d = s.cap.map((c, j) => (j ? "L" : "M") + X(c).toFixed(1) + "," + Y(s.hit[j]).toFixed(1)).join("");
      const p = el("path", Object.assign({ d: d, fill: "none" }, style), svg);
      el("title", {}, p).textContent = `${s.layer === null ? "all layers" : "layer " + s.layer} ${s.policy}`;
    };
    const pick = sel.value;
    D.curves.series.forEach(s => { if (s.layer !== null && s.policy === "LRU") path(s, { stroke: "#ccc", "stroke-width": 1 }); });
    D.curves.series.forEach(s => {
      const dash = s.policy === "OPT" ? "6,3" : "";
      if (s.layer === null) path(s, { stroke: "#d62728", "stroke-width": 2.5, "stroke-dasharray": dash });
      else if (String(s.layer) === pick) path(s, { stroke: "#1f77b4", "stroke-width": 2, "stroke-dasharray": dash });
    });
    box.dataset.series = String(D.curves.series.length);
  };
  sel.onchange = draw; draw();
}

function diffmap() {
  const cv = document.getElementById("diffmap"); if (!cv || !D.diff) return;
  const F = D.diff, m = Math.max(1e-12, ...F.delta.map(Math.abs));
  heatmap(cv, F.rows, D.E, (r, e) => F.delta[r * D.E + e], d => divColor(d, m), (r, e) => {
    const i = r * D.E + e;
    return `layer ${F.rows[r]}  expert ${e}\nshare ${F.labels[0]} ${pct(F.sa[i])}  ${F.labels[1]} ${pct(F.sb[i])}\n` +
      `delta ${(100 * F.delta[i]).toFixed(2)} points\nlayer JS divergence ${F.js[r].toFixed(4)} bits`;
  });
  document.getElementById("diff-scale").textContent = `±${(100 * m).toFixed(2)} points`;
}

function render() {
  heatmap(document.getElementById("heatmap"), D.rows, D.E, (r, e) => { const t = D.rowActs[r]; return t ? D.acts[r * D.E + e] / t : 0; },
    shareColor, expertTip, r => { stripSel.value = String(D.rows[r]); zoomTo(...layerRange[D.rows[r]]); document.getElementById("strip-h").scrollIntoView({ behavior: "smooth" }); });
  drawStrip(); curves(); diffmap();
  document.body.dataset.rendered = "ok";
}
// legends
function legend(id, f) { const cv = document.getElementById(id); if (!cv) return; const g = sizeCanvas(cv, 180, 10); for (let x = 0; x < 180; x++) { g.fillStyle = rgb(f(x / 179)); g.fillRect(x, 0, 1, 10); } }
legend("heat-legend", t => lut(VIRIDIS, t));
legend("strip-legend", t => lut(VIRIDIS, 0.08 + 0.92 * t));
legend("diff-legend", t => divColor(2 * t - 1, 1));
document.querySelectorAll(".sw[data-c]").forEach(s => { s.style.background = rgb(s.dataset.c === "grey" ? GREY : DENSE); });
function setView(i) {  // show trace i: its maps, curves, cards and tables
  cur = i; const v = views[i];
  D.acts = v.acts; D.rowActs = v.rowActs; D.curves = v.curves;
  document.querySelectorAll(".view[data-view]").forEach(b => { b.style.display = b.dataset.view === String(i) ? "" : "none"; });
  document.querySelectorAll(".vname").forEach(s => { s.textContent = " \u2014 " + v.label; });
  document.body.dataset.shown = String(i);
  rescale(); render();
}
const viewSel = document.getElementById("view");
if (viewSel && views.length > 1) { viewSel.onchange = () => setView(+viewSel.value); setView(0); } else render();
let rt = null; window.addEventListener("resize", () => { clearTimeout(rt); rt = setTimeout(render, 150); });
})();
