"""The trainer's end of run on a mesh never gathers the model whole: a BatchTopK CLT (scope
``all``, skip path, standardization) trained by ``run_train.sh`` on 2 gloo ranks (tp 2, and
dp_shard 2 with FSDP2), with the BatchTopK threshold fit, the native export (sharded by a small
file cap) and the circuit-tracer conversion on. This module is the run's ``job.custom_import``: in
each worker it makes ``gather_plain_model`` and ``folded_cpu_copy`` of a sharded model raise.

Reference: the final checkpoint rebuilt in one process (``load_model_from_checkpoint``), given the
exported threshold, and exported there; the run's export must hold the same tensors (byte for
byte, except b_enc / b_dec: their sums over the input mean, see ``sharded_export``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve()
STEPS = 6

BASE = [
    "--config", "train_configs/debug_model.toml",
    "--job.custom_import", str(THIS),
    "--data.source=synthetic", "--data.synthetic_n_layers=4", "--data.synthetic_d_model=64",  # the LLM its export names
    "--model.name=clt", "--model.features_per_layer=32", "--model.k=4",
    "--model.activation=batchtopk", "--model.batchtopk_scope=all", "--model.skip_connection=true",
    "--loss.sparsity=none", f"--training.steps={STEPS}", "--training.batch_size=32",
    "--training.device=cpu", "--lr_scheduler.warmup_steps=0", "--standardize.estimate_tokens=256",
    "--metrics.log_freq=1", "--metrics.enable_tensorboard=false",
    f"--checkpoint.interval={STEPS}", "--checkpoint.export=true", "--checkpoint.export_circuit_tracer=true",
    "--checkpoint.export_calibration_tokens=64", "--checkpoint.export_max_file_gb=0.00001",
]  # fmt: skip
LAYOUTS = {
    "tp2": ["--parallelism.dp_shard=1", "--parallelism.tp=2"],
    "dp2": ["--parallelism.dp_shard=2", "--parallelism.tp=1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mesh_run_exports_without_gathering_the_model(tmp_path, layout):
    from safetensors.torch import load_file

    from torchtitan_clt.checkpoint.circuit_tracer import load_circuit_tracer
    from torchtitan_clt.checkpoint.export import export_native, load_pretrained
    from torchtitan_clt.checkpoint.offline import load_model_from_checkpoint
    from torchtitan_clt.checkpoint.safetensors_stream import weight_files

    env = dict(os.environ, NGPU="2", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    cmd = ["bash", str(ROOT / "run_train.sh"), f"--job.dump_folder={tmp_path}", "--job.name=run", *BASE]
    r = subprocess.run(
        [*cmd, *LAYOUTS[layout]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    run = tmp_path / "run"
    assert "gathered whole" not in r.stdout + r.stderr

    files = weight_files(run / "export")
    assert len(files) > 1  # the cap split it
    got = {k: v for f in files for k, v in load_file(str(f)).items()}
    fit = json.loads((run / "report" / "batchtopk_threshold.json").read_text())
    thr = got["activation.threshold"]
    assert fit["tokens"] == 64 and thr.tolist() == pytest.approx(fit["threshold"], abs=1e-6)
    assert fit["threshold"] != fit["tracked_ema"]  # the fit replaced the tracked threshold

    model, _ = load_model_from_checkpoint(run, step=STEPS)
    assert bool((model.in_mean != 0).any())  # standardization is folded for real
    with torch.no_grad():
        model.activation.threshold.copy_(thr)
    export_native(model, tmp_path / "one", max_file_gb=1e-5)
    want = {k: v for f in weight_files(tmp_path / "one") for k, v in load_file(str(f)).items()}
    assert got.keys() == want.keys()
    for k in want:
        if k in ("b_enc", "b_dec"):
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got[k], want[k]), k
    x = torch.randn(9, 4, 64)
    torch.testing.assert_close(load_pretrained(run / "export")(x), load_pretrained(tmp_path / "one")(x))

    conversion = json.loads((run / "circuit_tracer" / "conversion.json").read_text())
    assert conversion["converted"] and conversion["calibration_tokens"] == 64
    assert conversion["l0_before_mean"] > 0 and conversion["fvu_after_mean"] < 10
    ct = load_circuit_tracer(run / "circuit_tracer")
    assert ct.args.activation == "jumprelu" and torch.equal(ct.W_dec[0], got["W_dec.0"])


# --- ``job.custom_import`` side: nothing may gather a sharded model whole -------------------------
def _forbid_whole_gathers() -> None:
    from torchtitan_clt.checkpoint import circuit_tracer, export
    from torchtitan_clt.checkpoint.sharded_export import is_sharded
    from torchtitan_clt.trainer import finish

    def forbidden(name, fn):
        def run(model, *a, **kw):
            if is_sharded(model):
                raise RuntimeError(f"{name}: the model was gathered whole")
            return fn(model, *a, **kw)

        return run

    finish.gather_plain_model = forbidden("gather_plain_model", finish.gather_plain_model)
    export.folded_cpu_copy = forbidden("folded_cpu_copy", export.folded_cpu_copy)
    circuit_tracer.folded_cpu_copy = forbidden("folded_cpu_copy", circuit_tracer.folded_cpu_copy)


if __name__ != "__main__" and not __name__.startswith("test_") and "torchtitan_clt_custom" in __name__:
    _forbid_whole_gathers()
