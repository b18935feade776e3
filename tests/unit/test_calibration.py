"""Calibration / held-out activations for the JumpReLU conversion, and the export script's
fallback when there are none."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from torchtitan_clt.checkpoint.calibration import activation_batches
from torchtitan_clt.config import JobConfig
from torchtitan_clt.data.extraction import ActivationExtractor
from torchtitan_clt.data.llm import load_llm
from torchtitan_clt.data.pipeline import LLMHandle
from torchtitan_clt.data.text import TextSpec
from torchtitan_clt.data.tokenize import build_token_loader
from torchtitan_clt.protocols import model_registry
from torchtitan_clt.protocols.transcoder import TranscoderArgs

ASSETS = Path(__file__).resolve().parents[1] / "assets"
ROOT = Path(__file__).resolve().parents[2]


def _cfg() -> JobConfig:
    cfg = JobConfig()
    cfg.data.model_path, cfg.data.model_dtype = str(ASSETS / "tiny_llama"), "float32"
    cfg.data.dataset, cfg.data.seq_len, cfg.data.layers = str(ASSETS / "tiny_text.txt"), 12, [0, 2]
    cfg.data.hook_in, cfg.data.hook_out = "mlp_in", "mlp_out"
    return cfg


def test_training_and_held_out_activations():
    cfg = _cfg()
    llm, tok = load_llm(cfg.data.model_path, "float32", "cpu")
    train = activation_batches(cfg, 100, "train", llm=LLMHandle(llm, tok), contexts_per_batch=4)
    held = activation_batches(cfg, 40, "held_out", llm=LLMHandle(llm, tok), contexts_per_batch=4)
    assert sum(x.shape[0] for x, _ in train) >= 100 and sum(x.shape[0] for x, _ in held) >= 40
    x, y = train[0]
    assert x.shape == y.shape == (4 * 11, 2, llm.config.hidden_size) and x.dtype == torch.float32
    # The first training batch: the first 4 windows of the training documents, extracted by hand.
    spec = TextSpec(cfg.data.dataset, "", cfg.data.dataset_split, cfg.data.text_field)
    tokens = next(iter(build_token_loader(spec, tok, 12, 4, loop=False)))
    x_ref, y_ref = ActivationExtractor(llm, "mlp_in", "mlp_out", [0, 2])(tokens)
    torch.testing.assert_close(x, x_ref)
    torch.testing.assert_close(y, y_ref)
    # Held-out documents are other text: none of their batches is a training batch.
    assert all(hx.shape != tx.shape or not torch.allclose(hx, tx) for hx, _ in held for tx, _ in train)
    with pytest.raises(ValueError, match="split"):
        activation_batches(cfg, 10, "test", llm=LLMHandle(llm, tok))


def _export_script():
    spec = importlib.util.spec_from_file_location("export_script", ROOT / "scripts" / "export.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _topk_clt():
    args = TranscoderArgs(
        family="clt", n_layers=2, d_in=8, d_out=8, features_per_layer=16, activation="topk", k=2
    )
    m = model_registry.get("clt").build_fn(args)
    m.init_weights(0)
    return m


def test_export_script_falls_back_without_data(tmp_path):
    mod = _export_script()
    m = _topk_clt()
    with pytest.warns(UserWarning, match="tracked per-layer threshold"):
        assert mod.conversion_batches(None, m, 4096, 4096) == ([], None)  # no run folder
    assert mod.conversion_batches(None, m, 0, 4096) == ([], None)  # --calib-tokens 0: asked not to
    (tmp_path / "config.toml").write_text('[data]\nmodel_path = "/nonexistent/llm"\n')
    with pytest.warns(UserWarning, match="tracked per-layer threshold"):
        assert mod.conversion_batches(tmp_path, m, 4096, 4096) == ([], None)  # the LLM is missing
    (tmp_path / "config.toml").write_text('[data]\nsource = "synthetic"\n')
    with pytest.warns(UserWarning, match="synthetic"):
        assert mod.conversion_batches(tmp_path, m, 4096, 4096) == ([], None)


def test_batchtopk_checkpoint_is_calibrated_by_the_export_and_eval_scripts(tmp_path):
    """A BatchTopK checkpoint holds the threshold tracked in training. scripts/export.py (native)
    and scripts/eval.py fit it on the run's training rows first: on those rows, k fire per token
    and layer (the tracked threshold gives another L0)."""
    from torchtitan_clt.checkpoint.calibration import run_batches
    from torchtitan_clt.checkpoint.export import load_pretrained
    from torchtitan_clt.config import load_config
    from torchtitan_clt.train import Trainer

    cfg = _cfg()
    args = [
        f"--job.dump_folder={tmp_path}", "--job.name=btk", "--data.source=stream",
        f"--data.model_path={cfg.data.model_path}", "--data.model_dtype=float32",
        f"--data.dataset={cfg.data.dataset}", "--data.seq_len=12", "--data.layers=[0,2]",
        "--data.hook_in=mlp_in", "--data.hook_out=mlp_out", "--data.llm_batch_size=4",
        "--data.buffer_tokens=256", "--model.name=plt", "--model.activation=batchtopk", "--model.k=3",
        "--model.features_per_layer=32", "--training.steps=4", "--training.batch_size=64",
        "--training.device=cpu", "--checkpoint.interval=4", "--checkpoint.export=false",
        "--checkpoint.export_calibration_tokens=200", "--metrics.enable_tensorboard=false",
        "--standardize.estimate_tokens=64", "--eval.enable=false",
    ]  # fmt: skip
    Trainer(load_config(args)).train()
    run = tmp_path / "btk"
    written = _export_script().export_checkpoint(run, fmt="native", calib_tokens=200)
    exported = load_pretrained(written["native"])
    calib, _ = run_batches(run, exported, 200)
    x = torch.cat([b[0] for b in calib])
    with torch.no_grad():
        l0 = (exported.encode(x) != 0).sum(-1).float().mean(0)  # [L] on the calibration rows
    torch.testing.assert_close(l0, torch.full_like(l0, 3.0), atol=0.05, rtol=0)
    # eval.py's loader: the checkpoint as saved (tracked threshold), then fitted.
    spec = importlib.util.spec_from_file_location("eval_script", ROOT / "scripts" / "eval.py")
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    model, kind = ev.load_dictionary(run, None, "cpu")
    with torch.no_grad():
        before = (model.encode(x) != 0).sum(-1).float().mean(0)
    assert (before - 3.0).abs().max() > 0.05  # the tracked threshold misses k on these rows
    assert "fitted on" in ev.calibrate_batchtopk(run, model, 200)
    with torch.no_grad():
        torch.testing.assert_close(model.activation.threshold, exported.activation.threshold)
