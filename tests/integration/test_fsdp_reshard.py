"""``parallelism.fsdp_reshard_after_forward = "always"`` trains exactly like the default.

``always`` frees the gathered parameters after every FSDP forward. ``decoder_norms`` was an FSDP
forward method of its own, called inside ``forward_std``: its post-forward resharded the
parameters mid-forward and the step crashed ("aten.bmm got mixed torch.Tensor and DTensor", issue
28). Only the outermost call is an entry point now (``distributed/fsdp.register_entry_points``).

Two processes (dp_shard 2, gloo) train the same synthetic batches with ``always`` and with
``default``; resharding changes when parameters are gathered, not what is computed, so every
logged loss agrees within 1e-6 relative (fp32, the same reduction order on both).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4

BASE = [
    "--config", "train_configs/debug_model.toml",
    "--data.source=synthetic", "--data.synthetic_n_layers=3", "--data.synthetic_d_model=16",
    "--model.features_per_layer=32", "--model.k=4", "--model.jumprelu_threshold_init=0.05",
    f"--training.steps={STEPS}", "--training.batch_size=32", "--training.device=cpu",
    "--lr_scheduler.warmup_steps=0", "--loss.lambda_warmup_steps=0",
    "--standardize.inputs=none", "--standardize.targets=none",
    "--metrics.log_freq=1", "--metrics.enable_tensorboard=false",
    "--checkpoint.enable=false", "--checkpoint.export=false",
    "--parallelism.dp_shard=2", "--parallelism.tp=1",
]  # fmt: skip

ACTIVATIONS = {
    "jumprelu": ["--model.activation=jumprelu"],  # the debug config's: dense encode, sparse decode
    "topk": ["--model.activation=topk", "--loss.sparsity=none"],  # the sparse step (SparseEncode)
}


def _losses(folder: Path, name: str, overrides: list[str]) -> list[float]:
    env = dict(os.environ, NGPU="2", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    cmd = ["bash", str(ROOT / "run_train.sh"), f"--job.dump_folder={folder}", f"--job.name={name}"]
    r = subprocess.run(cmd + overrides, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    rows = [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


@pytest.mark.slow
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_reshard_always_matches_default(tmp_path, activation):
    base = BASE + ACTIVATIONS[activation]
    always = _losses(tmp_path, "always", base + ["--parallelism.fsdp_reshard_after_forward=always"])
    default = _losses(tmp_path, "default", base + ["--parallelism.fsdp_reshard_after_forward=default"])
    assert len(always) == len(default) == STEPS
    for step, (a, b) in enumerate(zip(always, default), start=1):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), f"step {step}: loss {a} (always) vs {b} (default)"
