"""From a run to a traced circuit, on the tiny Llama: a CLT on layers [0, 2] of its 4 trains with
the circuit-tracer export and the feature examples at the end; scripts/trace.py traces a prompt
with circuit-tracer (printing its scores and top features) and writes graph files that
circuit-tracer's own local server serves, with the feature files its UI reads; without
circuit-tracer the script says how to install it."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("circuit_tracer")
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


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


def test_trace_prints_scores_and_the_ui_serves_the_graph(run, tmp_path, monkeypatch, capsys):
    from circuit_tracer.frontend.feature_models import Model as FeatureModel
    from circuit_tracer.frontend.graph_models import Model as GraphModel
    from circuit_tracer.frontend.local_server import serve

    monkeypatch.setenv("TCLT_CACHE", str(tmp_path / "cache"))  # the tiny LLM's seeded weights
    out = tmp_path / "graphs"
    rc = trace_script.main(
        [str(run), "--prompt", "the cat sat on the", "--out", str(out), "--json", "--batch-size", "64"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "replacement score" in text and "completeness score" in text and "layer " in text
    res = json.loads(next(line for line in text.splitlines() if line.startswith("{")))
    assert 0 < res["replacement_score"] <= 1 and 0 < res["completeness_score"] <= 1
    assert res["top_features"] and all(f["layer"] in (0, 2) for f in res["top_features"])  # covered only
    assert json.loads((out / "scores.json").read_text()) == [res]
    slug = res["slug"]
    doc = json.loads((out / f"{slug}.json").read_text())
    GraphModel(**doc)  # circuit-tracer's schema for the graph JSON
    assert doc["metadata"]["scan"] == trace_script.SCAN

    port = _free_port()
    server = serve(data_dir=str(out), port=port)
    try:
        base = f"http://localhost:{port}"
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
    assert "pip install '.[trace]'" in capsys.readouterr().err
