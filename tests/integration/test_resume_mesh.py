"""Exact resume on a 2×2 mesh (dp_shard 2 × tp 2, four gloo processes) with the stream source.

A 2N-step run on the tiny random Llama (activations through the TP readers' all-gather and the
shuffle buffer; the checkpoint at step N falls inside a refill) is resumed from its step-N
checkpoint on the same mesh. On one machine with the same world size the reductions add in the
same order, so the losses of steps N+1..2N and the final weights must be bit-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
N = 4

ARGS = [
    "--config", "train_configs/debug_model.toml",
    "--data.source=stream", "--data.model_path=tests/assets/tiny_llama", "--data.dataset=shakespeare",
    "--data.seq_len=17", "--data.llm_batch_size=4", "--data.buffer_tokens=192",
    "--model.name=clt", "--model.activation=batchtopk", "--model.batchtopk_scope=all", "--model.k=4",
    "--model.features_per_layer=32", "--loss.sparsity=none",
    f"--training.steps={2 * N}", "--training.batch_size=32", "--training.device=cpu",
    "--standardize.inputs=scalar", "--standardize.targets=scalar", "--standardize.estimate_tokens=64",
    "--parallelism.dp_shard=2", "--parallelism.tp=2",
    "--metrics.log_freq=1", "--metrics.enable_tensorboard=false",
    f"--checkpoint.interval={N}", "--checkpoint.keep_latest_k=0", "--checkpoint.export=true",
]  # fmt: skip


def run(folder: Path, name: str) -> str:
    env = dict(os.environ, NGPU="4", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env["MASTER_PORT"] = str(29500 + (os.getpid() + 7) % 1000)
    cmd = ["bash", str(ROOT / "run_train.sh"), *ARGS, f"--job.dump_folder={folder}", f"--job.name={name}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_resume_on_2x2_mesh_is_exact(tmp_path):
    run(tmp_path, "straight")
    ref = tmp_path / "straight"
    want = losses(ref)
    assert sorted(want) == list(range(1, 2 * N + 1))

    dst = tmp_path / "resumed"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / f"checkpoints/step-{N}", dst / f"checkpoints/step-{N}")
    out = run(tmp_path, "resumed")
    assert f"loaded step {N}" in out
    got = losses(dst)
    assert sorted(got) == list(range(N + 1, 2 * N + 1))
    for step in got:
        assert got[step] == want[step], f"step {step}: {got[step]} vs {want[step]}"
    w, w_ref = (
        load_file(str(dst / "export/model.safetensors")),
        load_file(str(ref / "export/model.safetensors")),
    )
    assert w.keys() == w_ref.keys()
    for k in w_ref:
        assert (w[k] == w_ref[k]).all(), k
