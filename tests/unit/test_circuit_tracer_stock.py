"""One model whichever way it is loaded (issue 30): circuit-tracer 0.5.0's stock ``load_clt`` of our
export reproduces ``load_pretrained`` to 1e-4 when the CLT has no skip path; with one, the stock
load is the features-only model, and the export says so (warning, config.yaml, conversion.json
with the FVU it loses, recomputed here from circuit-tracer's own outputs) and ``load_clt_skip``
restores the model to 1e-4."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from torchtitan_clt import load_pretrained
from torchtitan_clt.checkpoint.circuit_tracer import (
    export_circuit_tracer,
    load_clt_skip,
    read_config,
    stock_load_of,
)
from torchtitan_clt.checkpoint.plain import folded_cpu_copy
from torchtitan_clt.protocols.registry import model_registry
from torchtitan_clt.protocols.transcoder import TranscoderArgs

ct_clt = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")

L, F, D = 3, 24, 8


def build(skip: bool, seed: int = 0):
    args = TranscoderArgs(
        family="clt",
        n_layers=L,
        d_in=D,
        d_out=D,
        features_per_layer=F,
        activation="jumprelu",
        model_name="tiny-llama",
        hook_in="resid_mid",
        hook_out="mlp_out",
        layers=list(range(L)),
        skip_connection=skip,
    )
    model = model_registry.get("clt").build_fn(args)
    model.init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.b_enc.copy_(0.1 * torch.randn(model.b_enc.shape, generator=g))
        model.activation.log_threshold.copy_(torch.log(0.02 + 0.05 * torch.rand(L, F, generator=g)))
        if skip:
            model.W_skip.copy_(0.3 * torch.randn(model.W_skip.shape, generator=g))
        model.set_standardization(
            torch.randn(L, D, generator=g),
            0.5 + torch.rand(L, D, generator=g),
            torch.randn(L, D, generator=g),
            0.5 + torch.rand(L, D, generator=g),
        )
    return model.eval()


def rows(model, n=256, seed=3):
    """(x, y) with y = the model's output plus noise: a target the skip path explains."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L, D, generator=g) * 2.0 + 0.5
    with torch.no_grad():
        y = model(x) + 0.3 * torch.randn(n, L, D, generator=g)
    return [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]


def stock(folder):
    return ct_clt.load_clt(str(folder), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)


def ct_out(clt, x):
    """circuit-tracer's reconstruction [N, L, d] (its forward cannot run a skip path: decode(x))."""
    xt = x.transpose(0, 1)
    with torch.no_grad():
        return clt.decode(clt.encode(xt).to_sparse(), xt if clt.W_skip is not None else None).transpose(0, 1)


def fvu(y, y_hat):
    y, y_hat = y.double(), y_hat.double()
    per = (y - y_hat).pow(2).sum((0, 2)) / (y - y.mean(0)).pow(2).sum((0, 2))
    return float(per.mean())


def test_stock_load_without_skip_is_our_model(tmp_path):
    model = build(skip=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        out = export_circuit_tracer(model, tmp_path / "ct", calibration=rows(model))
    assert "skip_connection" not in read_config(out) and not (out / "conversion.json").exists()
    x = rows(model, 64, seed=9)[0][0]
    ours = load_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(ct_out(stock(out), x), ours(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ct_out(stock(out), x), model(x), atol=1e-4, rtol=1e-4)


def test_stock_load_of_a_skip_clt_is_warned_with_what_it_loses(tmp_path):
    model = build(skip=True)
    calib = rows(model)
    with pytest.warns(UserWarning, match="load_clt_skip"):
        out = export_circuit_tracer(model, tmp_path / "ct", calibration=calib)
    cfg = read_config(out)
    assert cfg["skip_connection"] is True and cfg["stock_load_clt_reads_skip"] is False
    note = stock_load_of(json.loads((out / "conversion.json").read_text()))
    assert "load_clt_skip" in note["fix"] and note["tokens"] == 256

    x = torch.cat([b[0] for b in calib])
    y = torch.cat([b[1] for b in calib])
    plain = stock(out)
    assert plain.W_skip is None  # circuit-tracer 0.5.0 never reads W_skip_{l}
    fixed = load_clt_skip(stock(out), out)
    ours = load_pretrained(out)
    with torch.no_grad():
        # the fix reproduces our loader (and the trained model) to 1e-4
        torch.testing.assert_close(ct_out(fixed, x), ours(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ct_out(fixed, x), model(x), atol=1e-4, rtol=1e-4)
        # the stock load is the exported (folded) model's features-only part
        folded = folded_cpu_copy(model)
        features_only = folded.decode(folded.encode(x), features_only=True)
        torch.testing.assert_close(ct_out(plain, x), features_only, atol=1e-4, rtol=1e-4)
    # The numbers in conversion.json are circuit-tracer's own, recomputed independently.
    assert note["fvu"] == pytest.approx(fvu(y, ct_out(plain, x)), rel=1e-4)
    assert note["fvu_with_skip"] == pytest.approx(fvu(y, ct_out(fixed, x)), rel=1e-4)
    assert note["fvu"] > note["fvu_with_skip"] + 0.1  # the skip path matters here


def test_model_card_says_what_a_stock_load_loses_and_names_the_hub_llm(tmp_path):
    from torchtitan_clt.checkpoint.export import export_native
    from torchtitan_clt.checkpoint.model_card import render_model_card

    model = build(skip=True)
    model.args.model_name = "SmolLM2-135M-Instruct.Q4_1"  # what a gguf: model_path gives
    run = tmp_path / "run"
    export_native(model, run / "export")
    with pytest.warns(UserWarning, match="load_clt_skip"):
        export_circuit_tracer(model, run / "circuit_tracer", calibration=rows(model))
    note = stock_load_of(json.loads((run / "circuit_tracer" / "conversion.json").read_text()))
    files = ["config.json", "circuit_tracer/config.yaml"]
    card = render_model_card(run, "org/tiny-clt", files)
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert 'from_pretrained_and_transcoders("HuggingFaceTB/SmolLM2-135M-Instruct", clt' in card
    assert "clt = load_clt_skip(load_clt(folder, lazy_decoder=False), folder)" in card
    assert f"{note['fvu']:.4f} without the skip path against {note['fvu_with_skip']:.4f}" in card
    assert "Q4_1" in card and "full-precision" in card  # says the traced LLM is not the exact one
