"""From a run to a traced circuit, on the tiny Llama: a CLT on layers [0, 2] of its 4 trains with
the circuit-tracer export and the feature examples at the end; scripts/trace.py traces a prompt
with circuit-tracer (printing its scores and top features) and writes graph files that
circuit-tracer's own local server serves, with the feature files its UI reads; without
circuit-tracer the script says how to install it."""

from __future__ import annotations

import importlib.util
import json
import sys
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("circuit_tracer")
from helpers import free_port

from torchtitan_clt.train import main as train_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# scripts/trace.py by path: "import trace" could be the standard library's module.
_spec = importlib.util.spec_from_file_location("tclt_trace_script", ROOT / "scripts" / "trace.py")
trace_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trace_script)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trace_run")
    rc = train_main(
        [
            "--config", str(ROOT / "train_configs/debug_model.toml"),
            f"--job.dump_folder={out}", "--job.name=tiny",
            "--data.layers=[0, 2]", "--training.steps=10", "--data.prefetch=false",
            "--checkpoint.export_circuit_tracer=true", "--checkpoint.interval=10",
            "--eval.feature_examples_tokens=512", "--eval.batch_size=4",
        ]
    )  # fmt: skip
    assert rc == 0
    return out / "tiny"


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read()


def test_run_writes_partial_export_and_features(run):
    from torchtitan_clt.checkpoint.circuit_tracer import read_config

    cfg = read_config(run / "circuit_tracer")
    assert cfg["layers"] == [0, 2] and cfg["uncovered_layers"] == [1, 3]
    assert len(list((run / "circuit_tracer").glob("W_enc_*.safetensors"))) == 4
    summary = json.loads((run / "features" / "summary.json").read_text())
    assert summary["fired"] > 0 and summary["layers"] == [0, 1, 2, 3]  # the export's own layers
    assert (run / "features" / "index.html").is_file()


@pytest.fixture(scope="module")
def traced(run, tmp_path_factory):
    """scripts/trace.py on one prompt: (its --out folder, its JSON line, its stdout)."""
    import contextlib
    import io
    import os

    tmp = tmp_path_factory.mktemp("traced")
    old = os.environ.get("TCLT_CACHE")
    os.environ["TCLT_CACHE"] = str(tmp / "cache")  # the tiny LLM's seeded weights
    out = tmp / "graphs"
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            rc = trace_script.main(
                [
                    str(run),
                    "--prompt",
                    "the cat sat on the",
                    "--out",
                    str(out),
                    "--json",
                    "--batch-size",
                    "64",
                    # the tiny random LLM's graph keeps no feature at the default 0.8 (its tokens
                    # explain most of the logits directly)
                    "--node-threshold",
                    "0.95",
                ]
            )
    finally:
        if old is None:
            os.environ.pop("TCLT_CACHE")
        else:
            os.environ["TCLT_CACHE"] = old
    assert rc == 0
    text = buf.getvalue()
    return out, json.loads(next(line for line in text.splitlines() if line.startswith("{"))), text


def test_trace_prints_scores_and_the_ui_serves_the_graph(run, traced):
    from circuit_tracer.frontend.feature_models import Model as FeatureModel
    from circuit_tracer.frontend.graph_models import Model as GraphModel

    from torchtitan_clt.tracing.serve import serve_local

    out, res, text = traced
    assert "replacement score" in text and "completeness score" in text and "layer " in text
    assert "the model predicts: " in text
    assert 0 < res["replacement_score"] <= 1 and 0 < res["completeness_score"] <= 1
    assert res["top_features"] and all(f["layer"] in (0, 2) for f in res["top_features"])  # covered only
    assert json.loads((out / "scores.json").read_text()) == [res]
    slug = res["slug"]
    doc = json.loads((out / f"{slug}.json").read_text())
    GraphModel(**doc)  # circuit-tracer's schema for the graph JSON
    assert doc["metadata"]["scan"] == trace_script.SCAN

    port = free_port()
    server = serve_local(out, port)  # circuit-tracer's handler, on 127.0.0.1 only
    try:
        assert server.httpd.server_address[0] == "127.0.0.1"
        base = f"http://127.0.0.1:{port}"
        status, body = _get(f"{base}/data/graph-metadata.json")
        assert status == 200 and slug in [g["slug"] for g in json.loads(body)["graphs"]]
        status, body = _get(f"{base}/graph_data/{slug}.json")
        assert status == 200 and json.loads(body)["metadata"]["slug"] == slug
        assert _get(f"{base}/index.html")[0] == 200
        # The UI fetches <scan>/<id>.json for a feature node: ./data/features/<id>.json.
        fid = res["top_features"][0]["id"]
        status, body = _get(f"{base}/data/features/{fid}.json")
        assert status == 200
        FeatureModel(**json.loads(body))
    finally:
        server.stop()


def test_without_circuit_tracer_it_says_how_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "circuit_tracer", None)  # import fails
    assert trace_script.main([str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o")]) == 3
    assert "pip install -e '.[trace]'" in capsys.readouterr().err


def test_graph_reopened_from_pt_prunes_to_the_json_and_scores(traced):
    """The whole graph saved beside the JSON: reopened and pruned at the JSON's thresholds it gives
    the JSON's node set; another threshold gives another one; scoring all features is circuit-
    tracer's replacement score, and the model's predictions are the graph's logit targets."""
    from circuit_tracer.graph import compute_graph_scores

    from torchtitan_clt.tracing import graphs

    out, res, _ = traced
    doc = json.loads((out / f"{res['slug']}.json").read_text())
    g = graphs.open_graph(out, res["slug"])
    kept = graphs.prune(g, doc["metadata"]["node_threshold"], 0.98)
    assert kept.node_ids == {n["node_id"] for n in doc["nodes"]}
    assert {(e["source"], e["target"]) for e in doc["links"]} == {(s, d) for s, d, _ in kept.edges}
    fewer = graphs.prune(g, 0.8, 0.98)
    n_feat = sum(n.kind == "feature" for n in kept.nodes)
    assert sum(n.kind == "feature" for n in fewer.nodes) < n_feat
    top = graphs.top_nodes(g, 5)
    assert top and all(a.influence >= b.influence for a, b in zip(top, top[1:]))
    assert [(f["layer"], f["index"], f["pos"]) for f in res["top_features"][:3]] == [
        (t.layer, t.feature, t.pos) for t in top[:3]
    ]
    replacement, _ = compute_graph_scores(g)
    every = [n.node_id for n in graphs.top_nodes(g, 10**6)]
    all_score = graphs.score_nodes(g, every)
    assert all_score["replacement"] == pytest.approx(replacement, rel=1e-4)
    assert all_score["features"] == len(g.selected_features)
    none_score = graphs.score_nodes(g, [])
    one = graphs.score_nodes(g, [f"L{top[0].layer}/F{top[0].feature}"])
    assert none_score["replacement"] <= one["replacement"] <= all_score["replacement"] + 1e-6
    assert 0 < one["influence"] < all_score["influence"] <= 1
    preds = graphs.top_predictions(g)
    assert [p[2] for p in preds] == [p[2] for p in res["predictions"]]  # token ids
    assert all(a[1] >= b[1] for a, b in zip(preds, preds[1:]))


def test_offline_graph_page_has_no_network_and_links_the_feature_browser(run, traced):
    import re

    out, res, _ = traced
    page = (out / f"{res['slug']}.html").read_text()
    assert "<svg" in page and res["prompt"] in page
    # nothing fetched: no external script, stylesheet, image or link (the SVG namespace is a name)
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script src" not in page
    links = re.findall(r'href="([^"#]+)#L(\d+)/F(\d+)"', page)
    assert links, "feature nodes link to the feature browser"
    for rel, layer, _ in links:
        assert (out / rel).resolve() == (run / "features" / "feature.html").resolve()
        assert int(layer) in (0, 2)


def test_every_feature_node_of_the_graph_json_has_its_label(run, traced):
    """circuit-tracer's UI names a node by its clerp: each transcoder node of the graph JSON whose
    feature fired in the run's feature pass carries that feature file's label."""
    out, res, _ = traced
    doc = json.loads((out / f"{res['slug']}.json").read_text())
    nodes = [n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"]
    fired = [n for n in nodes if (run / "features" / f"{n['feature']}.json").is_file()]
    assert fired, "the graph has features that fired in the feature pass"
    for n in fired:
        label = json.loads((run / "features" / f"{n['feature']}.json").read_text())["label"]
        assert label and n["clerp"] == label, n
