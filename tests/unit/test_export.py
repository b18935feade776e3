"""Native export -> load_pretrained reproduces the model in raw units; clear errors."""

import json

import pytest
import torch

import torchtitan_clt
from torchtitan_clt.checkpoint.export import export_native, folded_cpu_copy, load_pretrained
from torchtitan_clt.config import ConfigError
from torchtitan_clt.protocols import model_registry
from torchtitan_clt.protocols.transcoder import TranscoderArgs

ACTS = ["relu", "jumprelu", "topk", "batchtopk"]


def _trained_like(family, act, seed=0):
    """A model with non-trivial weights, biases, thresholds and standardization."""
    args = TranscoderArgs(
        family=family,
        n_layers=3,
        d_in=4,
        d_out=5,
        features_per_layer=6,
        activation=act,
        k=2,
        jumprelu_threshold_init=0.05,
        model_name="tiny-llm",
        hook_in="resid_mid",
        hook_out="mlp_out",
        layers=[0, 2, 4],
    )
    m = model_registry.get(family).build_fn(args)
    m.init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    m.set_standardization(
        torch.randn(3, 4, generator=g),
        torch.rand(3, 4, generator=g) + 0.5,
        torch.randn(3, 5, generator=g),
        torch.rand(3, 5, generator=g) + 0.5,
    )
    if act in ("topk", "batchtopk"):
        m.train()
        m.forward_std(torch.randn(32, 3, 4, generator=g))  # sets the inference threshold
    return m


@pytest.mark.parametrize("family", ["plt", "clt"])
@pytest.mark.parametrize("act", ACTS)
def test_export_roundtrip_raw_units(tmp_path, family, act):
    m = _trained_like(family, act)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    export_native(m, tmp_path / "export", extra_meta={"step": 7})
    # the training model is untouched (buffers not folded, still in train mode)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert m.training
    loaded = torchtitan_clt.load_pretrained(tmp_path / "export")
    assert not loaded.training
    assert torch.equal(loaded.in_scale, torch.ones(3, 4))
    m.eval()
    x = torch.randn(10, 3, 4) * 2 + 0.5
    acts = m.encode(x)
    assert acts.count_nonzero() > 0
    torch.testing.assert_close(loaded.encode(x), acts, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loaded.decode(acts), m.decode(acts), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loaded(x), m(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        loaded.activation.feature_thresholds(), m.activation.feature_thresholds(), rtol=1e-6, atol=0
    )

    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["standardization"] == "folded" and cfg["family"] == family
    assert (cfg["model_name"], cfg["hook_in"], cfg["hook_out"], cfg["layers"]) == (
        "tiny-llm",
        "resid_mid",
        "mlp_out",
        [0, 2, 4],
    )
    assert cfg["activation"]["name"] == act and cfg["meta"] == {"step": 7}
    assert cfg["activation"]["jumprelu_equivalent"] == (act != "topk")
    assert TranscoderArgs.from_dict(cfg["args"]).features_per_layer == 6


def test_export_bf16_and_load_dtype(tmp_path):
    m = _trained_like("clt", "jumprelu")
    export_native(m, tmp_path, dtype=torch.bfloat16)
    loaded = load_pretrained(tmp_path)
    assert loaded.W_enc.dtype == torch.bfloat16
    as_fp32 = load_pretrained(tmp_path, dtype=torch.float32)
    assert as_fp32.W_dec[0].dtype == torch.float32
    torch.testing.assert_close(as_fp32.W_dec[0], loaded.W_dec[0].float())
    m.eval()
    x = torch.randn(4, 3, 4)
    torch.testing.assert_close(as_fp32(x), m(x), rtol=0.05, atol=0.05)


def test_folded_copy_is_independent():
    m = _trained_like("plt", "relu")
    c = folded_cpu_copy(m)
    with torch.no_grad():
        c.W_enc.zero_()
    assert m.W_enc.abs().sum() > 0
    assert not torch.equal(m.in_scale, torch.ones(3, 4))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_pretrained(tmp_path)
    export_native(_trained_like("plt", "relu"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["args"]["family"] = "mystery"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="mystery.*not registered"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_pretrained(tmp_path)


def test_init_and_export_with_dtensor_params(tmp_path):
    """A one-rank gloo mesh: init_weights into DTensors and export gathers them."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        args = TranscoderArgs(
            family="clt", n_layers=3, d_in=4, d_out=4, features_per_layer=5, activation="jumprelu"
        )
        ref = model_registry.get("clt").build_fn(args)
        ref.init_weights(3)
        with torch.device("meta"):
            m = model_registry.get("clt").build_fn(args)
        m.to_empty(device="cpu")
        for mod in m.modules():
            for name, p in list(mod.named_parameters(recurse=False)):
                setattr(mod, name, torch.nn.Parameter(distribute_tensor(p.data, mesh, [Shard(0)])))
        m.init_weights(3)
        assert isinstance(m.W_enc, DTensor)
        for k, v in m.state_dict().items():
            v = v.full_tensor() if isinstance(v, DTensor) else v
            assert torch.equal(v, ref.state_dict()[k]), k
        export_native(m, tmp_path / "export")
        x = torch.randn(6, 3, 4)
        torch.testing.assert_close(load_pretrained(tmp_path / "export")(x), ref(x))
    finally:
        dist.destroy_process_group()
