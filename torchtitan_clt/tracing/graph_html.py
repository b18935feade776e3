"""A pruned attribution graph as one self-contained HTML page: no network, nothing fetched.

circuit-tracer's UI loads d3, dagre, pako and its own scripts from public CDNs, so offline (a
compute node, a laptop on a train) it is a blank page. This page is inline SVG and a few lines of
our own script: token positions left to right, layers bottom to top (embeddings below layer 0,
the logit targets on top), edges drawn by weight (width ∝ |weight|, blue excites, red inhibits),
feature nodes labelled from the run's feature files (``label``; else ``L7/F106``) and linked to
the run's feature browser page (``features/feature.html#L7/F106``). Click a node to keep only its
edges; click the background to show all again.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

LEFT, TOP, BOTTOM = 90, 40, 60
FIT_HEIGHT, MIN_ROW, MAX_ROW = 640, 44, 120
LABELLED = 30  # feature nodes with a visible label (the most influential); the rest on hover
DOT = 13  # px between nodes of one cell
FIT_WIDTH, MIN_COL, MAX_COL = 1300, 56, 140  # columns shrink to fit a laptop screen, down to MIN_COL
MAX_LABEL = 22


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _labels(features: Path | None) -> dict[int, str]:
    if features is None or not Path(features).is_dir():
        return {}
    from torchtitan_clt.metrics.feature_files import feature_labels

    return feature_labels(features)


def _cantor(layer: int, index: int) -> int:
    return (layer + index) * (layer + index + 1) // 2 + index


def render_graph_html(
    pruned: Any,
    tokens: list[str],
    prompt: str,
    predictions: list[tuple[str, float]],
    n_layers: int,
    features: Path | None = None,
    link_base: str | None = None,
    scores: tuple[float, float] | None = None,
) -> str:
    """The page for ``pruned`` (``graphs.prune``'s result). ``features``: the run's feature folder
    (labels); ``link_base``: the browser page the feature links point at (relative to the page)."""
    labels = _labels(features)
    n_pos = max(len(tokens), 1)
    col_w = max(MIN_COL, min(MAX_COL, (FIT_WIDTH - LEFT) // n_pos))
    rows = n_layers + 2  # embeddings, layers 0..L-1, logits
    row_h = max(MIN_ROW, min(MAX_ROW, FIT_HEIGHT // (rows - 1)))
    width, height = LEFT + col_w * n_pos + 170, TOP + row_h * (rows - 1) + BOTTOM
    by_cell: dict[tuple[int, int], list[Any]] = {}

    def row_of(n: Any) -> int:
        if n.kind == "token":
            return 0
        if n.kind == "logit":
            return rows - 1
        return int(n.layer) + 1

    for n in pruned.nodes:
        by_cell.setdefault((row_of(n), n.pos), []).append(n)
    xy: dict[str, tuple[float, float]] = {}
    per_line = max(1, (col_w - 12) // DOT)  # a cell's nodes in a small grid, most influential first
    for (r, pos), cell in by_cell.items():
        cell.sort(key=lambda n: -n.influence)
        for k, n in enumerate(cell):
            line, col = divmod(k, per_line)
            on_line = min(len(cell) - line * per_line, per_line)
            dx = (col - (on_line - 1) / 2) * DOT
            xy[n.node_id] = (LEFT + col_w * (pos + 0.5) + dx, TOP + row_h * (rows - 1 - r) + line * 10)
    feats = sorted((n for n in pruned.nodes if n.kind == "feature"), key=lambda n: -n.influence)
    labelled = {n.node_id for n in feats[:LABELLED]}

    wmax = max((abs(w) for _, _, w in pruned.edges), default=1.0) or 1.0
    svg = [
        f'<svg id="g" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">'
    ]
    for r in range(rows):  # row labels and guides
        y = TOP + row_h * (rows - 1 - r)
        name = "tokens" if r == 0 else "logits" if r == rows - 1 else f"layer {r - 1}"
        svg.append(f'<line x1="{LEFT - 10}" y1="{y}" x2="{width - 20}" y2="{y}" class="guide"/>')
        svg.append(f'<text x="{LEFT - 16}" y="{y + 4}" class="rowlab">{name}</text>')
    for p, t in enumerate(tokens):
        svg.append(
            f'<text x="{LEFT + col_w * (p + 0.5)}" y="{height - 24}" class="tok">{_esc(repr(t))}</text>'
        )
    for s, d, w in sorted(pruned.edges, key=lambda e: abs(e[2])):
        if s not in xy or d not in xy:
            continue
        (x1, y1), (x2, y2) = xy[s], xy[d]
        cls = "pos" if w >= 0 else "neg"
        sw = 0.4 + 4.0 * abs(w) / wmax
        op = 0.08 + 0.8 * abs(w) / wmax
        svg.append(
            f'<line class="e {cls}" data-s="{_esc(s)}" data-d="{_esc(d)}" x1="{x1:.1f}" y1="{y1:.1f}" '
            f'x2="{x2:.1f}" y2="{y2:.1f}" stroke-width="{sw:.2f}" stroke-opacity="{op:.2f}"><title>{_esc(s)} → {_esc(d)}: '
            f"{w:+.4g}</title></line>"
        )
    for n in pruned.nodes:
        if n.node_id not in xy:
            continue
        x, y = xy[n.node_id]
        nid = _esc(n.node_id)
        if n.kind == "feature":
            ref = f"L{n.layer}/F{n.feature}"
            label = labels.get(_cantor(int(n.layer), int(n.feature)), ref)
            tip = f"{ref} at {tokens[n.pos] if n.pos < len(tokens) else n.pos!r}: {label}\nactivation {n.activation:.3f}, influence {n.influence:.3f}"
            shape = f'<circle class="n feat" data-id="{nid}" cx="{x:.1f}" cy="{y:.1f}" r="7"><title>{_esc(tip)}</title></circle>'
            short = label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 1] + "…"
            text = ""
            if n.node_id in labelled:
                text = f'<text class="nlab" x="{x + 6:.1f}" y="{y - 9:.1f}">{_esc(short)}</text>'
            if link_base is not None:
                href = f"{link_base}#{ref}"
                svg.append(f'<a href="{_esc(href)}" target="_blank">{shape}{text}</a>')
            else:
                svg.append(shape + text)
        elif n.kind == "error":
            tip = f"error node, layer {n.layer} at position {n.pos}: what the transcoder misses (influence {n.influence:.3f})"
            svg.append(
                f'<rect class="n err" data-id="{nid}" x="{x - 6:.1f}" y="{y - 6:.1f}" width="12" height="12">'
                f"<title>{_esc(tip)}</title></rect>"
            )
        else:
            cls = "tokn" if n.kind == "token" else "logit"
            tip = f"{n.kind} {n.node_id}"
            if n.kind == "logit":
                vocab = n.node_id.split("_")[1]
                tip = next(
                    (f"output {t!r} p={p:.3f}" for t, p, v in _pred_ids(predictions) if v == vocab), tip
                )
            svg.append(
                f'<polygon class="n {cls}" data-id="{nid}" points="{x - 8:.1f},{y + 6:.1f} {x + 8:.1f},{y + 6:.1f} '
                f'{x:.1f},{y - 8:.1f}"><title>{_esc(tip)}</title></polygon>'
            )
    svg.append("</svg>")
    preds = ", ".join(f"{_esc(repr(p[0]))} {p[1]:.3f}" for p in predictions[:8])
    score = (
        f" · replacement score {scores[0]:.3f}, completeness {scores[1]:.3f}" if scores is not None else ""
    )
    n_feat = sum(1 for n in pruned.nodes if n.kind == "feature")
    n_err = sum(1 for n in pruned.nodes if n.kind == "error")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>graph: {_esc(prompt)}</title>
<style>
body{{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:16px;color:#222}}
h1{{font-size:18px;margin:0 0 4px}} .meta{{font-size:13px;color:#555;margin:2px 0}}
.guide{{stroke:#eee}} .rowlab{{font-size:11px;fill:#888;text-anchor:end}}
.tok{{font-size:12px;text-anchor:middle;font-family:ui-monospace,Menlo,Consolas,monospace}}
.e.pos{{stroke:#3b7dd8}} .e.neg{{stroke:#d8453b}} .e.dim{{stroke-opacity:.03 !important}} .e.hi{{stroke-opacity:.9 !important}}
.n{{stroke:#333;stroke-width:1;cursor:pointer}} .feat{{fill:#f5b041}} .err{{fill:#bbb}}
.tokn{{fill:#7fb77e}} .logit{{fill:#a67fd8}} .n.on{{stroke:#000;stroke-width:3}}
.nlab{{font-size:10px;fill:#333}} a .nlab{{fill:#1a5fb4}}
#wrap{{overflow:auto;border:1px solid #ddd}}
</style></head><body>
<h1>{_esc(prompt)}</h1>
<div class="meta">the model predicts: {preds}{score}</div>
<div class="meta">{n_feat} feature nodes, {n_err} error nodes, {len(pruned.edges)} edges (pruned) ·
blue edges excite, red inhibit, width ∝ |weight| · click a node to keep its edges, a feature's label to open its page</div>
<div id="wrap">{"".join(svg)}</div>
<script>
(function () {{
  var svg = document.getElementById('g');
  var edges = svg.querySelectorAll('line.e');
  function show(id) {{
    svg.querySelectorAll('.n').forEach(function (n) {{ n.classList.toggle('on', n.dataset.id === id); }});
    edges.forEach(function (e) {{
      var mine = id !== null && (e.dataset.s === id || e.dataset.d === id);
      e.classList.toggle('dim', id !== null && !mine);
      e.classList.toggle('hi', mine);
    }});
  }}
  svg.addEventListener('click', function (ev) {{
    var t = ev.target;
    if (t.dataset && t.dataset.id && !(t.closest && t.closest('a'))) {{ show(t.dataset.id); }}
    else if (!t.dataset || !t.dataset.id) {{ show(null); }}
  }});
}})();
</script>
</body></html>
"""


def _pred_ids(predictions: list) -> list[tuple[str, float, str]]:
    return [(p[0], p[1], str(p[2])) for p in predictions if len(p) > 2]


def write_graph_html(
    path: str | Path,
    pruned: Any,
    tokens: list[str],
    prompt: str,
    predictions: list[tuple],
    n_layers: int | None = None,
    features: Path | None = None,
    scores: tuple[float, float] | None = None,
) -> Path:
    """Write ``render_graph_html`` to ``path``; feature links point at ``features/feature.html``
    (the run's feature browser) relative to the page, when that folder exists."""
    path = Path(path)
    if n_layers is None:
        n_layers = 1 + max((int(n.layer) for n in pruned.nodes if n.layer is not None), default=0)
    link = None
    if features is not None and Path(features).is_dir():
        link = Path(os.path.relpath(Path(features) / "feature.html", path.parent)).as_posix()
    path.write_text(
        render_graph_html(pruned, tokens, prompt, predictions, n_layers, features, link, scores),
        encoding="utf-8",
    )
    return path


def graph_summary(pruned: Any) -> str:
    """One JSON line: node counts by kind (for logs and tests)."""
    kinds: dict[str, int] = {}
    for n in pruned.nodes:
        kinds[n.kind] = kinds.get(n.kind, 0) + 1
    return json.dumps({"nodes": kinds, "edges": len(pruned.edges)})
