"""circuit-tracer export: its own loaders (load_clt, load_transcoder_set, the config.yaml dispatch)
read our CLT / PLT folders and reproduce our encode / decode on fresh inputs; refusals; round trip."""

from __future__ import annotations

import warnings

import pytest
import torch

from torchtitan_clt.checkpoint.circuit_tracer import (
    CircuitTracerExportError,
    check_exportable,
    export_circuit_tracer,
    is_circuit_tracer_folder,
    load_circuit_tracer,
    read_config,
)
from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.protocols.registry import model_registry
from torchtitan_clt.protocols.transcoder import TranscoderArgs

ct_clt = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")
ct_plt = pytest.importorskip("circuit_tracer.transcoder.single_layer_transcoder")
ct_cache = pytest.importorskip("circuit_tracer.utils.caching")

L, F, D = 3, 24, 8


def build(family="clt", activation="jumprelu", layers=None, hook_in="resid_mid", hook_out="mlp_out", seed=0):
    args = TranscoderArgs(
        family=family,
        n_layers=L,
        d_in=D,
        d_out=D,
        features_per_layer=F,
        activation=activation,
        k=4,
        model_name="tiny-llama",
        hook_in=hook_in,
        hook_out=hook_out,
        layers=list(range(L)) if layers is None else layers,
    )
    model = model_registry.get(family).build_fn(args)
    model.init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # Non-trivial biases, thresholds and standardization, so that folding is exercised.
        model.b_enc.copy_(0.1 * torch.randn(model.b_enc.shape, generator=g))
        model.b_dec.copy_(0.1 * torch.randn(model.b_dec.shape, generator=g))
        if hasattr(model.activation, "log_threshold"):
            model.activation.log_threshold.copy_(
                torch.log(0.02 + 0.05 * torch.rand(model.activation.log_threshold.shape, generator=g))
            )
        model.set_standardization(
            torch.randn(L, D, generator=g),
            0.5 + torch.rand(L, D, generator=g),
            torch.randn(L, D, generator=g),
            0.5 + torch.rand(L, D, generator=g),
        )
    if activation in ("topk", "batchtopk"):
        model.train()
        for _ in range(3):  # the inference threshold is tracked in training mode
            model.encode(torch.randn(64, L, D, generator=g))
    return model.eval()


def fresh_x(n=40, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, D, generator=g) * 2.0 + 0.5  # [N, L, d] raw units


def ours(model, x):
    with torch.no_grad():
        a = model.encode(x)  # [N, L, F]
        return a, model.decode(a)  # [N, L, d]


@pytest.mark.parametrize("activation", ["jumprelu", "relu", "batchtopk"])
def test_clt_loaded_by_circuit_tracer(tmp_path, activation):
    model = build("clt", activation)
    out = export_circuit_tracer(model, tmp_path / "ct")
    assert is_circuit_tracer_folder(out)
    cfg = read_config(out)
    assert cfg["model_kind"] == "cross_layer_transcoder"
    assert (cfg["feature_input_hook"], cfg["feature_output_hook"]) == ("hook_resid_mid", "hook_mlp_out")
    clt = ct_clt.load_clt(str(out), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    assert clt.n_layers == L and clt.d_transcoder == F and clt.d_model == D
    x = fresh_x()
    a, y = ours(model, x)
    with torch.no_grad():
        a_ct = clt.encode(x.transpose(0, 1))  # [L, N, F]
        torch.testing.assert_close(a_ct, a.transpose(0, 1), atol=1e-4, rtol=1e-4)
        assert (a_ct > 0).sum() > 0 and (a_ct == 0).sum() > 0  # sparse, not trivially zero
        y_ct = clt.decode(a_ct.to_sparse())
        torch.testing.assert_close(y_ct, y.transpose(0, 1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(clt(x.transpose(0, 1)), y.transpose(0, 1), atol=1e-4, rtol=1e-4)
    # The same folder through circuit-tracer's config.yaml dispatch (its local cache loader).
    loaded, config = ct_cache.load_transcoders_from_cache(
        "ct", cache_dir=tmp_path, device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False
    )
    assert isinstance(loaded, ct_clt.CrossLayerTranscoder) and config["model_name"] == "tiny-llama"
    # Lazy decoding reads our files slice by slice.
    lazy = ct_clt.load_clt(str(out), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=True)
    with torch.no_grad():
        torch.testing.assert_close(lazy(x.transpose(0, 1)), y.transpose(0, 1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("activation", ["jumprelu", "relu", "batchtopk"])
def test_plt_set_loaded_by_circuit_tracer(tmp_path, activation):
    model = build("plt", activation, hook_in="mlp_in")
    out = export_circuit_tracer(model, tmp_path / "ct")
    cfg = read_config(out)
    assert cfg["model_kind"] == "transcoder_set" and cfg["feature_input_hook"] == "mlp.hook_in"
    paths = {i: str(out / f"layer_{i}.safetensors") for i in range(L)}
    ts = ct_plt.load_transcoder_set(
        paths,
        scan="test",
        feature_input_hook=cfg["feature_input_hook"],
        feature_output_hook=cfg["feature_output_hook"],
        device=torch.device("cpu"),
        dtype=torch.float32,
        lazy_encoder=False,
        lazy_decoder=False,
    )
    x = fresh_x()
    a, y = ours(model, x)
    with torch.no_grad():
        a_ct = ts.encode(x.transpose(0, 1))
        torch.testing.assert_close(a_ct, a.transpose(0, 1), atol=1e-4, rtol=1e-4)
        assert (a_ct > 0).any() and (a_ct == 0).any()
        torch.testing.assert_close(ts.decode(a_ct, None), y.transpose(0, 1), atol=1e-4, rtol=1e-4)
    loaded, _ = ct_cache.load_transcoders_from_cache(
        "ct",
        cache_dir=tmp_path,
        device=torch.device("cpu"),
        dtype=torch.float32,
        lazy_encoder=False,
        lazy_decoder=False,
    )
    assert isinstance(loaded, ct_plt.TranscoderSet) and len(loaded) == L


@pytest.mark.parametrize("family", ["clt", "plt"])
def test_round_trip_with_our_loader(tmp_path, family):
    model = build(family, "jumprelu")
    out = export_circuit_tracer(model, tmp_path / "ct")
    back = load_circuit_tracer(out)
    assert back.args.family == family and back.args.activation == "jumprelu"
    x = fresh_x(seed=11)
    a, y = ours(model, x)
    a2, y2 = ours(back, x)
    torch.testing.assert_close(a2, a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y2, y, atol=1e-4, rtol=1e-4)
    # The exported folder is itself standardization-free: re-export gives the same files' values.
    again = export_circuit_tracer(back, tmp_path / "ct2")
    a3, _ = ours(load_circuit_tracer(again), x)
    torch.testing.assert_close(a3, a, atol=1e-4, rtol=1e-4)


def test_bf16_export(tmp_path):
    model = build("clt", "jumprelu")
    out = export_circuit_tracer(model, tmp_path / "ct", dtype=torch.bfloat16)
    clt = ct_clt.load_clt(str(out), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    assert read_config(out)["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(out / "W_dec_0.safetensors"), "pt") as f:
        assert f.get_tensor("W_dec_0").dtype == torch.bfloat16
    x = fresh_x()
    _, y = ours(model, x)
    with torch.no_grad():
        y_ct = clt(x.transpose(0, 1))
    # bf16 weights: relative error of the reconstruction ~1e-2, far from an unrelated output.
    err = (y_ct - y.transpose(0, 1)).norm() / y.norm()
    assert err < 0.05


def test_topk_is_converted_with_a_warning(tmp_path):
    model = build("clt", "topk")
    with pytest.warns(UserWarning, match="approximation"):
        out = export_circuit_tracer(model, tmp_path / "ct")
    clt = ct_clt.load_clt(str(out), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    theta = model.activation.threshold  # [L] tracked
    x = fresh_x()
    with torch.no_grad():
        h = model.pre_acts(model.standardize_in(x))  # [N, L, F]
        expect = h * (h > theta[None, :, None])
        torch.testing.assert_close(
            clt.encode(x.transpose(0, 1)), expect.transpose(0, 1), atol=1e-4, rtol=1e-4
        )


def test_refusals(tmp_path):
    with pytest.raises(CircuitTracerExportError, match="covers layer 3"):
        export_circuit_tracer(build("clt", layers=[1, 2, 3]), tmp_path / "a", llm_n_layers=3)
    with pytest.raises(CircuitTracerExportError, match="increasing order"):
        export_circuit_tracer(build("clt", layers=[2, 1, 3]), tmp_path / "b", llm_n_layers=12)
    with pytest.raises(CircuitTracerExportError, match="same hook"):
        export_circuit_tracer(build("plt", hook_in="resid_post", hook_out="resid_post"), tmp_path / "c")
    with pytest.raises(CircuitTracerExportError, match="mlp_out"):
        export_circuit_tracer(build("clt", hook_out="resid_post"), tmp_path / "d")
    untrained = build("clt", "batchtopk")
    untrained.activation.init_weights()  # threshold never estimated
    with pytest.raises(CircuitTracerExportError, match="never estimated"):
        export_circuit_tracer(untrained, tmp_path / "e")
    assert (
        check_exportable(untrained, require_thresholds=False) == "cross_layer_transcoder"
    )  # before training
    with pytest.raises(ConfigError, match="covers layer 4"):  # what the trainer catches at startup
        check_exportable(build("plt", layers=[0, 2, 4]), llm_n_layers=4, require_thresholds=False)
    assert not any((tmp_path / n).exists() for n in "abcde")  # nothing half-written


def test_export_does_not_touch_the_model(tmp_path):
    model = build("clt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_circuit_tracer(model, tmp_path / "ct")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_load_pretrained_reads_circuit_tracer_folders(tmp_path):
    import torchtitan_clt

    model = build("plt", "relu")
    out = export_circuit_tracer(model, tmp_path / "ct")
    back = torchtitan_clt.load_pretrained(out)
    assert back.args.family == "plt" and back.args.activation == "relu" and not back.training
    x = fresh_x(seed=3)
    torch.testing.assert_close(ours(back, x)[1], ours(model, x)[1], atol=1e-4, rtol=1e-4)


def test_topk_is_calibrated_on_batches_and_reports_it(tmp_path):
    """With calibration batches a TopK CLT is exported as the JumpReLU ``to_jumprelu`` makes;
    conversion.json's L0 / FVU after are what circuit-tracer's own loaded CLT gives (float64)."""
    import json

    from torchtitan_clt.checkpoint.export import folded_cpu_copy
    from torchtitan_clt.models.conversion import to_jumprelu

    model = build("clt", "topk")
    calib, held = [fresh_x(512, seed=1)], [fresh_x(256, seed=2)]
    opts = {"refine_steps": 20}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "approximation" warning: it is calibrated
        out = export_circuit_tracer(
            model, tmp_path / "ct", calibration=calib, eval_batches=held, conversion_options=opts
        )
    rep = json.loads((out / "conversion.json").read_text())
    assert rep["converted"] and rep["calibrated"] and rep["thresholds"] == "match"
    assert read_config(out)["trained_activation"] == "topk"
    assert rep["eval_tokens"] == 256 and rep["calibration_tokens"] == 512 and rep["refine_steps"] == 20
    clt = ct_clt.load_clt(str(out), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    x = held[0]
    with torch.no_grad():
        a_ct = clt.encode(x.transpose(0, 1))  # [L, N, F]
        y_ct = clt(x.transpose(0, 1)).transpose(0, 1).double()
        y_src = model.eval()(x).double()  # the TopK source
        ref, _ = to_jumprelu(folded_cpu_copy(model), calib, refine_steps=20)
        torch.testing.assert_close(a_ct, ref.eval().encode(x).transpose(0, 1), atol=1e-4, rtol=1e-4)
    l0 = (a_ct != 0).sum(-1).double().mean(-1).tolist()
    fvu = ((y_src - y_ct).pow(2).sum((0, 2)) / (y_src - y_src.mean(0)).pow(2).sum((0, 2))).tolist()
    assert rep["l0_after"] == pytest.approx(l0, rel=1e-6)
    assert rep["fvu_after"] == pytest.approx(fvu, rel=1e-3, abs=1e-6)
    assert rep["l0_before"] == [4.0] * L and rep["fvu_before"] == pytest.approx([0.0] * L, abs=1e-9)
    for before, after in zip(rep["l0_before"], rep["l0_after"]):
        assert abs(after - before) <= 0.25 * before  # 512 calibration tokens, a random tiny model


def test_uncalibrated_export_says_so(tmp_path):
    import json

    model = build("clt", "topk")
    with pytest.warns(UserWarning, match="approximation"):
        out = export_circuit_tracer(model, tmp_path / "ct")
    rep = json.loads((out / "conversion.json").read_text())
    assert not rep["converted"] and rep["thresholds"] == "layer" and "no calibration" in rep["reason"]
    export_circuit_tracer(build("clt", "jumprelu"), out)  # a later export of another model
    assert not (out / "conversion.json").exists()
