"""scripts/eval.py on a native export and on the circuit-tracer export of the same CLT."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from torchtitan_clt.checkpoint.circuit_tracer import export_circuit_tracer
from torchtitan_clt.checkpoint.export import export_native
from torchtitan_clt.protocols import model_registry
from torchtitan_clt.protocols.transcoder import TranscoderArgs

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets"


def _script():
    spec = importlib.util.spec_from_file_location("eval_script", ROOT / "scripts" / "eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _text(path: Path) -> Path:
    # 200 documents: the held-out ones (index % 100 == 99) are 99 and 199.
    words = "the keeper climbed stairs every evening counting steps while gulls sat along walls".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(80)) for i in range(200)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def test_eval_script_native_and_circuit_tracer_agree(tmp_path, capsys):
    args = TranscoderArgs(
        family="clt",
        n_layers=4,
        d_in=64,
        d_out=64,
        features_per_layer=16,
        activation="relu",
        layers=[0, 1, 2, 3],
        model_name="tiny_llama",
    )
    m = model_registry.get("clt").build_fn(args)
    m.init_weights(0)
    with torch.no_grad():
        m.b_enc.fill_(0.05)
    export_native(m, tmp_path / "export")
    export_circuit_tracer(m, tmp_path / "ct")
    text = _text(tmp_path / "docs.txt")
    script = _script()
    common = [
        "--model",
        str(ASSETS / "tiny_llama"),
        "--data",
        str(text),
        "--tokens",
        "32",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--device",
        "cpu",
        "--no-open-loop",
    ]
    heads = {}
    for name in ("export", "ct"):
        out = tmp_path / f"report_{name}"
        assert script.main([str(tmp_path / name), *common, "--out", str(out)]) == 0
        doc = json.loads((out / "eval.json").read_text())
        heads[name] = doc["headline"]
        assert (out / "density_histogram.png").is_file()
        assert (out / "decoder_norm_by_offset.png").is_file()
        assert "open_loop" not in doc["replacement"]
    assert heads["export"]["tokens_scored"] == 2 * 14
    # The honest count, said before the work: 32 asked, one batch of 2 x 16 = 32 read, 30 scored.
    out = capsys.readouterr().out
    assert "1 batch(es) of 2 x 16 tokens: 32 tokens read, 30 scored (BOS excluded), for 32 asked." in out
    assert "Evaluating (1 batch(es)" in out and out.index("Held-out text") < out.index("Evaluating")
    for k, v in heads["export"].items():
        assert heads["ct"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_eval_script_needs_model_outside_a_run(tmp_path, capsys):
    assert _script().main([str(tmp_path)]) == 2
    assert "--model is required" in capsys.readouterr().err


def test_eval_script_says_when_tokens_are_rounded():
    """Hand-worked: 33 asked of batches of 2 x 16 -> 2 batches, 64 read, 60 scored, rounded up."""
    batches = [torch.zeros(2, 16, dtype=torch.long)] * 2
    msg = _script().describe_tokens(batches, 33)
    assert msg.startswith(
        "2 batch(es) of 2 x 16 tokens: 64 tokens read, 60 scored (BOS excluded), for 33 asked"
    )
    assert "rounded up to whole batches; --tokens 64 reads exactly this" in msg
    assert "held-out text ended" in _script().describe_tokens(batches, 100)
