"""The trainer end to end from the command line: runs, artifacts, bad input, user extensions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchtitan_clt
from torchtitan_clt.train import main

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "train_configs" / "debug_model.toml")
CUSTOM = str(Path(__file__).with_name("custom_family.py"))


def _run(tmp_path, *overrides, config=DEBUG):
    return main(["--config", config, f"--job.dump_folder={tmp_path}", *overrides])


def _metrics(tmp_path, name):
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_debug_run_trains_logs_and_exports(tmp_path):
    assert (
        _run(
            tmp_path,
            "--training.steps=40",
            "--checkpoint.enable=false",
            "--eval.every=20",
            "--eval.tokens=256",
        )
        == 0
    )
    run = tmp_path / "debug_model"
    all_rows = _metrics(tmp_path, "debug_model")
    rows = [r for r in all_rows if "loss" in r]
    assert rows[0]["step"] == 1 and rows[-1]["step"] == 40
    for key in (
        "loss",
        "loss_recon",
        "loss_sparsity",
        "fvu",
        "l0",
        "dead_frac",
        "lr",
        "tokens_per_s",
        "tokens",
    ):
        assert key in rows[-1], key
    assert len(rows[-1]["fvu_per_layer"]) == 4 and len(rows[-1]["l0_per_layer"]) == 4
    assert rows[-1]["fvu"] < rows[0]["fvu"], "training should reduce FVU"
    assert rows[-1]["tokens"] == 40 * 256
    assert (run / "config.toml").is_file()
    # Periodic held-out evaluation lands in the same log, and the report is written at the end.
    evals = [r for r in all_rows if "eval_ce_clean" in r]
    assert [r["step"] for r in evals] == [20, 40], [r["step"] for r in evals]
    report = json.loads((run / "report" / "eval.json").read_text())
    assert report and (run / "report" / "loss_fvu.png").is_file()
    assert any((run / "tb").iterdir())
    # The export reloads through the public API and reproduces the trained model in raw units.
    model = torchtitan_clt.load_pretrained(run / "export")
    x = torch.randn(5, 4, 64)
    y = model(x)
    assert y.shape == (5, 4, 64) and torch.isfinite(y).all()
    acts = model.encode(x)
    assert acts.shape == (5, 4, 128)
    torch.testing.assert_close(model.decode(acts, x), y)  # x: the skip path (on by default)


def test_resolved_config_reloads(tmp_path):
    assert (
        _run(
            tmp_path,
            "--training.steps=2",
            "--lr_scheduler.warmup_steps=0",
            "--model.k=7",
            "--checkpoint.enable=false",
        )
        == 0
    )
    from torchtitan_clt.config import load_config

    cfg = load_config(["--config", str(tmp_path / "debug_model" / "config.toml")])
    assert cfg.model.k == 7 and cfg.training.steps == 2


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model.features=3"], "Unknown field in [model] 'features'"),
        (["--modle.k=3"], "Unknown config section 'modle'"),
        (["--training.steps=ten"], "training.steps expects an integer"),
        (["--model.batchtopk_scope=everything"], "choose one of 'layer', 'all'"),
        (["--model.name=nosuch"], "model.name = 'nosuch' is not a registered model family"),
        (["--model.activation=nosuch"], "model.activation = 'nosuch'"),
        (["--data.dataset=/no/such/file.txt"], "/no/such/file.txt"),
        (["--data.layers=0,9"], "9"),
    ],
)
def test_bad_input_stops_with_a_message(tmp_path, caplog, capsys, args, needle):
    assert _run(tmp_path, *args) == 2
    out = caplog.text + capsys.readouterr().err
    assert needle in out, out
    # Nothing was trained: no metrics were written.
    assert not (tmp_path / "debug_model" / "metrics.jsonl").exists()


def test_missing_config_file(tmp_path, caplog):
    assert main(["--config", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in caplog.text


def test_nan_data_stops_with_step_and_layer(tmp_path, caplog):
    rc = _run(
        tmp_path,
        f"--job.custom_import={CUSTOM}",
        "--data.source=toy_nan",
        "--standardize.inputs=none",
        "--standardize.targets=none",
        "--training.steps=10",
        "--checkpoint.enable=false",
    )
    assert rc == 3
    # The batch is checked before the loss: the message names the tensor and the layers.
    assert "Non-finite activations at step 4: targets (mlp_out) at layer 0" in caplog.text


def test_nan_activations_during_standardization_stop_cleanly(tmp_path, caplog):
    rc = _run(tmp_path, f"--job.custom_import={CUSTOM}", "--data.source=toy_nan", "--checkpoint.enable=false")
    assert rc == 3
    assert "Non-finite activations while estimating standardization" in caplog.text


# The user's family (custom_family.py) on its toy source: y = 2x, learnt in 150 steps.
TIED_SAE = (
    f"--job.custom_import={CUSTOM}",
    "--model.name=tied_sae",
    "--model.features_per_layer=32",
    "--data.source=toy",
    "--standardize.inputs=none",
    "--standardize.targets=none",
    "--training.steps=150",
    "--training.batch_size=64",
    "--loss.lambda_sparsity=0",
    "--optimizer.lr=3e-3",
    "--checkpoint.enable=false",
)


def test_user_family_activation_and_source_from_config(tmp_path):
    rc = _run(tmp_path, *TIED_SAE, "--model.activation=squared_relu", "--checkpoint.export=false")
    assert rc == 0
    rows = _metrics(tmp_path, "debug_model")
    assert rows[-1]["fvu"] < 0.5 * rows[0]["fvu"]


def test_user_family_exports_natively_and_to_circuit_tracer_through_its_spec(tmp_path):
    """A family from a user's file (its ModelSpec's export_layout; nothing in the package knows
    it) trains, and its two exports compute what it computes: the native one reloads as the
    user's class, the circuit-tracer one is read by circuit-tracer's own loader."""
    ct_plt = pytest.importorskip("circuit_tracer.transcoder.single_layer_transcoder")
    rc = _run(
        tmp_path,
        *TIED_SAE,
        "--model.activation=relu",
        "--checkpoint.export=true",
        "--checkpoint.export_circuit_tracer=true",
    )
    assert rc == 0
    run = tmp_path / "debug_model"
    rows = _metrics(tmp_path, "debug_model")
    assert rows[-1]["fvu"] < 0.5 * rows[0]["fvu"]
    native = torchtitan_clt.load_pretrained(run / "export")
    assert type(native).__name__ == "TiedSAE"
    x = torch.randn(50, 2, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = native.encode(x)  # [N, L, F]
        y = native.decode(a)
    assert (a > 0).any() and (a == 0).any()
    ct = run / "circuit_tracer"
    paths = {i: str(ct / f"layer_{i}.safetensors") for i in range(2)}
    ts = ct_plt.load_transcoder_set(
        paths,
        scan="toy",
        feature_input_hook="hook_resid_mid",
        feature_output_hook="hook_mlp_out",
        device=torch.device("cpu"),
        dtype=torch.float32,
        lazy_encoder=False,
        lazy_decoder=False,
    )
    with torch.no_grad():
        a_ct = ts.encode(x.transpose(0, 1))  # [L, N, F]
        torch.testing.assert_close(a_ct, a.transpose(0, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ts.decode(a_ct, None), y.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_user_family_declares_its_own_fields(tmp_path, caplog):
    """``ModelSpec.options``: a user family's [model] fields reach its build_fn typed, travel in the
    export and the resolved config, and a misspelt one stops the run naming the right one."""
    common = (f"--job.custom_import={CUSTOM}", "--model.name=tied_sae", "--model.activation=relu",
              "--data.source=toy", "--standardize.inputs=none", "--standardize.targets=none",
              "--model.features_per_layer=8", "--training.steps=1", "--lr_scheduler.warmup_steps=0",
              "--optimizer.lr=1e-12", "--checkpoint.enable=false")  # fmt: skip
    assert _run(tmp_path, *common, "--model.init_scale=0.25", "--job.name=a") == 0
    a = torchtitan_clt.load_pretrained(tmp_path / "a" / "export")
    assert a.args.extra["init_scale"] == 0.25  # a float, parsed from the command line
    from torchtitan_clt.config import load_config

    again = load_config(["--config", str(tmp_path / "a" / "config.toml")])
    assert again.model.options == {"init_scale": 0.25}
    # Not given: the family's default (0.1), and the same seed's weights 2.5 times smaller.
    assert _run(tmp_path, *common, "--job.name=b") == 0
    b = torchtitan_clt.load_pretrained(tmp_path / "b" / "export")
    assert b.args.extra["init_scale"] == 0.1
    torch.testing.assert_close(a.W, 2.5 * b.W, rtol=1e-5, atol=1e-7)
    assert _run(tmp_path, *common, "--model.init_scal=0.25", "--job.name=c") == 2
    assert "Unknown field in [model] 'init_scal'. Did you mean 'init_scale'?" in caplog.text
    assert _run(tmp_path, *common, "--model.init_scale=big", "--job.name=d") == 2
    assert "model.init_scale expects a number, got 'big'" in caplog.text


def test_help_lists_every_field():
    out = subprocess.run(
        [sys.executable, "-m", "torchtitan_clt.train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    import dataclasses

    from torchtitan_clt.config.job_config import JobConfig

    for sec in dataclasses.fields(JobConfig):
        for f in dataclasses.fields(getattr(JobConfig(), sec.name)):
            assert f"--{sec.name}.{f.name} " in out
    assert "Features per layer" in out or "features per layer" in out


def test_run_train_sh_launches_through_torchrun(tmp_path):
    proc = subprocess.run(
        [
            "./run_train.sh",
            "--config",
            DEBUG,
            f"--job.dump_folder={tmp_path}",
            "--training.steps=5",
            "--checkpoint.enable=false",
            "--checkpoint.export=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(_metrics(tmp_path, "debug_model")) >= 2


def test_profiler_traces_and_peak_memory(tmp_path):
    rc = _run(
        tmp_path,
        "--training.steps=10",
        "--checkpoint.enable=false",
        "--checkpoint.export=false",
        "--profiling.enable_profiling=true",
        "--profiling.profile_freq=5",
        "--profiling.profile_active=1",
        "--profiling.profile_warmup=1",
    )
    assert rc == 0
    traces = sorted((tmp_path / "debug_model" / "profile_traces").glob("iteration_*/rank0_trace.json"))
    assert sorted(t.parent.name for t in traces) == ["iteration_10", "iteration_5"]
    assert all(r["peak_mem_gib"] > 0 for r in _metrics(tmp_path, "debug_model"))


def test_topk_run_exports_a_calibrated_circuit_tracer_folder(tmp_path):
    """The end-of-run circuit-tracer export of a TopK CLT converts it to JumpReLU with training rows
    (``checkpoint.export_calibration_tokens``): conversion.json says so, with L0 near k."""
    args = ["--training.steps=6", "--checkpoint.enable=false", "--model.activation=topk", "--model.k=8"]
    args += ["--checkpoint.export_circuit_tracer=true", "--checkpoint.export_calibration_tokens=512"]
    assert _run(tmp_path, *args, "--eval.enable=false") == 0
    report = json.loads((tmp_path / "debug_model/circuit_tracer/conversion.json").read_text())
    assert report["converted"] is True and report["calibration_tokens"] == 512
    assert abs(report["l0_after_mean"] - 8) <= 0.8


def test_batchtopk_run_fits_its_inference_threshold_to_training_rows(tmp_path):
    """At the end of a BatchTopK run the eval-mode threshold is fitted on training rows
    (``checkpoint.export_calibration_tokens``) so that k features fire per token and layer on them:
    the held-out eval and the native export use it (held-out L0 within 5% of k), and the report
    says what it replaced (the tracked EMA of the smallest selected value, below the fit)."""
    from safetensors.torch import load_file

    args = ["--training.steps=20", "--model.activation=batchtopk", "--model.k=8", "--loss.sparsity=none"]
    assert _run(tmp_path, *args, "--eval.enable=true", "--checkpoint.export_calibration_tokens=1024") == 0
    run = tmp_path / "debug_model"
    fit = json.loads((run / "report" / "batchtopk_threshold.json").read_text())
    assert fit["tokens"] == 1024 and fit["k"] == 8
    exported = load_file(str(run / "export" / "model.safetensors"))["activation.threshold"]
    torch.testing.assert_close(exported, torch.tensor(fit["threshold"]), atol=1e-6, rtol=0)
    assert all(t > e for t, e in zip(fit["threshold"], fit["tracked_ema"])), fit
    held_out_l0 = json.loads((run / "report" / "eval.json").read_text())["headline"]["l0"]
    assert abs(held_out_l0 - 8) <= 0.05 * 8, held_out_l0
