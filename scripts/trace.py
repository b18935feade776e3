#!/usr/bin/env python
"""Trace a prompt with circuit-tracer: attribution graph, replacement / completeness scores.

  .venv/bin/python scripts/trace.py outputs/demo_smollm2_clt --prompt "To be or not to" --out graphs
  .venv/bin/python -m circuit_tracer start-server --graph_file_dir graphs     # then open
  http://localhost:8032/index.html

RUN_OR_EXPORT is a run folder (its ``circuit_tracer/``; a run without one is exported from its
latest checkpoint) or a circuit-tracer folder. The LLM is the run's ``data.model_path`` (a
``gguf:`` model through its cached safetensors conversion), or ``--model``. For each ``--prompt``
the graph JSON that circuit-tracer's local UI serves goes to ``--out`` (``<slug>.json`` and
``graph-metadata.json``), with the feature files of the graph's features copied from the run's
``features/`` (``scripts/features.py``) into ``--out/features/`` so the UI shows their examples.
The whole graph is kept as ``<slug>.pt`` (reopen it with ``torchtitan_clt.tracing.graphs``: prune
at another threshold, top nodes, score a node set) and ``<slug>.html`` shows the pruned graph
offline (no network; feature nodes link to the run's feature browser). Prints the model's top
predictions, the scores and the most influential features with their layers, and writes them to
``--out/scores.json``; ``--json`` adds a line of JSON per prompt. Needs circuit-tracer:
``pip install -e '.[trace]'`` (``scripts/setup.sh`` installs it).

circuit-tracer's own UI (``python -m circuit_tracer start-server``) loads its scripts from public
CDNs and listens on every interface; ``scripts/serve_graphs.py`` (or the command printed at the
end) serves it on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

INSTALL = (
    "scripts/trace.py needs circuit-tracer, an optional extra: pip install -e '.[trace]' "
    "(circuit-tracer==0.5.0 with nnsight==0.6.3; it needs transformers<=4.57.3)."
)
SCAN = "./data/features"  # where the UI looks for feature files: <served folder>/features/


def load_transcoders(folder: Path, device, dtype, stock: bool = False):
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    from torchtitan_clt.checkpoint.circuit_tracer import CLT_KIND, load_clt_skip, read_config

    cfg = read_config(folder)
    hooks = dict(feature_input_hook=cfg["feature_input_hook"], feature_output_hook=cfg["feature_output_hook"])
    if cfg["model_kind"] == CLT_KIND:
        clt = load_clt(str(folder), scan=SCAN, device=device, dtype=dtype, lazy_decoder=False, **hooks)
        return (clt if stock else load_clt_skip(clt, folder)), cfg
    paths = {int(p.stem.split("_")[1]): str(p) for p in folder.glob("layer_*.safetensors")}
    ts = load_transcoder_set(
        paths, scan=SCAN, device=device, dtype=dtype, lazy_encoder=False, lazy_decoder=False, **hooks
    )
    return ts, cfg


def top_features(graph, n: int, tokens: list[str]) -> list[dict]:
    """The ``n`` feature nodes of the (unpruned) graph with the most influence on the target
    logits (circuit-tracer's node influence: through all paths, weighted by logit probability)."""
    import torch
    from circuit_tracer.graph import compute_node_influence

    n_feat = len(graph.selected_features)
    if n_feat == 0:
        return []
    weights = torch.zeros(graph.adjacency_matrix.shape[0])
    weights[-len(graph.logit_targets) :] = graph.logit_probabilities.float().cpu()
    infl = compute_node_influence(graph.adjacency_matrix.float().cpu(), weights)
    share = infl[:n_feat] / infl.sum().clamp(min=1e-12)
    out = []
    for k in share.argsort(descending=True)[:n].tolist():
        row = int(graph.selected_features[k])
        layer, pos, index = (int(v) for v in graph.active_features[row].tolist())
        out.append(
            {
                "layer": layer,
                "index": index,
                "id": (layer + index) * (layer + index + 1) // 2 + index,
                "pos": pos,
                "token": tokens[pos] if pos < len(tokens) else "",
                "activation": round(float(graph.activation_values[row]), 3),
                "influence": round(float(share[k]), 4),
            }
        )
    return out


def copy_features(graph_json: Path, features: Path | None, out: Path, extra: list[int]) -> int:
    """Copy the feature files of the graph's feature nodes and of ``extra`` ids (when the run has
    them) into ``out/features``; returns how many."""
    if features is None or not features.is_dir():
        return 0
    doc = json.loads(graph_json.read_text())
    ids = {d["feature"] for d in doc["nodes"] if d["feature_type"] == "cross layer transcoder"} | set(extra)
    dest = out / "features"
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    for i in sorted(ids):
        src = features / f"{i}.json"
        if src.is_file():
            shutil.copyfile(src, dest / src.name)
            n += 1
    from torchtitan_clt.metrics.feature_files import label_graph_nodes

    label_graph_nodes(graph_json, features)  # each feature node's clerp: its label (the UI's name)
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_OR_EXPORT")
    p.add_argument("--prompt", action="append", required=True, help="text to trace (repeatable)")
    p.add_argument("--out", required=True, help="folder for the graph files (the UI's --graph_file_dir)")
    p.add_argument("--slug", default=None, help="graph name (default: <job>-<n>)")
    p.add_argument("--model", default=None, help="LLM (default: the run's data.model_path)")
    p.add_argument("--max-feature-nodes", type=int, default=4096)
    p.add_argument("--max-n-logits", type=int, default=10)
    p.add_argument("--desired-logit-prob", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=256, help="attribution backward batch")
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    p.add_argument("--top", type=int, default=10, help="features printed per prompt")
    p.add_argument("--json", action="store_true", help="also print one JSON line per prompt")
    p.add_argument(
        "--stock-load",
        action="store_true",
        help="load the CLT as circuit-tracer's stock load_clt does (no W_skip: what a Hub user of a "
        "skip CLT traces), to compare its scores with the run's model",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("circuit_tracer", "httpx", "nnsight"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        import circuit_tracer  # noqa: F401
    except ImportError:
        print(INSTALL, file=sys.stderr)
        return 3

    import torch
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import compute_graph_scores
    from circuit_tracer.utils.create_graph_files import create_graph_files

    from torchtitan_clt.checkpoint.run_inputs import circuit_tracer_folder, find_run, hf_folder, run_config
    from torchtitan_clt.config.manager import ConfigError
    from torchtitan_clt.tracing.graph_html import write_graph_html
    from torchtitan_clt.tracing.graphs import prune, top_predictions

    try:
        folder = circuit_tracer_folder(a.path)
        if folder is None:
            from export import export_checkpoint

            folder = Path(export_checkpoint(a.path, fmt="circuit_tracer")["circuit_tracer"])
        run = find_run(folder) or find_run(a.path)
        cfg = run_config(run, a.model)
        llm_dir = hf_folder(cfg.data.model_path)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"trace: {e}", file=sys.stderr)
        return 2
    device, dtype = torch.device("cpu"), torch.float32
    if torch.cuda.is_available():
        device = torch.device("cuda")
    t0 = time.perf_counter()
    transcoders, ct_cfg = load_transcoders(folder, device, dtype, a.stock_load)
    if ct_cfg.get("skip_connection"):
        print(
            "note: this CLT has a skip path; "
            + (
                "--stock-load leaves it out (circuit-tracer's own loaders do)"
                if a.stock_load
                else "it is attached with load_clt_skip (circuit-tracer's stock load_clt does not read it)"
            )
        )
    model = ReplacementModel.from_pretrained_and_transcoders(
        llm_dir, transcoders, backend="nnsight", device=device, dtype=dtype
    )
    print(f"loaded {llm_dir} with {folder} in {time.perf_counter() - t0:.1f} s")
    if ct_cfg.get("uncovered_layers"):
        print(f"note: layers {ct_cfg['uncovered_layers']} have no features (their MLPs are error nodes)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    features = (run / "features") if run is not None else None
    base = a.slug or (run.name if run is not None else "graph")
    results = []
    for n, prompt in enumerate(a.prompt):
        t1 = time.perf_counter()
        graph = attribute(
            prompt,
            model,
            max_n_logits=a.max_n_logits,
            desired_logit_prob=a.desired_logit_prob,
            batch_size=a.batch_size,
            max_feature_nodes=a.max_feature_nodes,
        )
        replacement, completeness = compute_graph_scores(graph)
        slug = base if len(a.prompt) == 1 else f"{base}-{n + 1}"
        graph.to("cpu")
        graph.to_pt(str(out / f"{slug}.pt"))  # whole: reopen with torchtitan_clt.tracing.graphs
        create_graph_files(
            graph,
            slug,
            output_path=str(out),
            scan=SCAN,
            node_threshold=a.node_threshold,
            edge_threshold=a.edge_threshold,
        )
        tokens = json.loads((out / f"{slug}.json").read_text())["metadata"]["prompt_tokens"]
        top = top_features(graph, a.top, tokens)
        copied = copy_features(out / f"{slug}.json", features, out, [f["id"] for f in top])
        predictions = [(t, round(p, 4), v) for t, p, v in top_predictions(graph, model.tokenizer)]
        write_graph_html(
            out / f"{slug}.html",
            prune(graph, a.node_threshold, a.edge_threshold),
            tokens,
            prompt,
            predictions,
            n_layers=graph.cfg.n_layers,
            features=features,
            scores=(replacement, completeness),
        )
        res = {
            "prompt": prompt,
            "slug": slug,
            "replacement_score": round(replacement, 4),
            "completeness_score": round(completeness, 4),
            "active_features": int(graph.active_features.shape[0]),
            "graph_features": int(len(graph.selected_features)),
            "feature_files": copied,
            "seconds": round(time.perf_counter() - t1, 1),
            "predictions": predictions,
            "graph_pt": str(out / f"{slug}.pt"),
            "graph_html": str(out / f"{slug}.html"),
            "top_features": top,
        }
        results.append(res)
        print(f"\n[{slug}] {prompt!r}")
        print("  the model predicts: " + ", ".join(f"{t!r} {p:.3f}" for t, p, _ in predictions[:5]))
        print(
            f"  replacement score {replacement:.4f}   completeness score {completeness:.4f}   "
            f"({res['active_features']} active features, {res['graph_features']} in the graph, "
            f"{res['seconds']} s)\n  top features by influence on the output:"
        )
        for f in top:
            print(
                f"  layer {f['layer']:>2}  feature {f['index']:>5}  at {f['token']!r:<14} "
                f"act {f['activation']:>7.3f}  influence {f['influence']:.3f}"
            )
        if a.json:
            print(json.dumps(res))
    # The scores beside the graphs, so a run's numbers outlive the terminal.
    (out / "scores.json").write_text(json.dumps(results, indent=1))
    print(
        f"\ngraph files in {out}: open {out}/<slug>.html in a browser (offline), reopen <slug>.pt with "
        f"torchtitan_clt.tracing.graphs, or serve circuit-tracer's UI on this machine only with\n  "
        f"{sys.executable} scripts/serve_graphs.py {out}\nand open http://127.0.0.1:8032/index.html "
        "(its page loads d3 and its scripts from public CDNs)"
        + (
            ""
            if features and features.is_dir()
            else "\n(no features/ in the run: scripts/features.py writes them)"
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
