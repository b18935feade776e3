"""A static HTML feature browser, no server and no network (it opens from the file system):

- ``index.html``: every feature that fired, 100 rows a page (all reachable), sortable, searched by
  id, ``L3/F17``, or text: its label, the tokens it fires on, its top example's context and its
  output tokens. Its rows load from ``index_data.js``.
- ``feature.html#L3/F17``: one page for all features, which loads that feature's
  ``data/L3_F17.js`` (a script, since browsers refuse ``fetch`` on ``file://``): so opening a
  feature reads one small file, however many features the dictionary has. It shows the label,
  density and true maximum, a histogram with axes (log counts, so an outlier does not flatten
  it), the target layers a CLT feature writes to (decoder norm per target), the nearest features by
  decoder cosine, the top contexts and random contexts from several quantile bands, every token
  shaded by its activation, and the output tokens its decoder promotes / suppresses.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:20px;margin:0 0 4px} h3{font-size:15px;margin:16px 0 4px} .meta{color:#666;font-size:13px;margin-bottom:10px}
.label{font-size:15px;margin:2px 0 8px;font-family:ui-monospace,Menlo,Consolas,monospace}
input{font-size:14px;padding:6px 8px;width:420px;margin-right:8px} button{font-size:13px;padding:5px 10px}
table{border-collapse:collapse;width:100%;font-size:13px;margin-top:10px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eee} th{cursor:pointer;background:#fafafa}
td.num{font-variant-numeric:tabular-nums;text-align:right} a{color:#1a5fb4;text-decoration:none}
td.lab{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.9;white-space:pre-wrap;
 border-bottom:1px solid #f0f0f0;padding:4px 0} .tok{border-radius:2px} .tok.max{outline:1px solid #b35900}
.ex-head{color:#888;font-size:12px;margin-top:8px} .logits span{display:inline-block;background:#eef4ff;
 border-radius:3px;padding:1px 5px;margin:2px;font-family:ui-monospace,monospace;font-size:12px}
.logits .neg span{background:#ffeef0} .row{display:flex;gap:28px;flex-wrap:wrap} svg text{font-size:10px;fill:#555}
.pager{margin-top:8px;font-size:13px;color:#555}
"""

INDEX_JS = r"""
const PAGE = 100;
let sortKey = 'density', sortDir = -1, page = 0, shown = [];
const body = document.getElementById('rows'), q = document.getElementById('q');
const count = document.getElementById('count'), pageInfo = document.getElementById('pageinfo');
const rows = FEATURES.map(r => ({layer: r[0], index: r[1], id: r[2], density: r[3], act_max: r[4],
  label: r[5], text: (r[5] + ' ' + r[6] + ' ' + r[7]).toLowerCase()}));
function matches(f, s) {
  if (!s) return true;
  const m = s.match(/^l?(\d+)\s*[\/_:f ]\s*f?(\d+)$/);
  if (m) return f.layer == +m[1] && f.index == +m[2];
  if (/^\d+$/.test(s)) return f.id == +s || f.index == +s;
  return f.text.includes(s);
}
function cell(tr, text, cls) {
  const td = document.createElement('td');
  if (cls) td.className = cls;
  td.textContent = text;
  tr.appendChild(td);
  return td;
}
function filter() {
  const s = q.value.trim().toLowerCase();
  shown = rows.filter(f => matches(f, s));
  shown.sort((a, b) => sortDir * (a[sortKey] - b[sortKey]) || a.id - b.id);
  page = 0;
  render();
}
function render() {
  const pages = Math.max(1, Math.ceil(shown.length / PAGE));
  page = Math.min(Math.max(page, 0), pages - 1);
  body.textContent = '';
  for (const f of shown.slice(page * PAGE, (page + 1) * PAGE)) {
    const tr = document.createElement('tr');
    const a = document.createElement('a');
    a.href = 'feature.html#L' + f.layer + '/F' + f.index;
    a.textContent = 'L' + f.layer + '/F' + f.index;
    cell(tr, '').appendChild(a);
    cell(tr, f.id, 'num');
    cell(tr, (100 * f.density).toFixed(3) + '%', 'num');
    cell(tr, f.act_max.toFixed(2), 'num');
    cell(tr, f.label, 'lab');
    body.appendChild(tr);
  }
  count.textContent = shown.length + ' of ' + rows.length + ' features';
  pageInfo.textContent = 'page ' + (page + 1) + ' of ' + pages;
}
for (const th of document.querySelectorAll('th[data-key]')) {
  th.addEventListener('click', () => {
    const k = th.dataset.key;
    sortDir = (k == sortKey) ? -sortDir : -1;
    sortKey = k;
    filter();
  });
}
q.addEventListener('input', filter);
document.getElementById('prev').addEventListener('click', () => { page--; render(); });
document.getElementById('next').addEventListener('click', () => { page++; render(); });
if (location.hash.length > 1) q.value = decodeURIComponent(location.hash.slice(1));  // index.html#L3/F17
filter();
"""

FEATURE_JS = r"""
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
const tokText = t => JSON.stringify(t).slice(1, -1);
window.addEventListener('hashchange', () => location.reload());
function shade(a, top) {
  if (a <= 0 || top <= 0) return '';
  return ' style="background:rgba(255,140,0,' + (0.12 + 0.78 * Math.min(1, a / top)).toFixed(2) + ')"';
}
function context(e, top, n) {
  const toks = e.tokens.map((t, k) => '<span class="tok' + (k == e.center ? ' max' : '') + '" title="' +
    e.acts[k].toFixed(3) + '"' + shade(e.acts[k], top) + '>' + esc(t).replace(/\n/g, '\u21b5\n') + '</span>').join('');
  return '<div class="ex-head">#' + n + ' &middot; max ' + e.max.toFixed(3) + ' &middot; context ' + e.context +
    ', position ' + e.position + '</div><div class="ctx">' + toks + '</div>';
}
function bars(values, labels, opts) {  // an SVG bar chart with axes
  const W = opts.w || 460, H = 150, l = 44, b = 30, n = values.length, bw = (W - l - 8) / n;
  const top = Math.max(...values, 1e-12);
  const y = v => H - b - (H - b - 10) * v / top;
  let s = '<svg width="' + W + '" height="' + H + '" role="img">';
  values.forEach((v, i) => {
    s += '<rect x="' + (l + i * bw + 0.5).toFixed(1) + '" y="' + y(v).toFixed(1) + '" width="' +
      Math.max(1, bw - 1).toFixed(1) + '" height="' + (H - b - y(v)).toFixed(1) + '" fill="' + opts.color +
      '"><title>' + esc(opts.tip(i, v)) + '</title></rect>';
  });
  s += '<line x1="' + l + '" y1="' + (H - b) + '" x2="' + (W - 6) + '" y2="' + (H - b) + '" stroke="#888"/>';
  s += '<line x1="' + l + '" y1="10" x2="' + l + '" y2="' + (H - b) + '" stroke="#888"/>';
  for (const f of [0, 0.5, 1]) {
    s += '<text x="' + (l - 4) + '" y="' + (y(f * top) + 3) + '" text-anchor="end">' + opts.ytick(f * top) + '</text>';
  }
  const every = Math.max(1, Math.ceil(n / 8));
  labels.forEach((t, i) => {
    if (i % every == 0 || i == n - 1)
      s += '<text x="' + (l + (i + 0.5) * bw) + '" y="' + (H - b + 12) + '" text-anchor="middle">' + esc(t) + '</text>';
  });
  s += '<text x="' + ((l + W) / 2) + '" y="' + (H - 2) + '" text-anchor="middle">' + esc(opts.xlabel) + '</text>';
  s += '<text x="10" y="' + ((H - b) / 2) + '" transform="rotate(-90 10 ' + ((H - b) / 2) + ')" text-anchor="middle">' +
    esc(opts.ylabel) + '</text>';
  return s + '</svg>';
}
function showFeature(r) {
  const top = Math.max(r.act_max, ...r.examples.map(e => e.max)) || 1;
  const n = r.hist.length, w = r.hist_top / n;
  const hist = bars(r.hist.map(c => Math.log10(1 + c)), r.hist.map((c, i) => (i * w).toPrecision(2)), {
    color: '#e67e22', xlabel: 'activation (true max ' + r.act_max.toFixed(3) + ')', ylabel: 'tokens (log)',
    tip: (i, v) => (i * w).toPrecision(3) + '-' + ((i + 1) * w).toPrecision(3) + ': ' + r.hist[i] + ' tokens',
    ytick: v => Math.round(Math.pow(10, v) - 1)});
  let side = '';
  if (r.targets) {
    side = '<div><h3>Target layers it writes to (decoder norm)</h3>' + bars(r.targets.map(t => t[1]),
      r.targets.map(t => 'L' + t[0]), {color: '#3b7dd8', xlabel: 'target layer', ylabel: 'norm',
      tip: (i, v) => 'layer ' + r.targets[i][0] + ': ' + v.toFixed(4), ytick: v => v.toPrecision(2),
      w: Math.max(240, Math.min(520, 60 + 18 * r.targets.length))}) + '</div>';
  }
  const chips = ts => ts.map(t => '<span>' + esc(tokText(t)) + '</span>').join('') || '(none)';
  let h = '<p><a href="index.html">&larr; all features</a></p>' +
    '<h1>Layer ' + r.layer + ', feature ' + r.index + '</h1>' +
    '<div class="label">' + esc(r.label) + '</div>' +
    '<div class="meta">circuit-tracer id ' + r.id + ' &middot; density ' + (100 * r.density).toFixed(4) +
    '% &middot; max activation ' + r.act_max.toFixed(3) + ' &middot; ' + esc(NAME) + '</div>' +
    '<div class="row"><div><h3>Activations (non-zero)</h3>' + hist + '</div>' + side + '</div>' +
    '<h3>Output tokens its decoder promotes</h3><div class="logits"><div>' + chips(r.top_logits) +
    '</div><div class="neg">suppresses: ' + chips(r.bottom_logits) + '</div></div>';
  if (r.neighbours) {
    h += '<h3>Nearest features (decoder cosine)</h3><div class="meta">' + r.neighbours.map(nb =>
      '<a href="feature.html#L' + nb[0] + '/F' + nb[1] + '">L' + nb[0] + '/F' + nb[1] + '</a> ' + nb[2].toFixed(2)
    ).join(' &middot; ') + '</div>';
  }
  h += '<h3>Top ' + r.examples.length + ' contexts</h3>' + r.examples.map((e, k) => context(e, top, k + 1)).join('');
  for (const band of r.bands) {
    h += '<h3>' + esc(band.name) + '</h3>' + band.examples.map((e, k) => context(e, top, k + 1)).join('');
  }
  document.getElementById('feature').innerHTML = h;
  document.title = 'L' + r.layer + '/F' + r.index + ' ' + r.label;
}
const m = decodeURIComponent(location.hash).match(/^#L(\d+)\/F(\d+)$/);
if (m) {
  const s = document.createElement('script');
  s.src = 'data/L' + m[1] + '_F' + m[2] + '.js';
  s.onerror = () => { document.getElementById('feature').textContent = 'L' + m[1] + '/F' + m[2] + ' did not fire on the text read (no data).'; };
  document.body.appendChild(s);
} else {
  document.getElementById('feature').textContent = 'Open a feature as feature.html#L3/F17 (from index.html).';
}
"""


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _js(value: Any) -> str:
    """JSON safe inside a <script>."""
    return json.dumps(value, ensure_ascii=True).replace("</", "<\\/")


def _search_text(r: dict[str, Any]) -> tuple[str, str]:
    """(the tokens it fires on, the text around its top example's peak) for the index's search."""
    peaks = " ".join(dict.fromkeys(e["tokens"][e["center"]] for e in r["examples"]))
    ctx = "".join(r["examples"][0]["tokens"]) if r["examples"] else ""
    return peaks, ctx + " " + " ".join(r["top_logits"])


def index_page(summary: dict[str, Any]) -> str:
    name = html.escape(str(summary.get("name", "")))
    body = f"""<h1>Features of {name}</h1>
<div class='meta'>{summary["fired"]} of {summary["features"]} features fired on {summary["tokens"]} held-out
tokens (layers {html.escape(_layer_span(summary["layers"]))}, {summary["features_per_layer"]} per layer). Examples
skip the first {summary.get("skip_positions", 0)} positions after BOS and exact repeats; density = fraction of
tokens a feature fires on.</div>
<input id='q' placeholder='search: id, L3/F17, or text (label, tokens it fires on, context, outputs)' autofocus>
<span id='count' class='meta'></span>
<div class='pager'><button id='prev'>&larr; prev</button> <span id='pageinfo'></span>
<button id='next'>next &rarr;</button></div>
<table><thead><tr><th data-key='layer'>feature</th><th data-key='id'>id</th>
<th data-key='density'>density</th><th data-key='act_max'>max act</th><th>label (fires on &rarr; promotes)</th>
</tr></thead><tbody id='rows'></tbody></table>
<script src='index_data.js'></script>
<script>{INDEX_JS}</script>"""
    return _page(f"Features of {summary.get('name', '')}", body)


def feature_template(summary: dict[str, Any]) -> str:
    body = f"<div id='feature'></div>\n<script>const NAME = {_js(str(summary.get('name', '')))};\n{FEATURE_JS}</script>"
    return _page("feature", body)


def _layer_span(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


def clear_browser(folder: str | Path) -> None:
    """Remove an earlier browser's per-feature files from ``folder``."""
    folder = Path(folder)
    for stale in [
        *folder.glob("data/*.js"),
        *folder.glob("pages/*.html"),
    ]:  # pages/: the old per-feature pages
        stale.unlink()


def write_feature_pages(records: list[dict[str, Any]], folder: str | Path) -> list[list[Any]]:
    """``folder/data/L{layer}_F{index}.js`` per feature; returns the index's rows for them (a rank
    of a sharded pass writes its own features' pages, rank 0 the index of every rank's rows)."""
    data = Path(folder) / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in records:
        (data / f"L{r['layer']}_F{r['index']}.js").write_text(f"showFeature({_js(r)});\n")
        rows.append(
            [r["layer"], r["index"], r["id"], r["density"], r["act_max"], r["label"], *_search_text(r)]
        )
    return rows


def write_index(rows: list[list[Any]], folder: str | Path, summary: dict[str, Any]) -> Path:
    """``folder/index.html`` (+ ``index_data.js``) and ``folder/feature.html``; returns the index."""
    folder = Path(folder)
    (folder / "index_data.js").write_text(f"const FEATURES = {_js(rows)};\n")
    (folder / "feature.html").write_text(feature_template(summary))
    index = folder / "index.html"
    index.write_text(index_page(summary))
    return index


def write_browser(records: list[dict[str, Any]], folder: str | Path, summary: dict[str, Any]) -> Path:
    """Write ``folder/index.html`` (+ ``index_data.js``), ``folder/feature.html`` and
    ``folder/data/L{layer}_F{index}.js`` per feature; returns the index path."""
    clear_browser(folder)
    return write_index(write_feature_pages(records, folder), folder, summary)
