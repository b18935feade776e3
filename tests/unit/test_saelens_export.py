"""SAELens export: sae-lens's own loaders (``SAE.load_from_disk``, ``Transcoder.load_from_disk``)
read our per-layer folders and reproduce ``load_pretrained``'s encode / decode / forward on random
raw-unit inputs; a CLT, a MOLT and a TopK transcoder are refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model

import torchtitan_clt
from torchtitan_clt.checkpoint.export import export_native
from torchtitan_clt.checkpoint.saelens import (
    CFG_FILE,
    WEIGHTS_FILE,
    SAELensExportError,
    export_saelens,
    saelens_architecture,
)
from torchtitan_clt.config.manager import ConfigError

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE, Transcoder  # noqa: E402

L, D, F, LAYERS = 3, 12, 40, [1, 4, 6]
CASES = [  # (family, activation, the sae-lens architecture it must load as)
    ("sae", "jumprelu", "jumprelu"),
    ("sae", "topk", "topk"),
    ("sae", "relu", "standard"),
    ("sae", "batchtopk", "jumprelu"),
    ("plt", "jumprelu", "jumprelu_transcoder"),
    ("plt", "relu", "transcoder"),
    ("plt", "batchtopk", "jumprelu_transcoder"),
]


def trained_like(family, act, seed=0):
    """Perturbed weights, per-feature thresholds and standardization (folded at export)."""
    d_out = D if family == "sae" else D + 3
    m = tiny_model(family, act, L=L, d=D, F=F, d_out=d_out, layers=LAYERS, model_name="org/llm", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        if act == "jumprelu":  # thresholds that cut: θ around the pre-activations' scale
            m.activation.log_threshold.copy_(torch.log(torch.rand(L, F, generator=g) * 0.4 + 0.05))
    m.set_standardization(
        torch.randn(L, D, generator=g),
        torch.rand(L, D, generator=g) + 0.5,
        torch.randn(L, d_out, generator=g),
        torch.rand(L, d_out, generator=g) + 0.5,
    )
    if act == "batchtopk":
        m.train()
        m.forward_std(torch.randn(64, L, D, generator=g))  # tracks the inference threshold
    return m.eval()


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("family,act,arch", CASES)
def test_sae_lens_loads_our_folders(tmp_path, family, act, arch):
    m = trained_like(family, act)
    export_native(m, tmp_path / "export")
    out = export_saelens(m, tmp_path / "saelens")
    ours = torchtitan_clt.load_pretrained(tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [f"layer_{i}" for i in LAYERS]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, L, D, generator=g) * 3 + torch.randn(L, D, generator=g)  # raw units
    with torch.no_grad():
        acts, y = ours.encode(x), ours(x)
        assert 0 < acts.count_nonzero() < acts.numel() * 0.9  # the activation really gates
        for i, layer in enumerate(LAYERS):
            folder = out / f"layer_{layer}"
            loader = SAE if family == "sae" else Transcoder
            sl = loader.load_from_disk(folder)
            assert sl.cfg.architecture() == arch
            assert rel(sl.encode(x[:, i]), acts[:, i]) < 1e-4
            assert rel(sl.decode(acts[:, i]), ours.decode(acts)[:, i]) < 1e-4
            assert rel(sl(x[:, i]), y[:, i]) < 1e-4
            # and against the model before export (standardized training units folded away)
            assert rel(sl(x[:, i]), m(x)[:, i]) < 1e-4
            if act == "topk":
                assert sl.cfg.k == 2 and bool((sl.encode(x[:, i]).count_nonzero(-1) <= 2).all())


def test_cfg_json_metadata(tmp_path):
    m = trained_like("plt", "jumprelu")
    export_saelens(m, tmp_path, metadata={"context_size": 128, "dataset_path": "shakespeare"})
    cfg = json.loads((tmp_path / "layer_4" / CFG_FILE).read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_out"], cfg["d_sae"]) == (
        "jumprelu_transcoder",
        D,
        D + 3,
        F,
    )
    assert cfg["apply_b_dec_to_input"] is False and cfg["dtype"] == "float32"
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.4.hook_resid_mid" and meta["hook_name_out"] == "blocks.4.hook_mlp_out"
    assert (meta["model_name"], meta["context_size"], meta["layer"]) == ("org/llm", 128, 4)
    sl = Transcoder.load_from_disk(tmp_path / "layer_4")
    assert sl.cfg.metadata.hook_name == "blocks.4.hook_resid_mid"  # read as 6.x metadata, not rewritten
    theta = torch.exp(m.activation.log_threshold[1]).detach()
    torch.testing.assert_close(sl.threshold.detach(), theta)


def test_bf16_export_and_stale_layers(tmp_path):
    m = trained_like("sae", "jumprelu")
    (tmp_path / "layer_9").mkdir()
    (tmp_path / "layer_9" / WEIGHTS_FILE).write_bytes(b"old")
    (tmp_path / "layer_9" / CFG_FILE).write_text("{}")
    export_saelens(m, tmp_path, dtype=torch.bfloat16)
    assert not (tmp_path / "layer_9" / WEIGHTS_FILE).exists()  # an earlier export's layer is gone
    sl = SAE.load_from_disk(tmp_path / "layer_1")
    assert sl.cfg.dtype == "bfloat16" and sl.W_enc.dtype == torch.bfloat16
    x = torch.randn(32, L, D)
    with torch.no_grad():
        assert rel(sl(x[:, 0]).float(), m(x)[:, 0]) < 0.05  # bf16 rounding only


@pytest.mark.parametrize(
    "family,act,match",
    [
        ("clt", "jumprelu", "crosslayer transcoder"),
        ("matryoshka_clt", "batchtopk", "crosslayer transcoder"),
        ("molt", "jumprelu", "no form for a"),
        ("plt", "topk", "no TopK transcoder"),
    ],
)
def test_refusals(tmp_path, family, act, match):
    m = tiny_model(family, act, L=2, d=4, F=6)
    with pytest.raises(SAELensExportError, match=match) as e:
        export_saelens(m, tmp_path / "s")
    assert isinstance(e.value, ConfigError) and "native export" in str(e.value)
    assert not (tmp_path / "s").exists()


def test_untrained_batchtopk_threshold_is_refused(tmp_path):
    m = tiny_model("sae", "batchtopk", L=2, d=4, F=6)
    with pytest.raises(SAELensExportError, match="never estimated"):
        saelens_architecture(m)


def test_export_script_saelens_from_a_checkpoint(tmp_path):
    """scripts/export.py RUN --format saelens on a saved step of a (synthetic) JumpReLU PLT run; the
    same script refuses a CLT run with the reason and exit code 2."""
    import importlib.util
    from pathlib import Path

    from torchtitan_clt.checkpoint.offline import load_model_from_checkpoint
    from torchtitan_clt.config import load_config
    from torchtitan_clt.train import Trainer

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("export_script", root / "scripts/export.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    common = [
        "--config", str(root / "train_configs/debug_model.toml"), f"--job.dump_folder={tmp_path}",
        "--training.steps=2", "--training.device=cpu", "--training.batch_size=32", "--checkpoint.interval=2",
        "--checkpoint.export=false", "--metrics.enable_tensorboard=false", "--lr_scheduler.warmup_steps=1",
        "--data.source=synthetic", "--data.synthetic_n_layers=2", "--data.synthetic_d_model=8",
        "--model.features_per_layer=16", "--standardize.estimate_tokens=64",
    ]  # fmt: skip
    for name, family in (("plt", ["--model.name=plt", "--model.activation=jumprelu"]), ("clt", [])):
        t = Trainer(load_config([*common, f"--job.name={name}", *family]))
        t.train()
    run = tmp_path / "plt"
    assert script.main([str(run), "--format", "saelens"]) == 0
    model, _ = load_model_from_checkpoint(run / "checkpoints" / "step-2")
    x = torch.randn(32, 2, 8)
    for i in range(2):
        sl = Transcoder.load_from_disk(run / "exports" / "step-2" / "saelens" / f"layer_{i}")
        assert sl.cfg.architecture() == "jumprelu_skip_transcoder"  # PLTs train with a skip path by default
        with torch.no_grad():
            assert rel(sl(x[:, i]), model(x)[:, i]) < 1e-4
    assert script.main([str(tmp_path / "clt"), "--format", "saelens"]) == 2
