"""Open a run's attribution graphs again: prune at another threshold, list the top nodes, score a
node set, without recomputing the attribution (minutes per prompt).

``scripts/trace.py`` saves each graph whole as ``<out>/<slug>.pt`` (circuit-tracer's
``Graph.to_pt``) beside the pruned ``<slug>.json`` its UI serves::

    from torchtitan_clt.tracing import graphs
    g = graphs.open_graph("graphs/demo.pt")            # or a folder with one graph, or (folder, slug)
    kept = graphs.prune(g, node_threshold=0.6)          # the nodes and edges the JSON would hold
    graphs.top_nodes(g, 10)                              # feature nodes by influence on the logits
    graphs.score_nodes(g, ["L7/F106", "3_17_5"])         # how much of the output goes through them

Node ids are the graph JSON's (``{layer}_{feature}_{pos}`` for a feature, ``0_{layer}_{pos}``
for an error node, ``E_{token}_{pos}``, logits ``{n_layers + 1}_{token}_{pos}``); ``L7/F106``
means that feature at every position. Pruning is circuit-tracer's own ``prune_graph`` and node
builder, so a reopened graph pruned at the JSON's thresholds gives the JSON's node set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FEATURE_REF = re.compile(r"^L(\d+)/F(\d+)$")


@dataclass
class Node:
    """One node of a graph, as the graph JSON names it."""

    node_id: str
    kind: str
    """``feature``, ``error``, ``token`` or ``logit``."""
    layer: int | None
    pos: int
    feature: int | None
    """The feature's index in its layer (features only)."""
    influence: float
    """Its share of the total influence on the logit targets (all paths, circuit-tracer's node
    influence, normalized to sum to 1 over the graph's nodes)."""
    activation: float | None = None


@dataclass
class Pruned:
    nodes: list[Node]
    edges: list[tuple[str, str, float]]
    """(source id, target id, weight) of the kept edges."""

    @property
    def node_ids(self) -> set[str]:
        return {n.node_id for n in self.nodes}


def _need_circuit_tracer():
    try:
        import circuit_tracer.graph as ct_graph
    except ImportError as e:  # pragma: no cover - the trace extra is installed by setup.sh
        raise ImportError(
            "torchtitan_clt.tracing.graphs needs circuit-tracer: pip install -e '.[trace]' "
            "(scripts/setup.sh installs it)."
        ) from e
    return ct_graph


def graph_file(path: str | Path, slug: str | None = None) -> Path:
    """The ``.pt`` graph at ``path``: the file itself, ``<folder>/<slug>.pt``, or a folder's only
    one."""
    p = Path(path)
    if p.is_file():
        return p
    if slug is not None:
        f = p / f"{slug}.pt"
        if f.is_file():
            return f
        raise FileNotFoundError(f"{f} does not exist; scripts/trace.py --out {p} --slug {slug} writes it.")
    found = sorted(p.glob("*.pt")) if p.is_dir() else []
    if len(found) != 1:
        names = ", ".join(f.stem for f in found) or "none"
        raise FileNotFoundError(
            f"{p}: expected one saved graph (<slug>.pt, written by scripts/trace.py), found {names}; "
            "pass the file or a slug."
        )
    return found[0]


def open_graph(path: str | Path, slug: str | None = None) -> Any:
    """circuit-tracer's ``Graph`` saved by ``scripts/trace.py`` (see ``graph_file``), on the CPU."""
    return _need_circuit_tracer().Graph.from_pt(str(graph_file(path, slug)))


def _layout(graph: Any) -> tuple[int, int, int, int]:
    n_feat = len(graph.selected_features)
    err_end = n_feat + graph.n_pos * graph.cfg.n_layers
    tok_end = err_end + len(graph.input_tokens)
    return n_feat, err_end, tok_end, graph.adjacency_matrix.shape[0]


def _logit_weights(graph: Any) -> torch.Tensor:
    w = torch.zeros(graph.adjacency_matrix.shape[0])
    w[-len(graph.logit_targets) :] = graph.logit_probabilities.float().cpu()
    return w


def node_influence(graph: Any) -> torch.Tensor:
    """[n_nodes] each node's influence on the logit targets, as a share of the total."""
    ct = _need_circuit_tracer()
    infl = ct.compute_node_influence(graph.adjacency_matrix.float().cpu(), _logit_weights(graph))
    return infl / infl.sum().clamp_min(1e-12)


def _node(graph: Any, i: int, influence: float) -> Node:
    n_feat, err_end, tok_end, _ = _layout(graph)
    if i < n_feat:
        row = int(graph.selected_features[i])
        layer, pos, feat = (int(v) for v in graph.active_features[row].tolist())
        act = float(graph.activation_values[row])
        return Node(f"{layer}_{feat}_{pos}", "feature", layer, pos, feat, influence, act)
    if i < err_end:
        layer, pos = divmod(i - n_feat, graph.n_pos)
        return Node(f"0_{layer}_{pos}", "error", layer, pos, None, influence)
    if i < tok_end:
        pos = i - err_end
        return Node(f"E_{int(graph.input_tokens[pos])}_{pos}", "token", None, pos, None, influence)
    k = i - tok_end
    vocab = int(graph.logit_targets[k].vocab_idx)
    return Node(
        f"{graph.cfg.n_layers + 1}_{vocab}_{graph.n_pos - 1}", "logit", None, graph.n_pos - 1, None, 0.0
    )


def prune(graph: Any, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """The nodes and edges circuit-tracer's graph JSON keeps at these thresholds (its
    ``prune_graph``, then the nodes an edge touches plus every token and logit)."""
    ct = _need_circuit_tracer()
    graph.to("cpu")
    node_mask, edge_mask, _ = ct.prune_graph(graph, node_threshold, edge_threshold)
    infl = node_influence(graph)
    nodes = {i: _node(graph, i, float(infl[i])) for i in node_mask.nonzero().flatten().tolist()}
    dsts, srcs = edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency_matrix[dsts, srcs].tolist()
    edges = [
        (nodes[s].node_id, nodes[d].node_id, float(w))
        for s, d, w in zip(srcs.tolist(), dsts.tolist(), weights)
        if s in nodes and d in nodes
    ]
    touched = {e[0] for e in edges} | {e[1] for e in edges}
    kept = [n for n in nodes.values() if n.node_id in touched or n.kind in ("token", "logit")]
    return Pruned(kept, edges)


def top_nodes(graph: Any, n: int = 10, kind: str | None = "feature") -> list[Node]:
    """The ``n`` nodes of ``kind`` (None: any but logits) with the most influence on the logits."""
    infl = node_influence(graph)
    *_, total = _layout(graph)
    nodes = [_node(graph, i, float(infl[i])) for i in range(total - len(graph.logit_targets))]
    if kind is not None:
        nodes = [x for x in nodes if x.kind == kind]
    return sorted(nodes, key=lambda x: -x.influence)[:n]


def _selected(graph: Any, node_ids: list[str]) -> torch.Tensor:
    """Indices of the feature nodes named by ``node_ids`` (JSON ids or ``L{layer}/F{index}``)."""
    n_feat = _layout(graph)[0]
    rows = graph.active_features[graph.selected_features[:n_feat]]  # [n_feat, 3] (layer, pos, index)
    keep = torch.zeros(n_feat, dtype=torch.bool)
    for ref in node_ids:
        m = FEATURE_REF.match(ref)
        if m:
            keep |= (rows[:, 0] == int(m.group(1))) & (rows[:, 2] == int(m.group(2)))
            continue
        parts = ref.split("_")
        if len(parts) != 3 or not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(
                f"{ref!r} is not a feature node id ('{{layer}}_{{feature}}_{{pos}}' or 'L7/F106')."
            )
        layer, feat, pos = (int(p) for p in parts)
        keep |= (rows[:, 0] == layer) & (rows[:, 2] == feat) & (rows[:, 1] == pos)
    return keep


def score_nodes(graph: Any, node_ids: list[str]) -> dict[str, float]:
    """How much of the output a set of feature nodes explains:

    - ``replacement``: circuit-tracer's replacement score with only these features kept, the
      others treated as error nodes (their inputs cut): the share of the logits' influence that
      reaches them from the tokens through the set alone (all features: the graph's own score);
    - ``influence``: the set's share of the graph's total node influence;
    - ``features``: how many feature nodes matched."""
    ct = _need_circuit_tracer()
    n_feat, err_end, tok_end, _ = _layout(graph)
    keep = _selected(graph, node_ids)
    A = ct.normalize_matrix(graph.adjacency_matrix.float().cpu())
    A[:n_feat][~keep] = 0.0  # an excluded feature becomes a source, like an error node
    infl = ct.compute_influence(A, _logit_weights(graph))
    tokens = infl[err_end:tok_end].sum()
    sources = tokens + infl[n_feat:err_end].sum() + infl[:n_feat][~keep].sum()
    share = node_influence(graph)[:n_feat][keep].sum()
    return {
        "replacement": float(tokens / sources.clamp_min(1e-12)),
        "influence": float(share),
        "features": int(keep.sum()),
    }


def top_predictions(graph: Any, tokenizer: Any | None = None) -> list[tuple[str, float, int]]:
    """The model's own next-token candidates the graph attributes: (text, probability, token id)."""
    out = []
    for t, p in zip(graph.logit_targets, graph.logit_probabilities.float().tolist()):
        text = t.token_str or (tokenizer.decode([t.vocab_idx]) if tokenizer is not None else str(t.vocab_idx))
        out.append((text, p, int(t.vocab_idx)))
    return out
