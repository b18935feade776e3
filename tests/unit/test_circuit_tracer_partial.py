"""Partial-layer circuit-tracer export: a CLT / PLT trained on some of the LLM's layers is written
over all of them. circuit-tracer's own loaders (load_clt, load_transcoder_set) must give our
reconstruction on the covered layers and exactly zero (no active feature) on the others."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from torchtitan_clt.checkpoint.circuit_tracer import export_circuit_tracer, read_config

ct_clt = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")
ct_plt = pytest.importorskip("circuit_tracer.transcoder.single_layer_transcoder")

N_LLM, COVERED, F, D = 6, [1, 2, 4], 10, 8


def build(family: str, act: str):
    model = tiny_model(family, act, L=len(COVERED), d=D, F=F, layers=COVERED, seed=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.b_enc.copy_(0.2 * torch.randn(model.b_enc.shape, generator=g))
        model.b_dec.copy_(0.3 * torch.randn(model.b_dec.shape, generator=g))
        model.set_standardization(
            torch.randn(len(COVERED), D, generator=g),
            0.5 + torch.rand(len(COVERED), D, generator=g),
            torch.randn(len(COVERED), D, generator=g),
            0.5 + torch.rand(len(COVERED), D, generator=g),
        )
    return model.eval()


def inputs(n: int = 50) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return 2.0 * torch.randn(N_LLM, n, D, generator=g)  # [all LLM layers, N, d] raw units


def expected(model, x_all: torch.Tensor):
    """Our activations and reconstruction placed at the covered layers: [N_LLM, N, F], [N_LLM, N, d]."""
    with torch.no_grad():
        acts = model.encode(x_all[COVERED].transpose(0, 1))  # [N, L, F]
        y = model.decode(acts)
    a_full = torch.zeros(N_LLM, x_all.shape[1], F)
    y_full = torch.zeros(N_LLM, x_all.shape[1], D)
    a_full[COVERED], y_full[COVERED] = acts.transpose(0, 1), y.transpose(0, 1)
    return a_full, y_full


def check_config(out):
    cfg = read_config(out)
    assert cfg["layers"] == COVERED
    assert cfg["uncovered_layers"] == [i for i in range(N_LLM) if i not in COVERED]
    return cfg


@pytest.mark.parametrize("act", ["jumprelu", "relu"])
def test_partial_clt_in_circuit_tracer(tmp_path, act):
    model = build("clt", act)
    with pytest.warns(UserWarning, match="never fire"):
        out = export_circuit_tracer(model, tmp_path / "ct", llm_n_layers=N_LLM)
    check_config(out)
    clt = ct_clt.load_clt(str(out), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    assert clt.n_layers == N_LLM and clt.d_transcoder == F
    x = inputs()
    a_exp, y_exp = expected(model, x)
    with torch.no_grad():
        a_ct = clt.encode(x)  # [N_LLM, N, F]
        torch.testing.assert_close(a_ct, a_exp, atol=1e-4, rtol=1e-4)
        assert (a_ct[COVERED] > 0).any()
        uncovered = [i for i in range(N_LLM) if i not in COVERED]
        assert torch.equal(a_ct[uncovered], torch.zeros_like(a_ct[uncovered]))  # never fire
        y_ct = clt(x)
    torch.testing.assert_close(y_ct, y_exp, atol=1e-4, rtol=1e-4)
    assert torch.equal(y_ct[uncovered], torch.zeros_like(y_ct[uncovered]))


@pytest.mark.parametrize("act", ["jumprelu", "batchtopk"])
def test_partial_plt_in_circuit_tracer(tmp_path, act):
    model = build("plt", act)
    if act == "batchtopk":
        model.train()
        model.encode(torch.randn(64, len(COVERED), D))  # track an inference threshold
        model.eval()
    with pytest.warns(UserWarning, match="never fire"):
        out = export_circuit_tracer(model, tmp_path / "ct", llm_n_layers=N_LLM)
    cfg = check_config(out)
    ts = ct_plt.load_transcoder_set(
        {i: str(out / f"layer_{i}.safetensors") for i in range(N_LLM)},
        scan="test",
        feature_input_hook=cfg["feature_input_hook"],
        feature_output_hook=cfg["feature_output_hook"],
        device=torch.device("cpu"),
        dtype=torch.float32,
        lazy_encoder=False,
        lazy_decoder=False,
    )
    assert len(ts) == N_LLM
    x = inputs()
    a_exp, y_exp = expected(model, x)
    with torch.no_grad():
        a_ct = ts.encode(x)
        torch.testing.assert_close(a_ct, a_exp, atol=1e-4, rtol=1e-4)
        assert (a_ct[COVERED] > 0).any()
        y_ct = ts.decode(a_ct, None)
    torch.testing.assert_close(y_ct, y_exp, atol=1e-4, rtol=1e-4)


def test_full_coverage_writes_no_note(tmp_path):
    model = tiny_model("clt", "relu", L=3, d=D, F=F, seed=1).eval()
    out = export_circuit_tracer(model, tmp_path / "ct", llm_n_layers=3)
    cfg = read_config(out)
    assert "uncovered_layers" not in cfg and len(list(out.glob("W_enc_*.safetensors"))) == 3
