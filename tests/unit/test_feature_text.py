"""scripts/features.py --text: a dictionary on your own text, against the LLM's own hidden states
(``output_hidden_states``: resid_post of layer l is hidden state l + 1) encoded by hand."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
import torch

from torchtitan_clt.checkpoint.export import export_native
from torchtitan_clt.protocols import model_registry
from torchtitan_clt.protocols.transcoder import TranscoderArgs

ROOT = Path(__file__).resolve().parents[2]
LLM = ROOT / "tests" / "assets" / "tiny_llama"
TEXT = "the keeper climbed the stairs every evening"


def _script():
    spec = importlib.util.spec_from_file_location("features_script", ROOT / "scripts" / "features.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    args = TranscoderArgs(
        family="clt",
        n_layers=2,
        d_in=64,
        d_out=64,
        features_per_layer=16,
        activation="relu",
        layers=[1, 2],  # LLM layers 1 and 2 of 4 (the last one's hidden state is normed)
        hook_in="resid_post",
        hook_out="resid_post",
        model_name="tiny_llama",
    )
    m = model_registry.get("clt").build_fn(args)
    m.init_weights(0)
    with torch.no_grad():
        m.b_enc.fill_(0.05)
    path = tmp_path_factory.mktemp("ft") / "export"
    export_native(m, path)
    return path


def reference(path: Path) -> tuple[list[str], torch.Tensor]:
    from torchtitan_clt.checkpoint.export import load_pretrained
    from torchtitan_clt.data.llm import load_llm
    from torchtitan_clt.data.tokenize import special_ids

    llm, tok = load_llm(str(LLM), "float32", "cpu")  # the asset has no weights: its seeded random build
    ids = [special_ids(tok)[0]] + tok(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hs = llm(torch.tensor([ids]), output_hidden_states=True).hidden_states
        x = torch.stack([hs[2][0, 1:], hs[3][0, 1:]], dim=1)  # [T-1, 2, d]: resid_post of layers 1, 2
        acts = load_pretrained(path, dtype=torch.float32).eval().encode(x)
    return [tok.decode([i]) for i in ids[1:]], acts


def test_text_top_features_and_one_feature(export):
    script = _script()
    out = io.StringIO()
    toks, acts, layers = script.features_on_text(export, TEXT, model=str(LLM), top=3, out=out)
    ref_toks, ref = reference(export)
    assert toks == ref_toks and layers == [1, 2]
    torch.testing.assert_close(acts, ref, rtol=1e-4, atol=1e-5)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(toks)
    v, n = ref[2].reshape(-1).topk(1)  # token 3's strongest feature is printed first
    assert f"L{layers[n // 16]}/F{int(n) % 16} {float(v):.2f}" in lines[2].split("|")[0]
    # One feature over the text: its activation on every token.
    out = io.StringIO()
    script.features_on_text(export, TEXT, feature="L2/F5", model=str(LLM), out=out)
    got = [
        float(line.split()[-2] if line.rstrip().endswith("#") else line.split()[-1])
        for line in out.getvalue().splitlines()
    ]
    assert got == pytest.approx(ref[:, 1, 5].tolist(), abs=1e-3)


@pytest.mark.parametrize("spec", ["L3/F1", "L1/F99", "seven"])
def test_bad_feature_refused_with_one_line(export, capsys, spec):
    code = _script().main([str(export), "--model", str(LLM), "--text", TEXT, "--feature", spec])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--feature" in err[0]


def test_encode_names_the_expected_shape():
    from helpers import tiny_model

    m = tiny_model("clt", "relu", L=3, d=8, F=4, seed=0)
    for bad in (torch.zeros(5, 8), torch.zeros(5, 2, 8), torch.zeros(5, 3, 7)):
        with pytest.raises(ValueError, match=r"encode takes x of shape \[N, n_layers=3, d_in=8\].*got \[5"):
            m.encode(bad)
    assert m.encode(torch.zeros(5, 3, 8)).shape == (5, 3, 4)
