"""A static HTML feature browser: ``index.html`` (search by id, sort by density) and one page per
feature (``pages/L{layer}_F{index}.html``: its top contexts with every token shaded by its
activation, its density, maximum and top / bottom output tokens). No server and no network: the
pages open from the file system, their data inline."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:20px;margin:0 0 4px} .meta{color:#666;font-size:13px;margin-bottom:14px}
input{font-size:14px;padding:6px 8px;width:360px;margin-right:8px} button{font-size:13px;padding:6px 10px}
table{border-collapse:collapse;width:100%;font-size:13px;margin-top:12px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eee} th{cursor:pointer;background:#fafafa}
td.num{font-variant-numeric:tabular-nums;text-align:right} a{color:#1a5fb4;text-decoration:none}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.9;white-space:pre-wrap;
 border-bottom:1px solid #f0f0f0;padding:4px 0} .tok{border-radius:2px} .tok.max{outline:1px solid #b35900}
.ex-head{color:#888;font-size:12px;margin-top:8px} .logits span{display:inline-block;background:#eef4ff;
 border-radius:3px;padding:1px 5px;margin:2px;font-family:ui-monospace,monospace;font-size:12px}
.logits .neg span{background:#ffeef0} .hist{display:flex;align-items:flex-end;height:60px;gap:1px;margin:6px 0}
.hist div{background:#e67e22;width:8px;min-height:1px}
"""

INDEX_JS = """
const rows = FEATURES.slice();
let sortKey = 'density', sortDir = -1;
const body = document.getElementById('rows');
const q = document.getElementById('q');
const count = document.getElementById('count');
function matches(f, s) {
  if (!s) return true;
  s = s.trim().toLowerCase();
  const m = s.match(/^l?(\\d+)\\s*[\\/_:f ]\\s*f?(\\d+)$/);
  if (m) return f.layer == +m[1] && f.index == +m[2];
  if (/^\\d+$/.test(s)) return f.id == +s || f.index == +s;
  return f.top.join(' ').toLowerCase().includes(s);
}
function cell(tr, text, cls) {
  const td = document.createElement('td');
  if (cls) td.className = cls;
  td.textContent = text;
  tr.appendChild(td);
  return td;
}
function render() {
  const s = q.value;
  const shown = rows.filter(f => matches(f, s));
  shown.sort((a, b) => sortDir * (a[sortKey] - b[sortKey]) || a.id - b.id);
  body.textContent = '';
  for (const f of shown.slice(0, 2000)) {
    const tr = document.createElement('tr');
    const td = cell(tr, '');
    const a = document.createElement('a');
    a.href = 'pages/L' + f.layer + '_F' + f.index + '.html';
    a.textContent = 'L' + f.layer + '/F' + f.index;
    td.appendChild(a);
    cell(tr, f.id, 'num');
    cell(tr, (100 * f.density).toFixed(3) + '%', 'num');
    cell(tr, f.act_max.toFixed(2), 'num');
    cell(tr, f.top.slice(0, 6).map(t => JSON.stringify(t)).join(' '));
    body.appendChild(tr);
  }
  count.textContent = shown.length + ' of ' + rows.length + ' features' +
    (shown.length > 2000 ? ' (first 2000 shown)' : '');
}
for (const th of document.querySelectorAll('th[data-key]')) {
  th.addEventListener('click', () => {
    const k = th.dataset.key;
    sortDir = (k == sortKey) ? -sortDir : -1;
    sortKey = k;
    render();
  });
}
q.addEventListener('input', render);
if (location.hash.length > 1) q.value = decodeURIComponent(location.hash.slice(1));  // index.html#L3/F17
document.getElementById('dens').addEventListener('click', () => {
  sortDir = (sortKey == 'density') ? -sortDir : -1; sortKey = 'density'; render();
});
render();
"""


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _shade(act: float, top: float) -> str:
    if act <= 0 or top <= 0:
        return ""
    alpha = min(1.0, act / top)
    return f" style='background:rgba(255,140,0,{0.12 + 0.78 * alpha:.2f})'"


def feature_page(r: dict[str, Any], summary: dict[str, Any]) -> str:
    """The HTML of one feature's page."""
    top = max([r["act_max"]] + [e["max"] for e in r["examples"]]) or 1.0
    logits = "".join(f"<span>{html.escape(repr(t)[1:-1])}</span>" for t in r["top_logits"])
    neg = "".join(f"<span>{html.escape(repr(t)[1:-1])}</span>" for t in r["bottom_logits"])
    peak = max(r["hist"]) or 1
    bars = "".join(
        f"<div title='{n} tokens' style='height:{max(1, round(60 * n / peak))}px'></div>" for n in r["hist"]
    )
    parts = [
        "<p><a href='../index.html'>&larr; all features</a></p>",
        f"<h1>Layer {r['layer']}, feature {r['index']}</h1>",
        f"<div class='meta'>circuit-tracer id {r['id']} &middot; density {100 * r['density']:.4f}% "
        f"&middot; max activation {r['act_max']:.3f} &middot; {html.escape(str(summary.get('name', '')))}</div>",
        "<h3>Output tokens its decoder promotes</h3>",
        f"<div class='logits'><div>{logits or '(none)'}</div><div class='neg'>suppresses: {neg or '(none)'}</div></div>",
        f"<h3>Activations (non-zero, 0 to {r['hist_top']:.3g})</h3><div class='hist'>{bars}</div>",
        f"<h3>Top {len(r['examples'])} contexts</h3>",
    ]
    for n, e in enumerate(r["examples"]):
        toks = []
        for k, (t, a) in enumerate(zip(e["tokens"], e["acts"])):
            cls = "tok max" if k == e["center"] else "tok"
            toks.append(f"<span class='{cls}' title='{a:.3f}'{_shade(a, top)}>{html.escape(t)}</span>")
        parts.append(
            f"<div class='ex-head'>#{n + 1} &middot; max {e['max']:.3f} &middot; context {e['context']}</div>"
            f"<div class='ctx'>{''.join(toks)}</div>"
        )
    return _page(f"L{r['layer']}/F{r['index']}", "\n".join(parts))


def index_page(records: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    rows = [
        {
            "layer": r["layer"],
            "index": r["index"],
            "id": r["id"],
            "density": r["density"],
            "act_max": r["act_max"],
            "top": r["top_logits"],
        }
        for r in records
    ]
    data = json.dumps(rows, ensure_ascii=True).replace("</", "<\\/")
    name = html.escape(str(summary.get("name", "")))
    body = f"""<h1>Features of {name}</h1>
<div class='meta'>{summary["fired"]} of {summary["features"]} features fired on {summary["tokens"]} held-out
tokens (layers {html.escape(_layer_span(summary["layers"]))}, {summary["features_per_layer"]} per layer).
Top contexts per feature; density = fraction of tokens it fires on.</div>
<input id='q' placeholder='search: id, L3/F17, or an output token' autofocus>
<button id='dens'>sort by density</button> <span id='count' class='meta'></span>
<table><thead><tr><th data-key='layer'>feature</th><th data-key='id'>id</th>
<th data-key='density'>density</th><th data-key='act_max'>max act</th><th>top output tokens</th></tr></thead>
<tbody id='rows'></tbody></table>
<script>const FEATURES = {data};</script>
<script>{INDEX_JS}</script>"""
    return _page(f"Features of {summary.get('name', '')}", body)


def _layer_span(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


def write_browser(records: list[dict[str, Any]], folder: str | Path, summary: dict[str, Any]) -> Path:
    """Write ``folder/index.html`` and ``folder/pages/*.html``; returns the index path."""
    folder = Path(folder)
    pages = folder / "pages"
    pages.mkdir(parents=True, exist_ok=True)
    for stale in pages.glob("*.html"):
        stale.unlink()
    for r in records:
        (pages / f"L{r['layer']}_F{r['index']}.html").write_text(feature_page(r, summary))
    index = folder / "index.html"
    index.write_text(index_page(records, summary))
    return index
