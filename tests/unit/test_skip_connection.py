"""``model.skip_connection``: ŷ_l = features' write + b_dec,l + x_l W_skip,l.

Checked against float64 hand computations (forward on the sparse and dense paths, the W_skip
gradient in closed form, folding), a zero start (the same outputs as the plain model), the config
refusals, and every export read back by its consumer (native, circuit-tracer CLT and PLT, sae-lens).
The splice (closed-loop CE) is checked in ``test_eval.py``; dp/tp in ``test_parallel_families.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_model

import torchtitan_clt
from torchtitan_clt import kernels
from torchtitan_clt.checkpoint.circuit_tracer import export_circuit_tracer, load_circuit_tracer, load_clt_skip
from torchtitan_clt.checkpoint.export import export_native
from torchtitan_clt.config.job_config import JobConfig
from torchtitan_clt.config.manager import ConfigError, load_config, validate
from torchtitan_clt.protocols.transcoder import skip_connection_of

L, D, F = 3, 6, 16
FAMILIES = ["clt", "plt", "matryoshka_clt"]


def skip_model(family="clt", act="topk", d_out=D, seed=0, dtype=torch.float64):
    m = tiny_model(family, act, L=L, d=D, F=F, d_out=d_out, skip_connection=True, seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        m.W_skip.copy_(0.3 * torch.randn(m.W_skip.shape, generator=g, dtype=dtype))
        m.b_dec.copy_(0.1 * torch.randn(m.b_dec.shape, generator=g, dtype=dtype))
        m.b_enc.copy_(0.1 * torch.randn(m.b_enc.shape, generator=g, dtype=dtype))
    m.set_standardization(
        torch.randn(L, D, generator=g),
        0.5 + torch.rand(L, D, generator=g),
        torch.randn(L, d_out, generator=g),
        0.5 + torch.rand(L, d_out, generator=g),
    )
    return m


def raw_x(n=24, seed=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(n, L, D, generator=g) + 0.5).to(dtype)


def by_hand(m, x):
    """ŷ raw = σ' (decode_std(a) + Σ_d xs_d W_skip[l, d, :]) + μ', xs = (x − μ)/σ, in float64."""
    xs = (x - m.in_mean.double()) / m.in_scale.double()
    a = m.encode(x)
    skip = torch.einsum("nld,lde->nle", xs, m.W_skip.double())
    return (m.decode_std(a).double() + skip) * m.out_scale.double() + m.out_mean.double()


@pytest.fixture
def density():
    before = copy.copy(kernels.options())
    yield lambda t: kernels.configure(sparse_density_threshold=t)
    kernels.configure(before.backend, before.sparse_density_threshold)


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("act", ["topk", "relu"])
def test_forward_adds_the_skip_path(family, act, path, density):
    if family == "matryoshka_clt" and act == "relu":
        pytest.skip("matryoshka_clt takes fixed-budget activations only")
    density(1.0 if path == "sparse" else 0.0)
    m = skip_model(family, act, d_out=D + 2)  # d_in != d_out: W_skip is [L, d_in, d_out]
    assert tuple(m.W_skip.shape) == (L, D, D + 2)
    x = raw_x()
    with torch.no_grad():
        ref = by_hand(m.eval(), x)
        torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)
        # decode(acts, x) adds it; features_only is what the features and the bias write alone;
        # decode(acts) would silently drop it, so it is refused.
        a = m.encode(x)
        torch.testing.assert_close(m.decode(a, x), ref, rtol=1e-12, atol=1e-12)
        plain = m.unstandardize_out(m.decode_std(a))
        torch.testing.assert_close(m.decode(a, features_only=True), plain, rtol=0, atol=0)
        assert (ref - plain).abs().max() > 0.1
        with pytest.raises(ValueError, match=r"skip path .* model.decode\(acts, x\)"):
            m.decode(a)
        # The training forward (the sparse step for TopK) gives the same ŷ.
        m.train()
        if family != "matryoshka_clt" and act == "topk":  # the path asked for is the one taken
            assert (m.sparse_selection() is not None) == (path == "sparse")
        out = m.forward_std(m.standardize_in(x))
        torch.testing.assert_close(m.unstandardize_out(out.y_hat), ref, rtol=1e-10, atol=1e-10)
        xs = m.standardize_in(x)
        torch.testing.assert_close(m.reconstruct_std(out.acts, xs), out.y_hat, rtol=1e-12, atol=1e-12)


def test_skip_gradient_in_closed_form():
    """Loss ½‖ŷ − y‖² (standardized): ∂/∂W_skip[l] = xs_lᵀ (ŷ_l − y_l), summed over rows."""
    m = skip_model("clt", "topk").train()
    x = raw_x()
    xs = m.standardize_in(x)
    y = torch.randn(x.shape[0], L, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    out = m.forward_std(xs)
    (0.5 * (out.y_hat - y).pow(2).sum()).backward()
    want = torch.einsum("nld,nle->lde", xs, (out.y_hat - y).detach())
    torch.testing.assert_close(m.W_skip.grad, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_start_is_the_plain_model(family):
    a = tiny_model(family, "topk", L=L, d=D, F=F, seed=4)
    b = tiny_model(family, "topk", L=L, d=D, F=F, seed=4, skip_connection=True)
    assert bool((b.W_skip == 0).all())
    x = raw_x(dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_keeps_raw_outputs(family):
    m = skip_model(family, "topk" if family == "matryoshka_clt" else "relu").eval()
    x = raw_x()
    folded = copy.deepcopy(m)
    folded.fold_standardization()
    assert bool((folded.in_scale == 1).all()) and bool((folded.out_mean == 0).all())
    with torch.no_grad():
        # The fold computes in fp32: exact to fp32 rounding.
        torch.testing.assert_close(folded(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sae", "molt"])
def test_refused_where_it_has_no_meaning(family):
    cfg = JobConfig()
    cfg.model.name = family
    cfg.model.skip_connection = "true"
    with pytest.raises(ConfigError, match="skip_connection is for clt, matryoshka_clt, plt"):
        validate(cfg)
    cfg.model.skip_connection = "auto"  # the default: off for these families
    validate(cfg)
    assert not skip_connection_of(cfg.model)


def test_auto_is_on_for_transcoders_and_toml_booleans_work(tmp_path):
    toml = tmp_path / "job.toml"
    toml.write_text("[model]\nname = 'plt'\nskip_connection = false\n")
    assert load_config(["--job.config_file", str(toml)]).model.skip_connection == "false"
    for family in ("clt", "matryoshka_clt", "plt"):
        cfg = JobConfig()
        cfg.model.name = family
        assert skip_connection_of(cfg.model)


@pytest.mark.parametrize("family", ["clt", "plt"])
def test_native_export_round_trip(tmp_path, family):
    m = skip_model(family, "relu", dtype=torch.float32).eval()
    export_native(m, tmp_path / "export")
    back = torchtitan_clt.load_pretrained(tmp_path / "export")
    assert back.args.skip_connection and back.W_skip is not None
    x = raw_x(dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), rtol=1e-5, atol=1e-5)


ct_clt = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")
ct_plt = pytest.importorskip("circuit_tracer.transcoder.single_layer_transcoder")


def test_circuit_tracer_clt_runs_the_skip_path(tmp_path):
    m = skip_model("clt", "relu", dtype=torch.float32).eval()
    out = export_circuit_tracer(m, tmp_path / "ct")
    x = raw_x(dtype=torch.float32)
    with torch.no_grad():
        want = m(x).transpose(0, 1)  # [L, N, d]
        clt = ct_clt.load_clt(str(out), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
        assert clt.W_skip is None  # circuit-tracer 0.5's loader leaves it out ...
        assert (clt(x.transpose(0, 1)) - want).abs().max() > 0.1
        clt = load_clt_skip(clt, out)  # ... and load_clt_skip puts it back
        assert clt.skip_connection
        X = x.transpose(0, 1)
        torch.testing.assert_close(clt.decode(clt.encode(X).to_sparse(), X), want, rtol=1e-4, atol=1e-4)
        # What attribution reads (its forward() omits input_acts in 0.5.0; tracing does not use it).
        parts = clt.compute_attribution_components(X, zero_positions=slice(0, 0))
        torch.testing.assert_close(parts["reconstruction"], want, rtol=1e-4, atol=1e-4)
        # Raw units: x (S/σ) σ' (the −μ/σ part went into b_dec).
        raw_skip = (x[:, 1] / m.in_scale[1]) @ m.W_skip[1] * m.out_scale[1]
        torch.testing.assert_close(clt.compute_skip(1, x[:, 1]), raw_skip, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(load_circuit_tracer(out)(x), m(x), rtol=1e-4, atol=1e-4)


def test_circuit_tracer_plt_set_runs_the_skip_path(tmp_path):
    m = skip_model("plt", "relu", dtype=torch.float32).eval()
    m.args.hook_in = "mlp_in"
    out = export_circuit_tracer(m, tmp_path / "ct")
    x = raw_x(dtype=torch.float32)
    paths = {i: str(out / f"layer_{i}.safetensors") for i in range(L)}
    ts = ct_plt.load_transcoder_set(
        paths,
        scan="test",
        feature_input_hook="mlp.hook_in",
        feature_output_hook="hook_mlp_out",
        device=torch.device("cpu"),
        dtype=torch.float32,
        lazy_encoder=False,
        lazy_decoder=False,
    )
    assert ts.skip_connection
    with torch.no_grad():
        a = ts.encode(x.transpose(0, 1))
        got = ts.decode(a, x.transpose(0, 1))
        torch.testing.assert_close(got, m(x).transpose(0, 1), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(load_circuit_tracer(out)(x), m(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act,arch", [("relu", "skip_transcoder"), ("jumprelu", "jumprelu_skip_transcoder")])
def test_sae_lens_loads_a_skip_transcoder(tmp_path, act, arch):
    sae_lens = pytest.importorskip("sae_lens")
    from torchtitan_clt.checkpoint.saelens import export_saelens

    m = skip_model("plt", act, d_out=D + 2, dtype=torch.float32).eval()
    out = export_saelens(m, tmp_path / "saelens")
    x = raw_x(dtype=torch.float32)
    with torch.no_grad():
        y = m(x)
        for i in range(L):
            sl = sae_lens.Transcoder.load_from_disk(out / f"layer_{i}")
            assert sl.cfg.architecture() == arch
            torch.testing.assert_close(sl(x[:, i]), y[:, i], rtol=1e-4, atol=1e-4)
